"""Greedy decoding of the grid's runs as one batch equals decoding each run with its own prompt."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_t5 import random_batch, tiny_t5
from mpt_jax import decode

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates


@pytest.mark.parametrize("placement", ["prepend", "suffix"])
def test_runs_decoded_as_one_batch_equal_runs_decoded_apart(placement):
  model, params = tiny_t5("1.1", seed=11, dropout_rate=0.0)
  num_runs, batch, max_length = 3, 4, 7
  flat = random_batch(12, batch=num_runs * batch, input_length=9)
  ids, mask = (flat[k].reshape(num_runs, batch, -1) for k in ("input_ids", "input_mask"))
  prompts = jnp.asarray(np.random.default_rng(2).normal(size=(num_runs, 3, 16)), jnp.float32)
  # EOS: the token the first run's first row emits third, so that rows stop at different steps.
  apart = [
    np.asarray(
      decode.greedy_decode(
        model,
        params,
        ids[r],
        mask[r],
        prompts[r],
        max_length=max_length,
        placement=placement,
        eos_token_id=10_000,
      )
    )
    for r in range(num_runs)
  ]
  eos = int(apart[0][0, 2])
  apart = np.stack(
    [
      decode.greedy_decode(
        model,
        params,
        ids[r],
        mask[r],
        prompts[r],
        max_length=max_length,
        placement=placement,
        eos_token_id=eos,
      )
      for r in range(num_runs)
    ]
  )
  together = decode.greedy_decode_runs(
    model, params, ids, mask, prompts, max_length=max_length, placement=placement, eos_token_id=eos
  )
  np.testing.assert_array_equal(together, apart)
  lengths = (apart != model.config.pad_token_id).sum(-1)
  assert lengths.min() < lengths.max()  # some rows stopped early: the stop condition was exercised
  vmapped = jax.jit(
    jax.vmap(
      lambda p, i, m: decode.greedy_decode(
        model, params, i, m, p, max_length=max_length, placement=placement, eos_token_id=eos
      )
    )
  )
  np.testing.assert_array_equal(vmapped(prompts, ids, mask), together)
