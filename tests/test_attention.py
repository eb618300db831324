"""T5Config.attention: jax.nn.dot_product_attention in place of our einsums gives the same model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_t5 import random_batch, tiny_t5
from mpt_jax import algorithms, decode
from mpt_jax.model.t5 import T5, T5Config

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates


def test_dot_product_attention_gives_the_einsum_models_loss_gradient_and_tokens():
  model, params = tiny_t5(
    "1.1", seed=8, dropout_rate=0.0, relative_attention_num_buckets=32, relative_attention_max_distance=128
  )
  fused = T5(model.config.replace(attention="xla"))  # the implementation CPUs have; cudnn needs a GPU
  batch = random_batch(6, batch=3, input_length=9, target_length=4)
  prompt = 0.5 * jnp.asarray(np.random.default_rng(1).normal(size=(3, 16)), jnp.float32)

  def loss_and_grad(model):
    loss_fn = algorithms.make_loss_fn(model, deterministic=True)
    return jax.jit(jax.value_and_grad(loss_fn))(prompt, params, batch, None)

  loss, grad = loss_and_grad(model)
  fused_loss, fused_grad = loss_and_grad(fused)
  np.testing.assert_allclose(fused_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(fused_grad, grad, rtol=1e-5, atol=1e-6 * float(jnp.abs(grad).max()))
  tokens = [
    decode.greedy_decode(m, params, batch["input_ids"], batch["input_mask"], prompt, max_length=5)
    for m in (model, fused)
  ]  # the decoder's cached steps mask the cache differently
  np.testing.assert_array_equal(tokens[1], tokens[0])


def test_dropout_keeps_the_einsums():
  model, params = tiny_t5("1.1", seed=9, num_layers=1, num_decoder_layers=1)
  fused = T5(model.config.replace(attention="xla"))
  batch = random_batch(7)
  prompt = jnp.ones((2, 16), jnp.float32)
  with jax.threefry_partitionable(False):
    losses = [
      jax.jit(algorithms.make_loss_fn(m, deterministic=False))(prompt, params, batch, jax.random.key(3))
      for m in (model, fused)
    ]
  assert losses[0] == losses[1]  # attention dropout drawn the same way: the einsum path ran
  with pytest.raises(ValueError, match="attention='flash'"):
    T5Config(attention="flash")
