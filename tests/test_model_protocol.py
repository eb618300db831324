"""The model protocol (mpt_jax/model/protocol.py) with a model that is not T5.

`BagOfWords` is a test double: a one-layer encoder-decoder of its own parameter names and its own special
ids (pad 3, eos 4, decoder start 5, where T5 has 0, 1, 0). The loss, greedy decoding, label scoring, a PT
step and the weight placement run on it unchanged, and each agrees with a direct computation.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from mpt_jax import algorithms, decode, methods, prompt as prompt_lib, sharding
from mpt_jax.data import batching
from mpt_jax.model import loss, protocol
from mpt_jax.model.t5 import T5
from tests.helpers_t5 import tiny_config

VOCAB, WIDTH, PROMPT_LENGTH = 14, 8, 2


class BagOfWords(nn.Module):
  """Encoder: tanh of a dense layer over the token embeddings, the prompt prepended. Decoder: position
  t's logits from the masked mean of the encoder outputs plus the sum of the decoder tokens' embeddings
  up to t; its cache is that running sum (a list per "layer" of dicts of batch-first arrays, as beam
  search reorders)."""

  pad_id = 3
  eos_id = 4
  decoder_start_id = 5
  partition_rules = (
    (r"^words/embedding$", (protocol.MODEL_AXIS, None)),
    (r"^mix/kernel$", (None, protocol.MODEL_AXIS)),
    (r"^head/kernel$", (None, protocol.MODEL_AXIS)),
    (r"/bias$", ()),
  )

  def setup(self):
    self.words = nn.Embed(VOCAB, WIDTH)
    self.mix = nn.Dense(WIDTH)
    self.head = nn.Dense(VOCAB)

  def __call__(
    self,
    input_ids,
    input_mask,
    decoder_input_ids,
    decoder_mask=None,
    prompt=None,
    placement="prepend",
    deterministic=True,
  ):
    encoded, encoder_mask = self.encode(input_ids, input_mask, prompt, placement, deterministic)
    return self.decode(encoded, encoder_mask, decoder_input_ids, decoder_mask, deterministic)

  def encode(self, input_ids, input_mask, prompt=None, placement="prepend", deterministic=True):
    if placement != "prepend":
      raise ValueError(f"BagOfWords places the prompt before the input only, not {placement!r}")
    x, mask = self.words(input_ids), input_mask.astype(bool)
    if prompt is not None:
      x = jnp.concatenate([jnp.broadcast_to(prompt, (x.shape[0], *prompt.shape)), x], axis=1)
      mask = jnp.concatenate([jnp.ones((x.shape[0], prompt.shape[0]), bool), mask], axis=1)
    return jnp.tanh(self.mix(x)), mask

  def decode(
    self,
    encoded,
    encoder_mask,
    decoder_input_ids,
    decoder_mask=None,
    deterministic=True,
    cache=None,
    cache_index=None,
  ):
    weights = encoder_mask.astype(jnp.float32)[..., None]
    context = jnp.sum(encoded * weights, axis=1) / jnp.sum(weights, axis=1)
    so_far = 0.0 if cache is None else cache[0]["self_sum"][:, None]
    running = so_far + jnp.cumsum(self.words(decoder_input_ids), axis=1)
    logits = self.head(context[:, None] + running).astype(jnp.float32)
    return logits if cache is None else (logits, [{"self_sum": running[:, -1]}])

  def init_cache(self, encoded, max_length: int):
    return [{"self_sum": jnp.zeros((encoded.shape[0], WIDTH), encoded.dtype)}]

  def token_embedding(self, params):
    return jnp.asarray(params["words"]["embedding"], jnp.float32)


@pytest.fixture(scope="module")
def double():
  model = BagOfWords()
  ids = jnp.zeros((1, 3), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.key(0), ids, jnp.ones_like(ids), ids)["params"]
  rng = np.random.default_rng(0)  # drawn on the host: model.init would compile its initializers
  params = jax.tree.map(lambda x: jnp.asarray(rng.normal(0.0, 0.5, x.shape), x.dtype), shapes)
  input_mask = np.array([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], np.int32)
  target_mask = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]], np.int32)
  batch = {
    "input_ids": np.where(input_mask, rng.integers(6, VOCAB, input_mask.shape), model.pad_id).astype(
      np.int32
    ),
    "input_mask": input_mask,
    "target_ids": np.where(target_mask, rng.integers(6, VOCAB, target_mask.shape), model.pad_id).astype(
      np.int32
    ),
    "target_mask": target_mask,
  }
  prompt = jnp.asarray(rng.normal(size=(PROMPT_LENGTH, WIDTH)), jnp.float32)
  return model, params, batch, prompt


def direct_logits(params, input_ids, input_mask, decoder_input_ids, prompt):
  """BagOfWords' teacher-forced logits written out with the parameters (no flax, no mpt_jax)."""
  embed = params["words"]["embedding"]
  x = jnp.concatenate([jnp.broadcast_to(prompt, (input_ids.shape[0], *prompt.shape)), embed[input_ids]], 1)
  mask = jnp.concatenate([jnp.ones((input_ids.shape[0], prompt.shape[0])), input_mask], 1)[..., None]
  encoded = jnp.tanh(x @ params["mix"]["kernel"] + params["mix"]["bias"])
  context = jnp.sum(encoded * mask, 1) / jnp.sum(mask, 1)
  hidden = context[:, None] + jnp.cumsum(embed[decoder_input_ids], axis=1)
  return hidden @ params["head"]["kernel"] + params["head"]["bias"]


def direct_loss(prompt, params, batch):
  """Token cross-entropy with BagOfWords' own decoder start id, mean over the real target tokens."""
  targets, mask = batch["target_ids"], batch["target_mask"]
  decoder_inputs = jnp.concatenate(
    [jnp.full((targets.shape[0], 1), BagOfWords.decoder_start_id), targets[:, :-1]], 1
  )
  logits = direct_logits(params, batch["input_ids"], batch["input_mask"], decoder_inputs, prompt)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  return jnp.sum(nll * mask) / jnp.sum(mask)


def test_t5_and_the_double_implement_the_protocol(double):
  model, params, _, _ = double
  assert isinstance(model, protocol.EncoderDecoder)
  t5_model = T5(tiny_config("1.0"))
  assert isinstance(t5_model, T5) and isinstance(t5_model, protocol.EncoderDecoder)
  assert (t5_model.pad_id, t5_model.eos_id, t5_model.decoder_start_id) == (0, 1, 0)
  np.testing.assert_array_equal(prompt_lib.token_embedding(params, model), params["words"]["embedding"])


def test_the_loss_is_the_token_cross_entropy(double):
  model, params, batch, prompt = double
  ours = jax.jit(loss.seq2seq_loss, static_argnames=("model", "deterministic"))(
    model, params, prompt, batch, deterministic=True
  )
  np.testing.assert_allclose(ours, jax.jit(direct_loss)(prompt, params, batch), rtol=1e-6)


def test_label_scores_are_the_labels_log_likelihoods(double):
  model, params, batch, prompt = double
  labels, label_mask = batch["target_ids"], batch["target_mask"]  # as a task's label set [C, L]
  scores = jax.jit(
    lambda prompt: loss.label_log_likelihoods(
      model, params, prompt, batch["input_ids"], batch["input_mask"], labels, label_mask, direction="direct"
    )
  )(prompt)

  @jax.jit
  def direct_scores(label, mask):  # of every input with one label as its target
    targets = jnp.broadcast_to(label, (batch["input_ids"].shape[0], label.shape[0]))
    decoder_inputs = jnp.concatenate(
      [jnp.full((targets.shape[0], 1), BagOfWords.decoder_start_id), targets[:, :-1]], 1
    )
    logits = direct_logits(params, batch["input_ids"], batch["input_mask"], decoder_inputs, prompt)
    token_ll = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1)[..., 0]
    return jnp.sum(token_ll * mask, -1)

  for c in range(labels.shape[0]):
    np.testing.assert_allclose(scores[:, c], direct_scores(labels[c], label_mask[c]), rtol=1e-5, atol=1e-5)


def hand_rolled_greedy(params, batch, prompt, max_length: int, eos: int):
  """argmax of the teacher-forced logits of the tokens so far, one token at a time, until eos; then pad.
  (The tokens sit in a buffer of fixed length, so one compilation serves every step: position t's
  logits depend on the tokens up to t only.)"""
  logits_of = jax.jit(direct_logits)
  num_rows = batch["input_ids"].shape[0]
  tokens = np.full((num_rows, max_length + 1), BagOfWords.pad_id, np.int32)
  tokens[:, 0] = BagOfWords.decoder_start_id
  done = np.zeros(num_rows, bool)
  for t in range(max_length):
    logits = logits_of(params, batch["input_ids"], batch["input_mask"], tokens, prompt)
    tokens[:, t + 1] = np.where(done, BagOfWords.pad_id, np.argmax(logits[:, t], axis=-1))
    done |= tokens[:, t + 1] == eos
  return tokens[:, 1:]


def test_greedy_decoding_is_the_argmax_loop(double):
  model, params, batch, prompt = double
  free = np.asarray(
    decode.greedy_decode(model, params, batch["input_ids"], batch["input_mask"], prompt, max_length=6)
  )
  np.testing.assert_array_equal(free, hand_rolled_greedy(params, batch, prompt, 6, BagOfWords.eos_id))
  eos = int(free[0, 2])  # a token that ends row 0 mid-sequence: the others pad with the double's pad id
  stopped = decode.greedy_decode(
    model, params, batch["input_ids"], batch["input_mask"], prompt, max_length=6, eos_token_id=eos
  )
  expected = hand_rolled_greedy(params, batch, prompt, 6, eos)
  assert (expected == BagOfWords.pad_id).any()
  np.testing.assert_array_equal(stopped, expected)


def test_a_pt_step_moves_the_prompt_along_the_loss_gradient(double):
  model, params, batch, prompt = double
  learning_rate = 0.1
  optimizer = optax.sgd(learning_rate)
  loss_fn = algorithms.make_loss_fn(model, deterministic=True)
  step = algorithms.jit_step(methods.make_step("pt", loss_fn, optimizer))
  frozen_before = jax.tree.map(np.array, params)
  state, metrics = step(algorithms.init_state(prompt, optimizer), params, batch, jax.random.key(1))
  value, grad = jax.jit(jax.value_and_grad(direct_loss))(prompt, params, batch)
  assert bool(metrics["update_ok"])
  np.testing.assert_allclose(metrics["loss"], value, rtol=1e-6)
  np.testing.assert_allclose(state.prompt, prompt - learning_rate * grad, rtol=1e-5, atol=1e-7)
  assert not np.allclose(state.prompt, prompt)
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.array, params), frozen_before)


def test_weights_are_placed_by_the_models_own_rules(double):
  model, params, _, _ = double
  specs = sharding.frozen_specs(params, 2, model.partition_rules)
  assert specs["words"]["embedding"] == P("model", None) and specs["mix"]["kernel"] == P(None, "model")
  assert specs["head"]["kernel"] == P(None, "model") and specs["head"]["bias"] == P()
  with pytest.raises(ValueError, match="no partition rule names it"):
    sharding.frozen_specs(params, 2)  # T5's rules do not know its names


def test_tokenized_data_refuses_a_model_of_other_special_ids(double):
  model = double[0]
  with pytest.raises(ValueError, match=r"pad and eos ids are \(3, 4\)"):
    batching.check_special_ids(model)
  batching.check_special_ids(T5(tiny_config("1.0")))


def test_one_beam_is_greedy(double):
  """Beam search runs on the double's cache (it reorders the "self_" entries): with one beam, greedy."""
  model, params, batch, prompt = double
  args = (model, params, batch["input_ids"], batch["input_mask"], prompt)
  for eos in (BagOfWords.eos_id, int(decode.greedy_decode(*args, max_length=6)[0, 2])):
    np.testing.assert_array_equal(
      decode.beam_search(*args, max_length=6, num_beams=1, early_stopping=True, eos_token_id=eos),
      decode.greedy_decode(*args, max_length=6, eos_token_id=eos),
    )
