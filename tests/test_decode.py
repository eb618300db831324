"""Beam search against transformers' `generate(num_beams=...)` (the study's decoder), and rank
classification against a brute-force loop over `sequence_log_likelihood`.

transformers pads its beam outputs with EOS (its pad id 0 is falsy) and crops them to the longest
one; `_pad_after_eos` puts them in our layout (the pad id after the first EOS, max_length columns).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_t5
from helpers_t5 import TINY_VOCAB, random_batch, tiny_t5
from mpt_jax.data.batching import TokenizedSplit
from mpt_jax.decode import beam_search, channel_rank_classify, greedy_decode, label_candidates, rank_classify
from mpt_jax.model.loss import sequence_log_likelihood

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates

try:
  import torch
except ImportError:  # the rank-classification tests below still run
  torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="the transformers reference needs torch")


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
  """transformers' generate on a tiny model is all overhead: on a busy 2-core machine, torch's
  thread pool made each call ~100x slower (13 s instead of 0.13 s, measured)."""
  if torch is None:
    yield
    return
  previous = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(previous)


TEXTS = [
  "premise: the movie was great [SEP] hypothesis: good",
  "one two",
  "question: who is the old cat that was on the mountain and by the river? answer: the dog",
  "sentence: a blue bird in the city",
]
MAX_LENGTH = 10  # generated tokens (transformers' max_new_tokens)


def _load_pair(request, version):
  return helpers_t5.load_reference_pair(request, version)


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def pair(request):
  return _load_pair(request, request.param)


@pytest.fixture(scope="module")
def pair_v10(request):
  return _load_pair(request, "1.0")


@pytest.fixture(scope="module")
def pair_v11(request):
  return _load_pair(request, "1.1")


def _inputs(tokenizer):
  out = tokenizer(TEXTS, padding=True, return_tensors="np")
  ids, mask = out.input_ids.astype(np.int32), out.attention_mask.astype(np.int32)
  assert len(set(mask.sum(1))) == len(TEXTS)  # a padded batch: every input has its own length
  return ids, mask


def _pad_after_eos(tokens, eos, max_length):
  out = np.zeros((len(tokens), max_length), np.int32)
  for i, row in enumerate(np.asarray(tokens)):
    stops = np.flatnonzero(row == eos)
    n = stops[0] + 1 if stops.size else len(row)
    out[i, :n] = row[:n]
  return out


def _hf_beam_search(
  model,
  reference,
  input_mask,
  *,
  eos,
  input_ids=None,
  inputs_embeds=None,
  num_beams=4,
  repetition_penalty=2.5,
  length_penalty=1.0,
  early_stopping=False,
):
  # transformers' cache breaks when the decoder is deeper than the encoder (DESIGN.md).
  use_cache = model.config.num_decoder_layers <= model.config.num_layers
  inputs = (
    {"input_ids": torch.tensor(input_ids, dtype=torch.long)}
    if inputs_embeds is None
    else {"inputs_embeds": torch.tensor(inputs_embeds)}
  )
  with torch.no_grad():
    out = reference.generate(
      **inputs,
      attention_mask=torch.tensor(input_mask, dtype=torch.long),
      num_beams=num_beams,
      repetition_penalty=repetition_penalty,
      length_penalty=length_penalty,
      early_stopping=early_stopping,
      max_new_tokens=MAX_LENGTH,
      do_sample=False,
      use_cache=use_cache,
      eos_token_id=eos,
      pad_token_id=0,
    )
  return _pad_after_eos(out.numpy()[:, 1:], eos, MAX_LENGTH)  # without the decoder start token


def _our_beam_search(
  model,
  params,
  input_ids,
  input_mask,
  *,
  eos,
  num_beams=4,
  repetition_penalty=2.5,
  length_penalty=1.0,
  early_stopping=False,
):
  # Every traced argument given explicitly: jit compiles again when the set of given ones changes.
  return np.asarray(
    beam_search(
      model,
      params,
      input_ids,
      input_mask,
      max_length=MAX_LENGTH,
      num_beams=num_beams,
      repetition_penalty=repetition_penalty,
      length_penalty=length_penalty,
      early_stopping=early_stopping,
      eos_token_id=eos,
    )
  )


def _mid_sequence_eos(tokens):
  """A token the first example emits at its 3rd step: as the EOS, beams stop at different steps."""
  return int(tokens[0, 2])


@needs_torch
def test_beam_search_matches_transformers_generate(pair):
  model, params, tokenizer, reference = pair
  ids, mask = _inputs(tokenizer)
  study = dict(num_beams=4, repetition_penalty=2.5)  # the study's decoding
  free = _hf_beam_search(model, reference, mask, input_ids=ids, eos=model.config.eos_token_id, **study)
  np.testing.assert_array_equal(
    _our_beam_search(model, params, ids, mask, eos=model.config.eos_token_id, **study), free
  )

  # Beams that finish at different steps exercise the finished-hypothesis bookkeeping, the length
  # penalty and the early-stopping heuristic.
  eos = _mid_sequence_eos(free)
  by_length_penalty = {}
  for repetition_penalty, length_penalty in ((2.5, 1.0), (2.5, 2.0), (1.0, 0.5)):
    kwargs = dict(num_beams=4, repetition_penalty=repetition_penalty, length_penalty=length_penalty)
    expected = _hf_beam_search(model, reference, mask, input_ids=ids, eos=eos, **kwargs)
    ours = _our_beam_search(model, params, ids, mask, eos=eos, **kwargs)
    np.testing.assert_array_equal(ours, expected, err_msg=str(kwargs))
    by_length_penalty[length_penalty] = ours
  ours = by_length_penalty[1.0]
  assert (ours == eos).any(axis=1).sum() >= 2  # hypotheses finished at EOS, not only at max_length
  assert (ours == 0).any()  # and were padded after it
  assert not np.array_equal(ours, by_length_penalty[2.0])  # the length penalty mattered


@needs_torch
def test_beam_search_early_stopping_matches_transformers_generate(pair):
  # The study decoded with early_stopping=True; "never" is transformers' third value. Stop tokens that
  # the examples emit at different steps make hypotheses finish early, where the three rules part.
  model, params, tokenizer, reference = pair
  ids, mask = _inputs(tokenizer)
  eos = model.config.eos_token_id
  free = _hf_beam_search(model, reference, mask, input_ids=ids, eos=eos)
  differs = {True: 0, "never": 0}
  for stop_token in (eos, *map(int, free[0, 2:5])):
    for length_penalty in (1.0, 2.0):
      kwargs = dict(num_beams=4, repetition_penalty=2.5, length_penalty=length_penalty)
      plain = _hf_beam_search(model, reference, mask, input_ids=ids, eos=stop_token, **kwargs)
      for early_stopping in (True, "never"):
        expected = _hf_beam_search(
          model, reference, mask, input_ids=ids, eos=stop_token, early_stopping=early_stopping, **kwargs
        )
        ours = _our_beam_search(
          model, params, ids, mask, eos=stop_token, early_stopping=early_stopping, **kwargs
        )
        np.testing.assert_array_equal(ours, expected, err_msg=f"{early_stopping=} {stop_token=} {kwargs}")
        differs[early_stopping] += int((expected != plain).any(axis=1).sum())
  # Both rules changed some outputs here, so an implementation that ignored them would fail above.
  assert differs[True] > 0 and differs["never"] > 0, differs


def test_beam_search_rejects_unknown_early_stopping():
  model, params = tiny_t5("1.0", seed=4, num_layers=1, num_decoder_layers=1)
  batch = random_batch(5, batch=2, input_length=6)
  with pytest.raises(ValueError, match="early_stopping='always'"):
    beam_search(model, params, batch["input_ids"], batch["input_mask"], max_length=4, early_stopping="always")


def test_one_beam_is_greedy_decoding():
  # (greedy_decode itself is compared with transformers in test_t5_parity.)
  model, params = tiny_t5("1.0", seed=4, num_layers=1, num_decoder_layers=1)
  batch = random_batch(5, batch=4, input_length=9)
  ids, mask = batch["input_ids"], batch["input_mask"]
  free = np.asarray(
    greedy_decode(model, params, ids, mask, max_length=MAX_LENGTH, eos_token_id=model.config.eos_token_id)
  )
  for eos in (model.config.eos_token_id, _mid_sequence_eos(free)):
    greedy = np.asarray(greedy_decode(model, params, ids, mask, max_length=MAX_LENGTH, eos_token_id=eos))
    one_beam = _our_beam_search(model, params, ids, mask, eos=eos, num_beams=1, repetition_penalty=1.0)
    np.testing.assert_array_equal(one_beam, greedy)
  assert (greedy == 0).any()  # the mid-sequence EOS stopped some of them


def _prepended_embeddings(reference, input_ids, input_mask, prompt):
  """Encoder inputs_embeds [prompt; tokens] and mask, built by hand (numpy) for transformers."""
  tokens = reference.shared.weight.detach().numpy()[input_ids]
  batch = tokens.shape[0]
  embeds = np.concatenate([np.broadcast_to(prompt, (batch, *prompt.shape)), tokens], axis=1)
  mask = np.concatenate([np.ones((batch, prompt.shape[0]), np.int64), input_mask], axis=1)
  return embeds.astype(np.float32), mask


@needs_torch
def test_prompted_beam_search_under_vmap_matches_transformers_inputs_embeds(pair_v11):
  # As the pipeline calls it: vmapped over a leading run axis of prompts and inputs.
  model, params, tokenizer, reference = pair_v11
  ids, mask = _inputs(tokenizer)
  rng = np.random.default_rng(0)
  prompts = rng.normal(size=(2, 3, model.config.d_model)).astype(np.float32)
  run_ids, run_mask = np.stack([ids, ids[::-1]]), np.stack([mask, mask[::-1]])
  eos = model.config.eos_token_id

  @jax.jit
  def runs(prompts, ids, mask):
    return jax.vmap(
      lambda p, i, m: beam_search(
        model, params, i, m, p, max_length=MAX_LENGTH, num_beams=4, repetition_penalty=2.5
      )
    )(prompts, ids, mask)

  ours = np.asarray(runs(jnp.asarray(prompts), run_ids, run_mask))
  for r in range(2):
    embeds, embeds_mask = _prepended_embeddings(reference, run_ids[r], run_mask[r], prompts[r])
    expected = _hf_beam_search(model, reference, embeds_mask, inputs_embeds=embeds, eos=eos)
    np.testing.assert_array_equal(ours[r], expected)
  assert not np.array_equal(ours[0], ours[1][::-1])  # the prompt changes what is generated


def _trimmed_then_prompt(reference, input_ids, input_mask, prompt):
  """The reference's encoder input, built by hand (numpy) for transformers: the batch's all-padding
  columns dropped (its trim_batch), then the prompt appended to every row, its mask all ones."""
  keep = (input_ids != 0).any(axis=0)
  tokens = reference.shared.weight.detach().numpy()[input_ids[:, keep]]
  batch = tokens.shape[0]
  embeds = np.concatenate([tokens, np.broadcast_to(prompt, (batch, *prompt.shape))], axis=1)
  mask = np.concatenate([input_mask[:, keep], np.ones((batch, prompt.shape[0]), np.int64)], axis=1)
  return embeds.astype(np.float32), mask


@needs_torch
def test_after_padding_placement_is_the_references_trimmed_batch_then_prompt(pair_v11):
  # Our batch carries static padding (columns beyond its longest input); the reference trimmed them
  # before appending the prompt. Same logits and same beam search outputs.
  model, params, tokenizer, reference = pair_v11
  ids, mask = _inputs(tokenizer)
  width = ids.shape[1]
  ids = np.pad(ids, ((0, 0), (0, 5)))  # 5 all-padding columns, as a fixed-length batch has
  mask = np.pad(mask, ((0, 0), (0, 5)))
  prompt = np.random.default_rng(1).normal(size=(3, model.config.d_model)).astype(np.float32)
  embeds, embeds_mask = _trimmed_then_prompt(reference, ids, mask, prompt)
  assert embeds.shape[1] == width + 3
  decoder_ids = np.asarray([[0, 12, 40, 7]] * len(TEXTS), np.int32)
  ours = model.apply(
    {"params": params}, ids, mask, decoder_ids, prompt=jnp.asarray(prompt), placement="after_padding"
  )
  with torch.no_grad():
    expected = reference(
      inputs_embeds=torch.tensor(embeds),
      attention_mask=torch.tensor(embeds_mask),
      decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
    ).logits.numpy()
  np.testing.assert_allclose(np.asarray(ours), expected, atol=2e-5, rtol=1e-4)
  generated = beam_search(
    model,
    params,
    ids,
    mask,
    jnp.asarray(prompt),
    max_length=MAX_LENGTH,
    placement="after_padding",
    num_beams=4,
    repetition_penalty=2.5,
    early_stopping=True,
  )
  np.testing.assert_array_equal(
    np.asarray(generated),
    _hf_beam_search(
      model, reference, embeds_mask, inputs_embeds=embeds, eos=model.config.eos_token_id, early_stopping=True
    ),
  )
  # Prompt right after the padded width instead (the old reading of "after padding"): other logits.
  padded_embeds = np.concatenate(
    [reference.shared.weight.detach().numpy()[ids], np.broadcast_to(prompt, (len(TEXTS), *prompt.shape))],
    axis=1,
  )
  padded_mask = np.concatenate([mask, np.ones((len(TEXTS), 3), np.int64)], axis=1)
  with torch.no_grad():
    other = reference(
      inputs_embeds=torch.tensor(padded_embeds),
      attention_mask=torch.tensor(padded_mask),
      decoder_input_ids=torch.tensor(decoder_ids, dtype=torch.long),
    ).logits.numpy()
  assert np.abs(other - expected).max() > 1e-3


# --- rank classification ---------------------------------------------------------------------------------


def _split(answers, target_rows, target_length=6):
  """A TokenizedSplit built by hand: one input per example, its golds' token rows given."""
  lengths = np.asarray([len(r) for r in target_rows], np.int32)
  targets = np.zeros((len(target_rows), target_length), np.int32)
  for i, row in enumerate(target_rows):
    targets[i, : len(row)] = row
  num_golds = [len(a) for a in answers]
  n = len(answers)
  return TokenizedSplit(
    task="toy",
    seed=13,
    split="train",
    input_ids=np.ones((n, 4), np.int32),
    input_lengths=np.ones(n, np.int32),
    target_ids=targets,
    target_lengths=lengths,
    gold_offsets=np.concatenate([[0], np.cumsum(num_golds)]).astype(np.int64),
    answers=tuple(tuple(a) for a in answers),
  )


def test_label_candidates_are_the_sorted_distinct_first_golds():
  answers = [("positive",), ("negative", "bad"), ("positive",), ("neutral",), ("Negative",)]
  rows = [[5, 1], [6, 7, 1], [8, 1], [5, 1], [9, 1], [6, 7, 1]]
  # golds: ex0 positive | ex1 negative, bad | ex2 positive | ex3 neutral | ex4 Negative (as ex1)
  candidates = label_candidates(_split(answers, rows))
  # "negative" has the tokens of "Negative", which sorts first.
  assert candidates.texts == ("Negative", "neutral", "positive")
  np.testing.assert_array_equal(
    candidates.target_ids, [[6, 7, 1, 0, 0, 0], [9, 1, 0, 0, 0, 0], [5, 1, 0, 0, 0, 0]]
  )
  np.testing.assert_array_equal(
    candidates.target_mask, [[1, 1, 1, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0]]
  )
  assert candidates.score_length == 3

  with pytest.raises(ValueError, match="toy.*no examples"):
    label_candidates(_split([], []))


def test_rank_classify_under_vmap_equals_brute_force_likelihoods():
  model, params = tiny_t5("1.1", seed=3, num_layers=1, num_decoder_layers=1)
  rng = np.random.default_rng(1)
  # Five labels of 1-3 tokens (+ EOS) in rows of 6, as a classification task's train split has.
  label_rows = [list(rng.integers(3, TINY_VOCAB, n)) + [1] for n in (2, 1, 2, 3, 2)]
  candidates = label_candidates(_split([(f"label {i}",) for i in range(5)], label_rows))
  num_runs, batch = 2, 6
  inputs = [random_batch(seed, batch=batch, input_length=9) for seed in (10, 11)]
  run_ids = np.stack([b["input_ids"] for b in inputs])
  run_mask = np.stack([b["input_mask"] for b in inputs])
  prompts = jnp.asarray(rng.normal(size=(num_runs, 3, model.config.d_model)), jnp.float32)

  @jax.jit
  def ranked(prompts, ids, mask):
    return jax.vmap(lambda p, i, m: rank_classify(model, params, i, m, p, candidates=candidates))(
      prompts, ids, mask
    )

  @jax.jit
  def log_likelihood(prompt, ids, mask, target_ids, target_mask):  # one label for the whole batch
    batch = {
      "input_ids": ids,
      "input_mask": mask,
      "target_ids": jnp.broadcast_to(target_ids, (ids.shape[0], target_ids.shape[0])),
      "target_mask": jnp.broadcast_to(target_mask, (ids.shape[0], target_mask.shape[0])),
    }
    return sequence_log_likelihood(model, params, prompt, batch)

  ours = np.asarray(ranked(prompts, run_ids, run_mask))
  assert ours.shape == (num_runs, batch, candidates.target_ids.shape[1]) and ours.dtype == np.int32
  for r in range(num_runs):
    scores = np.stack(
      [
        np.asarray(
          log_likelihood(
            prompts[r], run_ids[r], run_mask[r], candidates.target_ids[c], candidates.target_mask[c]
          )
        )
        for c in range(len(candidates.texts))
      ],
      axis=1,
    )
    np.testing.assert_array_equal(ours[r], candidates.target_ids[np.argmax(scores, axis=1)])
  labels_chosen = {row.tobytes() for row in ours.reshape(-1, ours.shape[-1])}
  assert len(labels_chosen) > 1  # the inputs and prompts matter: not one constant label


def test_channel_rank_classify_picks_the_label_under_which_the_input_is_most_likely():
  """Brute force: for each label, the input's likelihood as the target of [prompt; label] (the
  `batching.channel_form` batch), then the argmax per input; with and without a prompt."""
  model, params = tiny_t5("1.1", seed=5, num_layers=1, num_decoder_layers=1)
  rng = np.random.default_rng(2)
  label_rows = [list(rng.integers(3, TINY_VOCAB, n)) + [1] for n in (1, 3, 2, 2)]
  candidates = label_candidates(_split([(f"label {i}",) for i in range(4)], label_rows))
  inputs = random_batch(12, batch=7, input_length=9)
  chosen_sets = []
  for prompt in (None, jnp.asarray(rng.normal(size=(3, model.config.d_model)), jnp.float32)):
    ours = np.asarray(
      channel_rank_classify(
        model, params, inputs["input_ids"], inputs["input_mask"], prompt, candidates=candidates
      )
    )
    scores = []
    for c in range(len(candidates.texts)):
      batch = {
        "input_ids": jnp.broadcast_to(candidates.target_ids[c], (7, candidates.target_ids.shape[1])),
        "input_mask": jnp.broadcast_to(candidates.target_mask[c], (7, candidates.target_ids.shape[1])),
        "target_ids": jnp.asarray(inputs["input_ids"]),
        "target_mask": jnp.asarray(inputs["input_mask"]),
      }
      scores.append(np.asarray(sequence_log_likelihood(model, params, prompt, batch)))
    expected = candidates.target_ids[np.argmax(np.stack(scores, axis=1), axis=1)]
    np.testing.assert_array_equal(ours, expected)
    chosen_sets.append({row.tobytes() for row in ours})
  assert max(len(c) for c in chosen_sets) > 1  # not one constant label for every input
