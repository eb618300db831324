"""Dropout whose random bits XLA's CPU backend computes in one fused pass: four 16-bit draws per hash.

flax's `nn.Dropout` draws a float32 uniform per element (`random.bernoulli`), one Threefry-2x32 hash
each. On the CPU backend JAX lowers that hash as a rolled loop of 5 iterations (it compiles faster),
each reading and writing the whole array of counters: at T5-small shape the masks were the largest cost
after the matmuls in a PT step (0.81 of 5.2 s, `python -m benchmarks.bench_steps --configs small
--only pt`). Here the same hash (Salmon et al. 2011, Threefry-2x32 with 20 rounds; tested equal to
`jax.extend.random.threefry_2x32`) is written out round by round, so XLA fuses it with the mask into
one elementwise pass, and each hash's 64 bits give four 16-bit draws. An element is dropped when its
draw is under `round(rate * 2**16)`, and the kept ones are scaled by the exact inverse of that keep
probability, so the expected output still equals the input. The rate is thereby rounded to a multiple
of 2**-16 (0.1 drops with probability 6554 / 65536 = 0.1000061; flax's bernoulli rounds to 2**-23).

The draws are a function of (the rng, the element's index) alone, so they do not depend on how an
array is sharded or batched. Same interface as `nn.Dropout` (module name `Dropout_<n>`, rng from the
"dropout" collection), so the model's call sites read as before.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# Which masks a given rng draws, recorded in the fingerprint of every stage with dropout on
# (`pipeline.dropout_masks`): a workdir made with other masks is not resumed or reused. Change it with
# the draws.
MASKS = "threefry-2x32 16-bit draws keyed by the key data of the site rng (2026-12-08)"

DRAW_BITS = 16
DRAW_LEVELS = 2**DRAW_BITS
DRAWS_PER_HASH = 64 // DRAW_BITS

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's rotation constants, by round group
_KEY_PARITY = np.uint32(0x1BD11BDA)


def _rotate_left(x, bits: int):
  return (x << np.uint32(bits)) | (x >> np.uint32(32 - bits))


def threefry2x32(key1, key2, count1, count2):
  """Threefry-2x32, 20 rounds: the two 32-bit output words of the 64-bit counter (count1, count2)
  under the key (key1, key2); all uint32, broadcast together. Unrolled, unlike JAX's CPU lowering."""
  keys = (key1, key2, key1 ^ key2 ^ _KEY_PARITY)
  x0, x1 = count1 + keys[0], count2 + keys[1]
  for group in range(5):
    for rotation in _ROTATIONS[group % 2]:
      x0 = x0 + x1
      x1 = _rotate_left(x1, rotation) ^ x0
    x0 = x0 + keys[(group + 1) % 3]
    x1 = x1 + keys[(group + 2) % 3] + np.uint32(group + 1)
  return x0, x1


def drop_threshold(rate: float) -> int:
  """Draws (of 0 .. 2**16 - 1) below this drop their element."""
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"dropout rate {rate}: expected 0 <= rate < 1")
  return round(rate * DRAW_LEVELS)


def keep_probability(rate: float) -> float:
  """The exact probability that an element is kept at `rate` (after the rounding to 2**-16)."""
  return 1.0 - drop_threshold(rate) / DRAW_LEVELS


def hash_key(rng) -> tuple[jax.Array, jax.Array]:
  """The (key1, key2) of the draws' hash: a Threefry key's own two words (the rng a site gets is already
  hashed apart from every other site's), other kinds (rbg) through `jax.random.bits`. Until 2026-12-08
  every kind went through `jax.random.bits(rng, (2,))`: one more Threefry hash per site, which JAX's CPU
  backend compiles as a rolled loop (a sixth of a tiny MAML step's compile time, `python -m
  benchmarks.bench_compile`)."""
  if jax.random.key_impl(rng) == jax.random.key_impl(jax.random.key(0, impl="threefry2x32")):
    key1, key2 = jax.random.key_data(rng)
  else:
    key1, key2 = jax.random.bits(rng, (2,), jnp.uint32)
  return key1, key2


def random_draws(rng, shape: tuple[int, ...]) -> jax.Array:
  """uint32 array of `shape` holding independent uniform 16-bit draws. Along the last axis, hash i of
  a row (counter: its index among all the array's hashes) gives elements 4i .. 4i + 3, from its first
  word's low and high halves, then its second word's."""
  *lead, last = shape
  hashes = (*lead, -(-last // DRAWS_PER_HASH))
  if math.prod(hashes) >= 2**32:
    raise ValueError(f"dropout over {shape}: more than 2**32 hashes; split the array")
  with jax.named_scope("random_draws"):  # what profiles (benchmarks/bench_steps.py) count as dropout RNG
    key1, key2 = hash_key(rng)
    counter = jax.lax.iota(jnp.uint32, math.prod(hashes)).reshape(hashes)
    word1, word2 = threefry2x32(key1, key2, jnp.zeros_like(counter), counter)
    low = np.uint32(DRAW_LEVELS - 1)
    halves = (word1 & low, word1 >> np.uint32(DRAW_BITS), word2 & low, word2 >> np.uint32(DRAW_BITS))
    return jnp.stack(halves, axis=-1).reshape(*lead, -1)[..., :last]


def keep_mask(rng, shape: tuple[int, ...], rate: float) -> jax.Array:
  """Boolean mask of `shape`, True with probability `keep_probability(rate)`, independently per element."""
  return random_draws(rng, shape) >= drop_threshold(rate)


def dropout(rng, x: jax.Array, rate: float) -> jax.Array:
  """Zeroes each element of `x` with probability ~`rate` and scales the rest by 1 / keep probability."""
  if rate == 0.0:
    return x
  scale = jnp.asarray(1.0 / keep_probability(rate), x.dtype)
  return jnp.where(keep_mask(rng, x.shape, rate), x * scale, jnp.zeros_like(x))


class Dropout(nn.Module):
  """`nn.Dropout(rate)` with the draws above (no broadcast_dims: T5 has none)."""

  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    return dropout(self.make_rng("dropout"), x, self.rate)
