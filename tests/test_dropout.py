"""mpt_jax/model/dropout.py: its hash against JAX's Threefry-2x32, its masks against their definition."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.extend.random import threefry_2x32

from mpt_jax.model import dropout


def test_the_hash_is_jaxs_threefry_2x32():
  rng = np.random.default_rng(0)
  for _ in range(3):
    key = rng.integers(0, 2**32, 2, dtype=np.uint64).astype(np.uint32)
    counts = rng.integers(0, 2**32, (2, 257), dtype=np.uint64).astype(np.uint32)
    expected = np.asarray(threefry_2x32(jnp.asarray(key), jnp.asarray(counts.reshape(-1))))
    words = jax.jit(dropout.threefry2x32)(*map(jnp.asarray, (key[0], key[1], counts[0], counts[1])))
    np.testing.assert_array_equal(np.concatenate([np.asarray(w) for w in words]), expected)


@pytest.mark.parametrize(
  "rng, words",
  [
    (jax.random.key(3), jax.random.key_data),  # Threefry: the key's own words
    (jax.random.PRNGKey(4), jax.random.key_data),  # a raw uint32 key is a Threefry key
    (jax.random.key(3, impl="rbg"), lambda k: jax.random.bits(k, (2,), jnp.uint32)),  # other kinds
  ],
  ids=["threefry", "raw", "rbg"],
)
def test_draws_are_the_hash_words_halves_in_order(rng, words):
  """Element 4i..4i+3 of a row: hash i's first word low, high, second word low, high; counters run
  over the whole array; the hash's key is a Threefry rng's own two words, two random words of others."""
  shape = (2, 3, 9)  # 9: the last hash of a row gives one element
  draws = np.asarray(dropout.random_draws(rng, shape))
  key1, key2 = (np.uint32(k) for k in np.asarray(words(rng)))
  hashes = 2 * 3 * 3
  w1, w2 = (
    np.asarray(w)
    for w in dropout.threefry2x32(key1, key2, np.zeros(hashes, np.uint32), np.arange(hashes, dtype=np.uint32))
  )
  halves = np.stack([w1 & 0xFFFF, w1 >> 16, w2 & 0xFFFF, w2 >> 16], axis=-1).reshape(2, 3, 12)[..., :9]
  np.testing.assert_array_equal(draws, halves)
  assert draws.max() < 2**16


@pytest.mark.parametrize("rate", [0.1, 0.35])
def test_drop_frequency_is_the_rounded_rate(rate):
  n = 1 << 21
  drops = 1.0 - float(jnp.mean(dropout.keep_mask(jax.random.key(1), (512, n // 512), rate)))
  p = dropout.drop_threshold(rate) / 2**16
  assert abs(p - rate) <= 2**-17
  assert abs(drops - p) < 5 * np.sqrt(p * (1 - p) / n)  # 5 standard deviations


def test_draws_are_uniform_and_the_four_per_hash_uncorrelated():
  draws = np.asarray(dropout.random_draws(jax.random.key(2), (256, 4096)), np.float64)
  n = draws.size
  counts = np.bincount((draws // 4096).astype(int).ravel(), minlength=16)  # 16 bins of the 16-bit range
  chi2 = float(((counts - n / 16) ** 2 / (n / 16)).sum())
  assert chi2 < 45.0  # 15 degrees of freedom: p ~ 1e-4
  centred = (draws - draws.mean()).reshape(-1, 4)  # the four draws of each hash
  corr = np.corrcoef(centred.T)
  assert np.abs(corr - np.eye(4)).max() < 5 / np.sqrt(n / 4)


def test_dropout_scales_kept_elements_by_the_exact_keep_probability():
  x = jax.random.normal(jax.random.key(0), (64, 130))
  rng = jax.random.key(5)
  out = np.asarray(dropout.dropout(rng, x, 0.1))
  keep = np.asarray(dropout.keep_mask(rng, x.shape, 0.1))
  assert (~keep).any() and keep.any()
  np.testing.assert_array_equal(out[~keep], 0.0)
  np.testing.assert_allclose(out[keep], np.asarray(x)[keep] * (65536 / (65536 - 6554)), rtol=1e-6)
  assert dropout.dropout(rng, x, 0.0) is x


def test_masks_follow_the_rng_and_vmap_equals_one_call_per_key():
  keys = jax.random.split(jax.random.key(7), 3)
  one_by_one = np.stack([np.asarray(dropout.keep_mask(k, (5, 40), 0.3)) for k in keys])
  vmapped = np.asarray(jax.vmap(lambda k: dropout.keep_mask(k, (5, 40), 0.3))(keys))
  np.testing.assert_array_equal(vmapped, one_by_one)
  assert not (one_by_one[0] == one_by_one[1]).all()
  assert not (one_by_one[0, 0] == one_by_one[0, 1]).all()  # rows differ: the counter spans the array
  np.testing.assert_array_equal(np.asarray(dropout.keep_mask(keys[0], (5, 40), 0.3)), one_by_one[0])


def test_raw_uint32_keys_work_too():
  mask = dropout.keep_mask(jax.random.PRNGKey(0), (3, 7), 0.5)
  assert mask.shape == (3, 7) and mask.dtype == jnp.bool_


def test_bad_rates_are_refused():
  for rate in (-0.1, 1.0, 1.5):
    with pytest.raises(ValueError, match="dropout rate"):
      dropout.drop_threshold(rate)


def test_module_reads_the_dropout_rng_and_is_identity_when_deterministic():
  layer = dropout.Dropout(0.5)
  x = jnp.ones((4, 16))
  assert layer.apply({}, x, deterministic=True) is x
  rng = jax.random.key(9)
  out = layer.apply({}, x, deterministic=False, rngs={"dropout": rng})
  expected = dropout.dropout(_module_rng(rng), x, 0.5)
  np.testing.assert_array_equal(np.asarray(out), np.asarray(expected))


def _module_rng(rng):
  """The key flax gives the first make_rng("dropout") of a top-level module applied with `rng`."""

  class Probe(nn.Module):
    @nn.compact
    def __call__(self):
      return self.make_rng("dropout")

  return Probe().apply({}, rngs={"dropout": rng})
