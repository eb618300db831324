"""The soft prompt: how it enters the model (placements, padding, gradients), its initializers, files."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_t5 import random_batch, tiny_t5
from mpt_jax import algorithms, methods, optim, prompt as prompts
from mpt_jax.data import batching
from mpt_jax.model.loss import seq2seq_loss
from mpt_jax.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates


@pytest.fixture(scope="module")
def tiny():
  # One layer per stack keeps compiles short; depth is covered by the parity tests.
  model, params = tiny_t5("1.1", seed=3, num_layers=1, num_decoder_layers=1)
  forward = jax.jit(model.apply, static_argnames=("placement",))
  return model, params, forward


@pytest.fixture(scope="module")
def tiny_wide_buckets():
  """`tiny` with T5's 32 relative-position buckets up to distance 128: moving the padding by tens of
  positions changes the position bias (the tiny default, 8 buckets up to 12, would hide it)."""
  model, params = tiny_t5(
    "1.1",
    seed=3,
    num_layers=1,
    num_decoder_layers=1,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
  )
  return model, params


def _prompt(num_rows, d_model=16, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(num_rows, d_model)), jnp.float32)


def test_empty_prompt_is_the_plain_model_and_a_prompt_changes_it(tiny):
  model, params, forward = tiny
  input_ids, input_mask, decoder_input_ids = _padded_pair()
  args = ({"params": params}, input_ids, input_mask, decoder_input_ids)
  plain = forward(*args)
  np.testing.assert_array_equal(forward(*args, prompt=_prompt(0)), plain)
  for placement in ("prepend", "suffix"):
    prompted = forward(*args, prompt=_prompt(5), placement=placement)
    assert float(jnp.abs(prompted - plain).max()) > 1e-3


@pytest.mark.parametrize("placement", ["prepend", "suffix"])
def test_gradient_reaches_every_prompt_row_and_matches_finite_differences(tiny, placement):
  model, params, _ = tiny
  batch = random_batch(1, batch=3)
  loss = jax.jit(
    lambda p, fp: seq2seq_loss(model, fp, p, batch, None, deterministic=True, placement=placement)
  )
  prompt = _prompt(5, seed=1)
  grad, frozen_grad = jax.jit(jax.grad(loss, argnums=(0, 1)))(prompt, params)
  assert all(not np.any(g) for g in jax.tree_util.tree_leaves(frozen_grad))  # the T5 stays frozen
  assert grad.shape == prompt.shape and grad.dtype == jnp.float32
  assert np.all(np.abs(np.asarray(grad)).sum(axis=1) > 0)  # every row is seen by the encoder
  direction = _prompt(5, seed=2)
  eps = 1e-2
  numeric = (loss(prompt + eps * direction, params) - loss(prompt - eps * direction, params)) / (2 * eps)
  np.testing.assert_allclose(float(numeric), float(jnp.vdot(grad, direction)), rtol=2e-2)


def _padded_pair():
  """Two examples of lengths 7 and 3, padded to 11 (more than the longest needs)."""
  rng = np.random.default_rng(5)
  input_ids = np.zeros((2, 11), np.int32)
  input_mask = np.zeros((2, 11), np.int32)
  for i, n in enumerate((7, 3)):
    input_ids[i, : n - 1] = rng.integers(3, 64, n - 1)
    input_ids[i, n - 1] = 1
    input_mask[i, :n] = 1
  decoder_input_ids = np.array([[0, 9, 4, 12], [0, 5, 33, 1]], np.int32)
  return input_ids, input_mask, decoder_input_ids


@pytest.mark.parametrize("placement", ["prepend", "suffix"])
def test_output_does_not_depend_on_batch_padding(tiny, placement):
  model, params, forward = tiny
  input_ids, input_mask, decoder_input_ids = _padded_pair()
  prompt = _prompt(5, seed=3)
  batched = forward(
    {"params": params}, input_ids, input_mask, decoder_input_ids, prompt=prompt, placement=placement
  )
  for i in range(2):
    n = int(input_mask[i].sum())
    alone = forward(
      {"params": params},
      input_ids[i : i + 1, :n],
      input_mask[i : i + 1, :n],
      decoder_input_ids[i : i + 1],
      prompt=prompt,
      placement=placement,
    )
    np.testing.assert_allclose(batched[i : i + 1], alone, atol=1e-5, rtol=0)


def test_reference_after_padding_placement(tiny):
  """The reference's placement: the prompt right after the batch's longest input (the reference trimmed
  the batch's all-padding columns first), so the batch's static padding does not matter, but the other
  inputs of the batch do. (tests/test_decode.py compares it with transformers on the trimmed batch.)"""
  model, params, forward = tiny
  input_ids, input_mask, decoder_input_ids = _padded_pair()  # lengths 7 and 3, padded to 11
  prompt = _prompt(5, seed=3)
  run = lambda ids, mask, dec: forward(
    {"params": params}, ids, mask, dec, prompt=prompt, placement="after_padding"
  )
  padded = run(input_ids, input_mask, decoder_input_ids)
  trimmed = run(input_ids[:, :7], input_mask[:, :7], decoder_input_ids)
  np.testing.assert_allclose(padded, trimmed, atol=1e-5, rtol=0)
  # Alone, the short input has its prompt at position 3: as "suffix". In the batch, at position 7.
  alone = run(input_ids[1:, :3], input_mask[1:, :3], decoder_input_ids[1:])
  suffix = forward(
    {"params": params},
    input_ids[1:, :3],
    input_mask[1:, :3],
    decoder_input_ids[1:],
    prompt=prompt,
    placement="suffix",
  )
  np.testing.assert_allclose(alone, suffix, atol=1e-5, rtol=0)
  assert float(jnp.abs(padded[1:] - alone).max()) > 1e-3
  # The longest input's prompt follows it directly: as "suffix" for it.
  np.testing.assert_allclose(
    padded[:1],
    forward({"params": params}, input_ids, input_mask, decoder_input_ids, prompt=prompt, placement="suffix")[
      :1
    ],
    atol=1e-5,
    rtol=0,
  )


def _padded_to(batch: dict, input_length: int, target_length: int) -> dict:
  """`batch` (any leading dims) right-padded with zeros to the given lengths: fixed padding."""

  def pad(x, length):
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, length - x.shape[-1])])

  return {k: pad(v, input_length if k.startswith("input") else target_length) for k, v in batch.items()}


def _bucketed_and_padded(seed: int, lead: tuple[int, ...]):
  """The same examples padded to 40 / 12 tokens (fixed padding) and cut to length buckets of 8 / 4."""
  rows = int(np.prod(lead))
  flat = random_batch(seed, batch=rows, input_length=11, target_length=5)
  padded = _padded_to({k: v.reshape(*lead, -1) for k, v in flat.items()}, 40, 12)
  (bucketed,) = batching.LengthBuckets(input_multiple=8, target_multiple=4).trim(padded)
  assert bucketed["input_ids"].shape[-1] in (8, 16) and bucketed["target_ids"].shape[-1] in (4, 8)
  return bucketed, padded


@pytest.mark.parametrize("placement", ["prepend", "suffix"])
def test_bucketed_batches_give_the_padded_loss_and_gradient(tiny_wide_buckets, placement):
  model, params = tiny_wide_buckets
  loss_and_grad = jax.jit(
    jax.value_and_grad(
      lambda p, fp, b: seq2seq_loss(model, fp, p, b, None, deterministic=True, placement=placement)
    )
  )
  prompt = _prompt(5, seed=4)
  bucketed, padded = _bucketed_and_padded(6, (4,))
  loss, grad = loss_and_grad(prompt, params, bucketed)
  padded_loss, padded_grad = loss_and_grad(prompt, params, padded)
  np.testing.assert_allclose(loss, padded_loss, rtol=1e-6)
  np.testing.assert_allclose(grad, padded_grad, rtol=1e-5, atol=1e-6 * float(jnp.abs(padded_grad).max()))


def test_bucketed_episodes_and_grid_batches_give_the_padded_meta_gradient_and_update(tiny_wide_buckets):
  model, params = tiny_wide_buckets
  loss_fn = algorithms.make_loss_fn(model, deterministic=True)
  prompt = _prompt(5, seed=5)
  support, padded_support = _bucketed_and_padded(7, (2, 1, 2))  # MAML: T=2 tasks x (K=1 step of 2)
  query, padded_query = _bucketed_and_padded(8, (2, 2))
  # An episode's parts share one length (EpisodeSampler); cut both to the longer one here too.
  length_in = max(support["input_ids"].shape[-1], query["input_ids"].shape[-1])
  length_out = max(support["target_ids"].shape[-1], query["target_ids"].shape[-1])
  episode = {
    "support": _padded_to(support, length_in, length_out),
    "query": _padded_to(query, length_in, length_out),
  }
  grad_fn = jax.jit(algorithms.make_maml_grad_fn(loss_fn, inner_lr=10.0))
  grad, metrics = grad_fn(prompt, params, episode, jax.random.key(0), 0)
  padded_grad, padded_metrics = grad_fn(
    prompt, params, {"support": padded_support, "query": padded_query}, jax.random.key(0), 0
  )
  np.testing.assert_allclose(metrics["loss"], padded_metrics["loss"], rtol=1e-6)
  np.testing.assert_allclose(grad, padded_grad, rtol=1e-5, atol=1e-6 * float(jnp.abs(padded_grad).max()))
  # The downstream grid: 3 runs, one Adafactor step each.
  optimizer = optim.make_optimizer("adafactor", 0.5)
  grid_step = jax.jit(algorithms.make_grid_step(methods.make_step("pt", loss_fn, optimizer)))
  batches, padded_batches = _bucketed_and_padded(9, (3, 4))
  states = algorithms.init_grid_state(prompt, optimizer, [0.5, 0.4, 0.3])
  rngs = jax.random.split(jax.random.key(1), 3)
  new, _ = grid_step(states, params, batches, rngs)
  padded_new, _ = grid_step(states, params, padded_batches, rngs)
  np.testing.assert_allclose(new.prompt, padded_new.prompt, rtol=1e-5, atol=1e-6)
  assert float(jnp.abs(new.prompt - states.prompt).min()) > 0  # the step did move every prompt entry


def test_bad_placement_and_prompt_width_are_rejected(tiny):
  model, params, _ = tiny
  batch = random_batch(2)
  with pytest.raises(ValueError, match="placement 'middle'"):
    seq2seq_loss(model, params, _prompt(2), batch, None, deterministic=True, placement="middle")
  with pytest.raises(ValueError, match="d_model=16"):
    seq2seq_loss(model, params, _prompt(2, d_model=8), batch, None, deterministic=True)


# --- initializers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer(tiny_tokenizer_dir):
  return load_tokenizer(tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def embedding(tokenizer):
  return np.random.default_rng(0).normal(size=(len(tokenizer), 16)).astype(np.float32)


def _row_ids(rows, embedding):
  """Which embedding row each prompt row is (exact match), -1 if none."""
  matches = np.all(np.asarray(rows)[:, None, :] == embedding[None, :, :], axis=-1)
  return np.where(matches.any(axis=1), matches.argmax(axis=1), -1)


def test_frequent_ids_skip_special_tokens_and_sentinels(tokenizer):
  first, end = prompts.frequent_id_range(tokenizer)
  assert first == 3
  assert end == len(tokenizer) - 100  # the tiny vocabulary has < 5000 pieces: all of them
  assert tokenizer.convert_ids_to_tokens(end).startswith("<extra_id_")
  assert not tokenizer.convert_ids_to_tokens(end - 1).startswith("<extra_id_")
  assert prompts.frequent_id_range(tokenizer, num_candidates=10) == (3, 13)


def test_uniform_init():
  prompt = prompts.uniform(0.5)(jax.random.PRNGKey(0), (20, 16))
  assert prompt.shape == (20, 16) and prompt.dtype == jnp.float32
  assert float(prompt.min()) >= -0.5 and float(prompt.max()) <= 0.5 and float(prompt.std()) > 0.2


def test_sampled_vocab_rows_are_distinct_frequent_token_embeddings(tokenizer, embedding):
  prompt = prompts.sampled_vocab(embedding, tokenizer=tokenizer, num_candidates=50)(
    jax.random.PRNGKey(1), (20, 16)
  )
  ids = _row_ids(prompt, embedding)
  assert np.all((ids >= 3) & (ids < 53)) and len(set(ids)) == 20


def test_task_name_init_is_the_references(tokenizer, embedding):
  names = ["glue-sst2", "tweet_eval-hate"]
  prompt = prompts.task_names(embedding, tokenizer, names)(jax.random.PRNGKey(2), (6, 16))
  for row, text in zip(prompt[:2], ["glue sst2", "tweet eval hate"]):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    np.testing.assert_allclose(row, embedding[ids].mean(axis=0), rtol=1e-6, atol=1e-7)
  first, end = prompts.frequent_id_range(tokenizer)
  rest = _row_ids(prompt[2:], embedding)
  assert np.all((rest >= first) & (rest < end))
  # More names than rows (the `random` setting: 114 names, 100 rows): the first names fill the prompt.
  one_row = prompts.task_names(embedding, tokenizer, names)(jax.random.PRNGKey(2), (1, 16))
  np.testing.assert_array_equal(one_row, prompt[:1])
  with pytest.raises(ValueError, match="d_model=16"):
    prompts.task_names(embedding, tokenizer, names)(jax.random.PRNGKey(2), (4, 32))


def test_label_word_init(tokenizer, embedding):
  with pytest.raises(ValueError, match="2 label words do not fit a prompt of 1 rows"):
    prompts.label_words(embedding, tokenizer, ["positive", "negative"])(jax.random.PRNGKey(3), (1, 16))
  prompt = prompts.label_words(embedding, tokenizer, ["positive", "negative"])(jax.random.PRNGKey(3), (5, 16))
  positive = tokenizer("positive", add_special_tokens=False).input_ids
  np.testing.assert_allclose(prompt[0], embedding[positive].mean(axis=0), rtol=1e-6, atol=1e-7)
  assert np.all(_row_ids(prompt[2:], embedding) >= 3)


def test_repeated_token_init(tokenizer, embedding):
  prompt = prompts.repeated_token(embedding, tokenizer)(jax.random.PRNGKey(4), (5, 16))
  eos = tokenizer.convert_tokens_to_ids("</s>")
  assert eos == 1
  np.testing.assert_array_equal(_row_ids(prompt, embedding), [eos] * 5)
  word = next(t for t in tokenizer.get_vocab() if t.startswith("\u2581") and len(t) > 2)
  rows = prompts.repeated_token(embedding, tokenizer, word)(jax.random.PRNGKey(4), (3, 16))
  np.testing.assert_array_equal(_row_ids(rows, embedding), [tokenizer.get_vocab()[word]] * 3)
  with pytest.raises(ValueError, match="prompt.init_token='no such piece' is not a piece"):
    prompts.repeated_token(embedding, tokenizer, "no such piece")


def test_initializer_builds_each_named_init_and_refuses_others(tokenizer, embedding):
  rng, shape = jax.random.PRNGKey(6), (5, 16)
  expected = {
    "task_names": prompts.task_names(embedding, tokenizer, ["glue-sst2"]),
    "vocab": prompts.sampled_vocab(embedding, tokenizer=tokenizer),
    "uniform": prompts.uniform(),
    "label_words": prompts.label_words(embedding, tokenizer, ["positive", "negative"]),
    "token": prompts.repeated_token(embedding, tokenizer, "</s>"),
  }
  assert set(expected) == set(prompts.INITS)
  for name, init in expected.items():
    built = prompts.initializer(
      name, embedding, tokenizer, names=["glue-sst2"], words=["positive", "negative"]
    )
    np.testing.assert_array_equal(built(rng, shape), init(rng, shape), err_msg=name)
  with pytest.raises(ValueError, match="prompt init 'zeros': expected one of"):
    prompts.initializer("zeros", embedding, tokenizer)


def test_configured_token_init_is_the_same_prompt_for_every_method_task_and_seed(tokenizer):
  """pipeline.initial_prompt with prompt.init='token': EOS rows of the model's own embedding, whatever the
  task names (PT: the target's; upstream: the sources') and the seed."""
  from mpt_jax import config as config_lib, pipeline

  _, params = tiny_t5("1.1", seed=5, vocab_size=len(tokenizer), num_layers=1, num_decoder_layers=1)
  config = config_lib.base_config("maml", "synth_mini", "tiny")
  config.prompt.init, config.prompt.length = "token", 6
  upstream = pipeline.initial_prompt(config, params, tokenizer, ["synth-topic_a", "synth-topic_b"], 0)
  target = pipeline.initial_prompt(config, params, tokenizer, ["synth-sentiment_d"], 7)
  eos_row = np.asarray(params["shared"]["embedding"])[1]
  np.testing.assert_array_equal(upstream, np.tile(eos_row, (6, 1)))
  np.testing.assert_array_equal(target, upstream)
  config.prompt.init_token = (
    "\u2581the" if "\u2581the" in tokenizer.get_vocab() else tokenizer.convert_ids_to_tokens(5)
  )
  other = pipeline.initial_prompt(config, params, tokenizer, ["synth-sentiment_d"], 7)
  token_id = tokenizer.get_vocab()[config.prompt.init_token]
  np.testing.assert_array_equal(other, np.tile(np.asarray(params["shared"]["embedding"])[token_id], (6, 1)))


# --- files -------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(tmp_path):
  prompt = _prompt(7)
  path = prompts.save_prompt(
    tmp_path / "init" / "maml_cls2cls", prompt, {"model": "google/t5-large-lm-adapt", "placement": "prepend"}
  )
  assert os.path.basename(path) == "maml_cls2cls.npy"
  loaded, meta = prompts.load_prompt(tmp_path / "init" / "maml_cls2cls.npy", d_model=16)
  np.testing.assert_array_equal(loaded, prompt)
  assert meta == {"model": "google/t5-large-lm-adapt", "placement": "prepend", "length": 7, "d_model": 16}


def test_load_prompt_rejects_what_does_not_fit(tmp_path):
  prompts.save_prompt(tmp_path / "p", _prompt(3), {"model": "tiny"})
  with pytest.raises(ValueError, match=r"d_model 16 \(from model tiny\) does not match .* 1024"):
    prompts.load_prompt(tmp_path / "p", d_model=1024)
  sidecar = tmp_path / "p.json"
  sidecar.write_text(json.dumps({"length": 5, "d_model": 16}))
  with pytest.raises(ValueError, match="length 3 disagrees with p.json"):
    prompts.load_prompt(tmp_path / "p.npy")
  with pytest.raises(FileNotFoundError, match="nope.npy"):
    prompts.load_prompt(tmp_path / "nope")


def test_weights_loss_is_seq2seq_loss_without_a_prompt_but_trains_the_weights():
  from mpt_jax.model.loss import weights_loss

  model, params = tiny_t5(dropout_rate=0.0)
  batch = {k: jnp.asarray(v) for k, v in random_batch(3).items()}
  empty = jnp.zeros((0, model.config.d_model), jnp.float32)
  frozen = seq2seq_loss(model, params, empty, batch, None, deterministic=True)
  np.testing.assert_allclose(float(weights_loss(model, params, batch)), float(frozen), rtol=1e-6)
  # seq2seq_loss guards the frozen weights (zero gradient); weights_loss is for training them.
  frozen_grads = jax.grad(lambda p: seq2seq_loss(model, p, empty, batch, None, deterministic=True))(params)
  grads = jax.grad(lambda p: weights_loss(model, p, batch))(params)
  assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(frozen_grads))
  assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads)) > 0
