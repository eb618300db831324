"""The label-choice objective (config.downstream.objective): every (text, label) pair's log-likelihood in
both directions against the pair scored alone, the loss against the cross-entropy computed from those,
and the grid's batches that carry the label set."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_t5 import TINY_VOCAB, random_batch, tiny_t5
from mpt_jax import algorithms
from mpt_jax.data import batching
from mpt_jax.model.loss import (
  gold_label_one_hot,
  label_choice_loss,
  label_log_likelihoods,
  sequence_log_likelihood,
)

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates

NUM_LABELS, LABEL_WIDTH = 4, 5


def _labels(seed: int):
  """[C, 5] EOS-terminated, right-padded labels of 1-3 tokens and their mask."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((NUM_LABELS, LABEL_WIDTH), np.int32)
  for c, n in enumerate((1, 3, 2, 2)):
    ids[c, :n] = rng.integers(3, TINY_VOCAB, n)
    ids[c, n] = 1
  return ids, (ids > 0).astype(np.int32)


def _pair_scores_alone(model, params, prompt, texts, text_mask, labels, label_mask, direction):
  """[B, C]: each label's score for the whole batch, as one ordinary seq2seq batch per label."""
  scores = []
  for c in range(labels.shape[0]):
    label = np.broadcast_to(labels[c], (texts.shape[0], labels.shape[1]))
    mask = np.broadcast_to(label_mask[c], label.shape)
    if direction == "direct":
      batch = {"input_ids": texts, "input_mask": text_mask, "target_ids": label, "target_mask": mask}
    else:
      batch = {"input_ids": label, "input_mask": mask, "target_ids": texts, "target_mask": text_mask}
    scores.append(np.asarray(sequence_log_likelihood(model, params, prompt, batch)))
  return np.stack(scores, axis=1)


@pytest.mark.parametrize("direction", ["direct", "channel"])
def test_label_log_likelihoods_equal_each_pair_scored_alone(direction):
  model, params = tiny_t5("1.1", seed=7, num_layers=1, num_decoder_layers=1)
  labels, label_mask = _labels(3)
  texts = random_batch(21, batch=6, input_length=9)
  prompt = jnp.asarray(np.random.default_rng(4).normal(size=(3, model.config.d_model)), jnp.float32)
  for p in (None, prompt):
    ours = label_log_likelihoods(
      model,
      params,
      p,
      texts["input_ids"],
      texts["input_mask"],
      labels,
      label_mask,
      direction=direction,
    )
    expected = _pair_scores_alone(
      model, params, p, texts["input_ids"], texts["input_mask"], labels, label_mask, direction
    )
    assert ours.shape == (6, NUM_LABELS)
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=1e-5, atol=1e-4)


def test_gold_label_one_hot_compares_token_ids_over_the_longer_width():
  labels = np.array([[5, 1, 0], [5, 6, 1]], np.int32)
  golds = np.array([[5, 6, 1, 0, 0], [5, 1, 0, 0, 0], [7, 1, 0, 0, 0]], np.int32)
  np.testing.assert_array_equal(gold_label_one_hot(golds, labels), [[0, 1], [1, 0], [0, 0]])


@pytest.mark.parametrize("direction", ["direct", "channel"])
def test_label_choice_loss_is_the_cross_entropy_of_the_gold_among_the_labels(direction):
  """The training batch in the direction's form (channel: the label is the input), one example's gold
  missing from the label set (it counts zero, over all examples)."""
  model, params = tiny_t5("1.1", seed=8, num_layers=1, num_decoder_layers=1)
  labels, label_mask = _labels(5)
  texts = random_batch(22, batch=5, input_length=8)
  gold = np.array([0, 2, 1, 3, 0])
  gold_ids = np.pad(labels[gold], ((0, 0), (0, 3)))  # the training form pads wider than the label set
  gold_ids[4] = [9, 9, 1, 0, 0, 0, 0, 0]  # not a label
  gold_mask = (gold_ids > 0).astype(np.int32)
  if direction == "direct":
    batch = dict(input_ids=texts["input_ids"], input_mask=texts["input_mask"], target_ids=gold_ids)
    batch["target_mask"] = gold_mask
  else:
    batch = dict(input_ids=gold_ids, input_mask=gold_mask, target_ids=texts["input_ids"])
    batch["target_mask"] = texts["input_mask"]
  batch.update(label_ids=labels, label_mask=label_mask)
  prompt = jnp.asarray(np.random.default_rng(6).normal(size=(2, model.config.d_model)), jnp.float32)

  loss = label_choice_loss(model, params, prompt, batch, direction=direction, deterministic=True)
  scores = _pair_scores_alone(
    model, params, prompt, texts["input_ids"], texts["input_mask"], labels, label_mask, direction
  )
  shifted = scores - scores.max(1, keepdims=True)
  log_probs = shifted - np.log(np.sum(np.exp(shifted), 1, keepdims=True))  # log-softmax over the labels
  expected = -np.mean([log_probs[b, gold[b]] if b < 4 else 0.0 for b in range(5)])
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)

  # make_loss_fn: the objective and direction reach it; the sum adds the token cross-entropy.
  choice = algorithms.make_loss_fn(model, deterministic=True, objective="label_choice", direction=direction)
  both = algorithms.make_loss_fn(
    model, deterministic=True, objective="likelihood+label_choice", direction=direction
  )
  likelihood = algorithms.make_loss_fn(model, deterministic=True)
  np.testing.assert_allclose(float(choice(prompt, params, batch, None)), float(loss), rtol=1e-6)
  np.testing.assert_allclose(
    float(both(prompt, params, batch, None)),
    float(loss) + float(likelihood(prompt, params, batch, None)),
    rtol=1e-5,
  )
  grad = jax.grad(choice)(prompt, params, batch, None)
  assert np.all(np.isfinite(grad)) and np.abs(grad).max() > 0  # it moves the prompt

  # Dropout draws from the rng: two rngs, two losses; none is refused.
  dropout = algorithms.make_loss_fn(model, deterministic=False, objective="label_choice", direction=direction)
  a, b = (float(dropout(prompt, params, batch, jax.random.PRNGKey(k))) for k in (0, 1))
  assert a != b
  with pytest.raises(ValueError, match="needs an rng"):
    dropout(prompt, params, batch, None)
  with pytest.raises(ValueError, match="objective 'margin'"):
    algorithms.make_loss_fn(model, deterministic=True, objective="margin")


def test_the_grid_sampler_carries_the_label_set_in_every_runs_batch():
  train = batching.TokenizedSplit(
    task="toy",
    seed=13,
    split="train",
    input_ids=np.arange(1, 25, dtype=np.int32).reshape(6, 4),
    input_lengths=np.full(6, 4, np.int32),
    target_ids=np.array([[5, 1], [6, 1]] * 3, np.int32),
    target_lengths=np.full(6, 2, np.int32),
    gold_offsets=np.arange(7, dtype=np.int64),
    answers=(("a",), ("b",)) * 3,
  )
  labels, label_mask = np.array([[5, 1], [6, 1]]), np.ones((2, 2))
  sampler = batching.GridSampler.create({13: train}, [13, 13, 13], 2, label_set=(labels, label_mask))
  batch = sampler(0)
  assert batch["label_ids"].shape == (3, 2, 2) and batch["label_ids"].dtype == np.int32
  np.testing.assert_array_equal(batch["label_ids"][2], labels)
  np.testing.assert_array_equal(sampler(1, runs=[1])["label_mask"], label_mask[None])
  assert "label_ids" not in batching.GridSampler.create({13: train}, [13], 2)(0)
