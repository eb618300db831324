"""The soft prompt: how it enters the model (placements, padding, gradients), its initializers, files."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_t5 import random_batch, tiny_t5
from mpt_jax import prompt as prompts
from mpt_jax.model.loss import seq2seq_loss
from mpt_jax.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates


@pytest.fixture(scope="module")
def tiny():
  # One layer per stack keeps compiles short; depth is covered by the parity tests.
  model, params = tiny_t5("1.1", seed=3, num_layers=1, num_decoder_layers=1)
  forward = jax.jit(model.apply, static_argnames=("placement",))
  return model, params, forward


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
