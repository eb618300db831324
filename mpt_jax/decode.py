"""Predictions of the frozen model with a soft prompt: greedy decoding, beam search, rank scoring.

Everything is jitted with static shapes: the cache holds `max_length` decoder positions and the
generation loops are `lax.while_loop`s that stop once every sequence is done. The building blocks
(`start_generation`: encode once and build the cache; `decode_step`: logits of the next token) are
shared; beam search keeps its beams on the batch axis and reorders the batch-first cache by gathers.
Beam search follows transformers' `generate(num_beams=...)` (the study decoded with it; the tests
compare token for token). Rank classification picks the label with the highest likelihood.
All three return token ids [B, T]: the caller turns them into text the same way. The model is any
encoder-decoder of the model protocol (model/protocol.py); beam search also reads its cache's layout.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from mpt_jax.model import protocol
from mpt_jax.model.loss import label_log_likelihoods
from mpt_jax.model.protocol import EncoderDecoder

if TYPE_CHECKING:
  from mpt_jax.data.batching import TokenizedSplit


def start_generation(
  model: EncoderDecoder,
  frozen_params,
  input_ids,
  input_mask,
  prompt=None,
  *,
  placement: str = "prepend",
  max_length: int,
):
  """Encodes the inputs once -> (encoded, encoder_mask, cache for max_length decoder positions)."""
  encoded, encoder_mask = protocol.encode(model, frozen_params, input_ids, input_mask, prompt, placement)
  cache = protocol.init_cache(model, frozen_params, encoded, max_length)
  return encoded, encoder_mask, cache


def decode_step(model: EncoderDecoder, frozen_params, tokens, encoded, encoder_mask, cache, index):
  """Next-token logits [B, V] (float32) given the token at decoder position `index` [B]."""
  logits, cache = protocol.decode_step(
    model, frozen_params, tokens[:, None], encoded, encoder_mask, cache, index
  )
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("model", "max_length", "placement"))
def greedy_decode(
  model: EncoderDecoder,
  frozen_params,
  input_ids,
  input_mask,
  prompt=None,
  *,
  max_length: int,
  placement: str = "prepend",
  eos_token_id=None,
):
  """Greedy output tokens [B, max_length] int32: the argmax continuation from the decoder start
  token, up to and including EOS, then padding (pad_token_id).

  eos_token_id: the stop token, default the model's; a traced value (changing it does not recompile).
  """
  encoded, encoder_mask = protocol.encode(model, frozen_params, input_ids, input_mask, prompt, placement)
  return _greedy_from_encoded(model, frozen_params, encoded, encoder_mask, max_length, eos_token_id)


@functools.partial(jax.jit, static_argnames=("model", "max_length", "placement"))
def greedy_decode_runs(
  model: EncoderDecoder,
  frozen_params,
  input_ids,
  input_mask,
  prompts,
  *,
  max_length: int,
  placement: str = "prepend",
  eos_token_id=None,
):
  """Greedy tokens [R, B, max_length] of R runs: run r's inputs [r] ([R, B, L]) with its prompt
  prompts[r] ([R, P, D]); what `jax.vmap(greedy_decode)` over runs gives.

  The prompt only enters the encoder, so each run is encoded with its own prompt and then all R x B
  rows are decoded as one batch in one loop, which stops once every row is done. (vmap of
  greedy_decode batches the loop's stop condition instead, and then selects between the new and the
  old value of the whole loop state, the cache included, at every step for every run.)
  """
  encoded, encoder_mask = jax.vmap(
    lambda prompt, ids, mask: protocol.encode(model, frozen_params, ids, mask, prompt, placement)
  )(prompts, input_ids, input_mask)
  num_runs, batch = input_ids.shape[:2]
  rows = lambda x: x.reshape(num_runs * batch, *x.shape[2:])
  output = _greedy_from_encoded(
    model, frozen_params, rows(encoded), rows(encoder_mask), max_length, eos_token_id
  )
  return output.reshape(num_runs, batch, max_length)


def _greedy_from_encoded(
  model: EncoderDecoder, frozen_params, encoded, encoder_mask, max_length: int, eos_token_id
):
  """The greedy loop over encoder outputs [B, L, D]: the cross-attention keys/values computed once."""
  eos = model.eos_id if eos_token_id is None else eos_token_id
  batch = encoded.shape[0]
  cache = protocol.init_cache(model, frozen_params, encoded, max_length)
  output = jnp.full((batch, max_length), model.pad_id, jnp.int32)
  start = jnp.full((batch,), model.decoder_start_id, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def not_finished(carry):
    index, _, _, done, _ = carry
    return (index < max_length) & ~jnp.all(done)

  def step(carry):
    index, tokens, output, done, cache = carry
    logits, cache = decode_step(model, frozen_params, tokens, encoded, encoder_mask, cache, index)
    next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    next_tokens = jnp.where(done, model.pad_id, next_tokens)
    output = output.at[:, index].set(next_tokens)
    done = done | (next_tokens == eos)
    return index + 1, next_tokens, output, done, cache

  _, _, output, _, _ = jax.lax.while_loop(not_finished, step, (jnp.int32(0), start, output, done, cache))
  return output


# --- beam search -----------------------------------------------------------------------------------------

# What transformers adds to a score to rule a candidate out (not -inf: sums must stay finite).
# config.downstream.decoding: beam search, greedy generation, rank classification over a task's labels,
# or "auto" (rank for classification tasks, greedy for the others).
DECODINGS = ("beam", "greedy", "rank", "auto")
_EXCLUDED = -1.0e9


def penalize_repetitions(log_probs, sequences, length, start_token_id: int, penalty: float):
  """transformers' RepetitionPenaltyLogitsProcessor on the scores of the next token.

  log_probs [N, V]; sequences [N, T] the generated tokens, of which the first `length` (traced) are
  real. A token already in the decoder sequence (the start token included) gets score * penalty if
  its score is negative, score / penalty otherwise. transformers' beam search (since 4.0) applies
  its logits processors to the log-softmax scores, not to the raw logits, and does not renormalize
  after: so the penalty multiplies the log-probability of a seen token.
  """
  num_rows, vocab = log_probs.shape
  positions = jnp.arange(sequences.shape[1])
  seen_ids = jnp.where(positions[None, :] < length, sequences, vocab)  # vocab: dropped below
  rows = jnp.arange(num_rows)[:, None]
  seen = jnp.zeros((num_rows, vocab), bool).at[rows, seen_ids].set(True, mode="drop")
  seen = seen.at[:, start_token_id].set(True)
  penalized = jnp.where(log_probs < 0, log_probs * penalty, log_probs / penalty)
  return jnp.where(seen, penalized, log_probs)


def _gather_beams(x, beam_index):
  """x [B, K, ...] -> [B, K', ...] along the beam axis with beam_index [B, K']."""
  index = beam_index.reshape(*beam_index.shape, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, index, axis=1)


def _reorder_self_attention(cache, rows):
  """The cache of the beams that go on: rows [B * K] index the old beams. Only the self-attention
  keys/values depend on the beam; the cross-attention ones are the same for all beams of an example
  (and a beam only ever continues a beam of its own example), so they are not copied."""
  return [{name: x[rows] if name.startswith("self_") else x for name, x in layer.items()} for layer in cache]


@functools.partial(
  jax.jit, static_argnames=("model", "max_length", "placement", "num_beams", "early_stopping")
)
def beam_search(
  model: EncoderDecoder,
  frozen_params,
  input_ids,
  input_mask,
  prompt=None,
  *,
  max_length: int,
  placement: str = "prepend",
  num_beams: int = 4,
  repetition_penalty: float = 1.0,
  length_penalty: float = 1.0,
  early_stopping: bool | str = False,
  eos_token_id=None,
):
  """The best beam's tokens [B, max_length] int32 (without the start token, up to and including EOS,
  then padding), as transformers' `generate(num_beams=, repetition_penalty=, length_penalty=,
  early_stopping=, do_sample=False)` finds them (its beam search of 5.x; tested against 5.24). The
  study decoded with `early_stopping=True`, 4 beams and a repetition penalty of 2.5.

  That algorithm, step by step (each example independently):
    scores: sum of the log-softmax of each step (after the repetition penalty, see
      `penalize_repetitions`); at the first step only beam 0 is live (the others are copies);
    candidates: the top 2 * num_beams (beam, token) continuations over all beams;
    running beams: the best num_beams candidates that did not stop (EOS or the last position);
    finished: a stopping candidate among the top num_beams candidates (not the 2nd half) joins the
      num_beams best finished hypotheses with score sum / length ** length_penalty, where length
      counts the generated tokens, EOS included, not the start token;
    stop, per example: nothing more is added to its finished hypotheses once
      early_stopping=True: it holds num_beams of them ("full"; the rule of transformers 4.x's
        `BeamHypotheses.is_done` too, which the study ran);
      early_stopping=False: it is full and the best running beam's score divided by the current
        length ** length_penalty is not above the worst of them (a heuristic: scores could still
        rise with a length penalty above 0);
      early_stopping="never": as False, but with a positive length_penalty the best running beam is
        scored at max_length (the most its score can become), so only a beam that cannot win stops;
    the loop ends when that holds for every example (True: every example is full, or cannot improve),
    when every candidate stopped, or at max_length.

  max_length counts generated tokens, like `greedy_decode` and transformers' `max_new_tokens`: it is
  transformers' `max_length` minus one (theirs counts the decoder start token), so the study's
  `generate(max_length=128)` is `max_length=127` here. A hypothesis cut at max_length has no EOS.
  Padding is pad_token_id (transformers pads beam outputs with EOS when pad_token_id is 0).

  repetition_penalty, length_penalty, eos_token_id (default: the model's): traced values, changing
  them does not recompile.
  """
  if num_beams < 1:
    raise ValueError(f"beam_search: num_beams={num_beams}; expected at least 1")
  if not (early_stopping is True or early_stopping is False or early_stopping == "never"):
    raise ValueError(f"beam_search: early_stopping={early_stopping!r}; expected True, False or 'never'")
  eos = model.eos_id if eos_token_id is None else eos_token_id
  batch = input_ids.shape[0]
  num_candidates = 2 * num_beams  # transformers' beams_to_keep with one EOS id
  encoded, encoder_mask, cache = start_generation(
    model, frozen_params, input_ids, input_mask, prompt, placement=placement, max_length=max_length
  )
  # Beams live on the batch axis, [B * K, ...] with example-major order; the cache is batch-first.
  to_beams = lambda x: jnp.repeat(x, num_beams, axis=0)
  encoded, encoder_mask, cache = jax.tree_util.tree_map(to_beams, (encoded, encoder_mask, cache))

  running_sequences = jnp.full((batch, num_beams, max_length), model.pad_id, jnp.int32)
  running_scores = jnp.where(jnp.arange(num_beams) == 0, 0.0, _EXCLUDED)
  running_scores = jnp.broadcast_to(running_scores, (batch, num_beams)).astype(jnp.float32)
  finished_sequences = running_sequences
  finished_scores = jnp.full((batch, num_beams), _EXCLUDED, jnp.float32)
  is_finished = jnp.zeros((batch, num_beams), bool)
  can_improve = jnp.ones((batch,), bool)  # transformers' is_early_stop_heuristic_unsatisfied
  tokens = jnp.full((batch * num_beams,), model.decoder_start_id, jnp.int32)
  is_top_half = jnp.arange(num_candidates) < num_beams
  example_offset = jnp.arange(batch)[:, None] * num_beams

  def length_normalizer(length):
    return jnp.asarray(length, jnp.float32) ** length_penalty

  def not_finished(carry):
    index, _, _, _, _, is_finished, can_improve, _, all_stopped, _ = carry
    going = (index < max_length) & jnp.any(can_improve) & ~all_stopped
    if early_stopping is True:  # transformers: done once every example of the batch is full
      going = going & ~jnp.all(is_finished)
    return going

  def step(carry):
    (
      index,
      running_sequences,
      running_scores,
      finished_sequences,
      finished_scores,
      is_finished,
      can_improve,
      tokens,
      _,
      cache,
    ) = carry
    logits, cache = decode_step(model, frozen_params, tokens, encoded, encoder_mask, cache, index)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    vocab = log_probs.shape[-1]
    log_probs = penalize_repetitions(  # the identity for a penalty of 1.0
      log_probs,
      running_sequences.reshape(batch * num_beams, max_length),
      index,
      model.decoder_start_id,
      repetition_penalty,
    )
    scores = log_probs.reshape(batch, num_beams, vocab) + running_scores[..., None]

    # Candidates: the top 2K (beam, token) pairs of each example, best first.
    candidate_scores, flat_index = jax.lax.top_k(scores.reshape(batch, num_beams * vocab), num_candidates)
    candidate_beams = flat_index // vocab
    candidate_tokens = (flat_index % vocab).astype(jnp.int32)
    candidate_sequences = _gather_beams(running_sequences, candidate_beams)
    candidate_sequences = candidate_sequences.at[:, :, index].set(candidate_tokens)
    stops = (candidate_tokens == eos) | (index + 1 >= max_length)

    # Running beams: the best K candidates that go on.
    live_scores = candidate_scores + jnp.where(stops, _EXCLUDED, 0.0)
    _, keep = jax.lax.top_k(live_scores, num_beams)
    running_sequences = _gather_beams(candidate_sequences, keep)
    running_scores = _gather_beams(live_scores, keep)
    source_beams = _gather_beams(candidate_beams, keep)

    # Finished hypotheses: merge the stopping candidates of the top half into the best K so far.
    just_finished = stops & is_top_half
    new_scores = candidate_scores / length_normalizer(index + 1)
    if early_stopping is True:  # a full example takes no more hypotheses
      new_scores = new_scores + jnp.where(jnp.all(is_finished, axis=1)[:, None], _EXCLUDED, 0.0)
    new_scores = new_scores + jnp.where(can_improve[:, None], 0.0, _EXCLUDED)
    new_scores = new_scores + jnp.where(just_finished, 0.0, _EXCLUDED)
    merged_scores = jnp.concatenate([finished_scores, new_scores], axis=1)
    _, best = jax.lax.top_k(merged_scores, num_beams)
    finished_scores = _gather_beams(merged_scores, best)
    finished_sequences = _gather_beams(
      jnp.concatenate([finished_sequences, candidate_sequences], axis=1), best
    )
    is_finished = _gather_beams(jnp.concatenate([is_finished, just_finished], axis=1), best)

    cache = _reorder_self_attention(cache, (example_offset + source_beams).reshape(-1))
    tokens = running_sequences[:, :, index].reshape(-1)

    # Can the best running beam, scored at its current length ("never" with a positive length penalty:
    # at max_length), still beat the worst finished hypothesis? (Only asked once all K slots are filled;
    # with early_stopping=True a full example is already closed above.)
    best_length = index + 1
    if early_stopping == "never":
      best_length = jnp.where(length_penalty > 0, max_length, best_length)
    best_possible = running_scores[:, 0] / length_normalizer(best_length)
    worst_finished = jnp.min(finished_scores, axis=1)
    all_filled = jnp.all(is_finished, axis=1)
    can_improve = can_improve & (~all_filled | (best_possible > worst_finished))
    return (
      index + 1,
      running_sequences,
      running_scores,
      finished_sequences,
      finished_scores,
      is_finished,
      can_improve,
      tokens,
      jnp.all(stops),
      cache,
    )

  carry = (
    jnp.int32(0),
    running_sequences,
    running_scores,
    finished_sequences,
    finished_scores,
    is_finished,
    can_improve,
    tokens,
    jnp.bool_(False),
    cache,
  )
  carry = jax.lax.while_loop(not_finished, step, carry)
  finished_sequences = carry[3]
  return finished_sequences[:, 0]


# --- rank classification ---------------------------------------------------------------------------------


@struct.dataclass
class Candidates:
  """The label set of a classification task: each label's token ids (EOS-terminated, right-padded).

  A pytree: the arrays are leaves (jit traces them, or a closure bakes them in as constants);
  `texts` and `score_length` (the longest label, in tokens) are static.
  """

  target_ids: jax.Array  # [C, L_out] int32
  target_mask: jax.Array  # [C, L_out] int32
  texts: tuple[str, ...] = struct.field(pytree_node=False)
  score_length: int = struct.field(pytree_node=False)


def label_candidates(train_split: TokenizedSplit) -> Candidates:
  """The distinct first golds of a split (what evaluation scores against), sorted by text.

  Two texts that tokenize alike count once (the first in sorted order), since only the tokens can be
  told apart.
  """
  if len(train_split) == 0:
    raise ValueError(
      f"task {train_split.task!r} (seed {train_split.seed}, split "
      f"{train_split.split}) has no examples: rank classification takes its label "
      f"set from the train split"
    )
  first_rows = train_split.gold_offsets[:-1]
  by_text = {}
  for example, row in enumerate(first_rows):
    by_text.setdefault(train_split.answers[example][0], int(row))
  texts, rows, seen = [], [], set()
  for text in sorted(by_text):
    row = by_text[text]
    ids = train_split.target_ids[row]
    key = ids.tobytes()
    if key not in seen:
      seen.add(key)
      texts.append(text)
      rows.append(row)
  rows = np.asarray(rows)
  lengths = np.asarray(train_split.target_lengths)[rows]
  width = train_split.target_ids.shape[1]
  mask = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int32)
  return Candidates(
    np.asarray(train_split.target_ids[rows], np.int32), mask, tuple(texts), int(lengths.max())
  )


# How rank classification weighs the labels' scores before it chooses (config.downstream.calibration):
# "none" (the study's): as scored; "train_mean": each label's score minus its mean score over the task's
# train inputs (`label_bias`), so that a label which makes every input of the task likely (channel), or
# which every input of the task makes likely (direct), does not win them all. Contextual calibration (Zhao
# et al. 2021, "Calibrate Before Use") estimates the same bias from one content-free input; this takes the
# task's own train inputs, which every run has (no labels are read).
CALIBRATIONS = ("none", "train_mean")


@functools.partial(jax.jit, static_argnames=("model", "placement", "direction"))
def label_scores(
  model: EncoderDecoder,
  frozen_params,
  input_ids,
  input_mask,
  prompt=None,
  *,
  candidates: Candidates,
  direction: str,
  placement: str = "prepend",
):
  """Every label's log-likelihood with every input [B, C] in `direction` (`label_log_likelihoods`: direct
  log p(label | prompt, input), channel log p(input | prompt, label)), labels scored up to the longest
  one's length; what rank classification chooses from."""
  return label_log_likelihoods(
    model,
    frozen_params,
    prompt,
    input_ids,
    input_mask,
    jnp.asarray(candidates.target_ids, jnp.int32)[:, : candidates.score_length],
    jnp.asarray(candidates.target_mask)[:, : candidates.score_length],
    direction=direction,
    placement=placement,
  )


def label_bias(scores, example_mask=None):
  """The "train_mean" calibration's bias [..., C]: each label's mean score over the real examples of
  `scores` [..., N, C] (`example_mask` [..., N], 1 for a real example; None: all are)."""
  scores = np.asarray(scores, np.float64)
  if example_mask is None:
    return scores.mean(axis=-2)
  weights = np.asarray(example_mask, np.float64)[..., None]
  return (scores * weights).sum(axis=-2) / np.maximum(weights.sum(axis=-2), 1.0)


@functools.partial(jax.jit, static_argnames=("model", "placement"))
def rank_classify(
  model: EncoderDecoder,
  frozen_params,
  input_ids,
  input_mask,
  prompt=None,
  *,
  candidates: Candidates,
  placement: str = "prepend",
  label_bias=None,
):
  """The most likely label of each input, as that label's token ids [B, L_out] int32.

  Likelihood as `sequence_log_likelihood`: the sum of the label's token log-probabilities, EOS
  included. Each input is encoded once; the decoder scores all C labels against it in one batch of
  B * C rows (teacher forcing over the longest label's length only: the causal decoder makes the
  positions after it irrelevant). `label_bias` [C] (None: zeros) is subtracted from every input's scores
  first (the "train_mean" calibration). Ties go to the first label in `candidates` order.
  """
  return scored_rank_classify(
    model,
    frozen_params,
    input_ids,
    input_mask,
    prompt,
    candidates=candidates,
    placement=placement,
    direction="direct",
    label_bias=label_bias,
  )[0]


@functools.partial(jax.jit, static_argnames=("model", "placement"))
def channel_rank_classify(
  model: EncoderDecoder,
  frozen_params,
  input_ids,
  input_mask,
  prompt=None,
  *,
  candidates: Candidates,
  placement: str = "prepend",
  label_bias=None,
):
  """Rank classification in the noisy-channel direction (Min et al. 2022): the label c of each input x
  that maximizes log p(x | prompt, c) (minus `label_bias` [C], if given), the model reading the prompt and
  the label and scoring the input (EOS included) as its target; returned as that label's token ids
  [B, L_out] int32, as `rank_classify`.

  `input_ids` / `input_mask` are the inputs as they would be fed to the encoder (EOS-terminated; the
  `batching.channel_form` targets). Each label is encoded once with the prompt; the decoder scores every
  input against one label at a time (a `lax.map` over the C labels keeps the logits at [B, L, V]). Ties
  go to the first label in `candidates` order."""
  return scored_rank_classify(
    model,
    frozen_params,
    input_ids,
    input_mask,
    prompt,
    candidates=candidates,
    placement=placement,
    direction="channel",
    label_bias=label_bias,
  )[0]


def scored_rank_classify(
  model,
  frozen_params,
  input_ids,
  input_mask,
  prompt=None,
  *,
  candidates: Candidates,
  placement: str,
  direction: str,
  label_bias=None,
):
  """Rank classification in `direction` with what it chose from: (each input's highest-scoring label as
  its token ids [B, L_out] int32, every label's score [B, C] minus `label_bias` [C] when given). Scores
  are `label_scores`; ties go to the first label in `candidates` order."""
  scores = label_scores(
    model,
    frozen_params,
    input_ids,
    input_mask,
    prompt,
    candidates=candidates,
    direction=direction,
    placement=placement,
  )
  if label_bias is not None:
    scores = scores - jnp.asarray(label_bias, scores.dtype)[None, :]
  return jnp.asarray(candidates.target_ids, jnp.int32)[jnp.argmax(scores, axis=-1)], scores
