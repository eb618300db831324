"""Where the frozen T5's weights live on a 2-D mesh ('data', 'model'): partition rules by parameter name.

The prompt, its optimizer state and every batch are small and stay as parallel.py places them
(replicated, or split over 'data'); the frozen weights are what outgrows one device (T5-XXL: 11B
parameters, 22 GB in bfloat16). Each weight is split over the 'model' axis by a rule matched on its
name, as t5x's logical axis rules do (`heads`, `mlp` and `vocab` -> 'model'): the Megatron layout,
in which each device holds a slice of every attention head group and of the feed-forward hidden units,
so a layer's matmuls run on the slices and XLA inserts one reduction per block, never gathering a
whole weight.

  attention q, k, v [d_model, heads * d_kv]     split by heads        P(None, 'model')
  attention o       [heads * d_kv, d_model]     split by heads        P('model', None)
  feed-forward wi*  [d_model, d_ff]             split by hidden unit  P(None, 'model')
  feed-forward wo   [d_ff, d_model]             split by hidden unit  P('model', None)
  shared embedding  [vocab, d_model]            split by vocabulary   P('model', None)
  lm_head           [d_model, vocab]            split by vocabulary   P(None, 'model')
  layer norms, relative attention biases        whole on every device (kilobytes)

A rule names the trailing dimensions, so a weight stacked over layers (a scanned T5: a leading layer
axis) is split the same way. A dimension that does not divide over the 'model' axis is not split (the
weight is then whole on every device, and `describe` says so). A parameter no rule names is an error:
a new weight is placed on purpose, not by default.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import PartitionSpec as P

MODEL_AXIS = "model"
_M = MODEL_AXIS

# (pattern searched in the '/'-joined parameter path, spec of its trailing dimensions)
PARTITION_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
  (r"(SelfAttention|EncDecAttention)/(q|k|v)/kernel$", (None, _M)),
  (r"(SelfAttention|EncDecAttention)/o/kernel$", (_M, None)),
  (r"DenseReluDense/wi(_0|_1)?/kernel$", (None, _M)),
  (r"DenseReluDense/wo/kernel$", (_M, None)),
  (r"(^|/)shared/embedding$", (_M, None)),
  (r"(^|/)lm_head/kernel$", (None, _M)),
  (r"relative_attention_bias/embedding$", ()),
  (r"layer_norm/weight$", ()),
)


def param_path(path) -> str:
  """'encoder/block_0/layer_0/SelfAttention/q/kernel' from a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def partition_spec(name: str, shape: Sequence[int], model_size: int) -> P:
  """The PartitionSpec of the parameter `name` of `shape` on a 'model' axis of `model_size` devices."""
  for pattern, trailing in PARTITION_RULES:
    if re.search(pattern, name):
      if len(trailing) > len(shape):
        raise ValueError(
          f"parameter {name} of shape {tuple(shape)}: its rule {trailing} names more dimensions"
        )
      spec = (None,) * (len(shape) - len(trailing)) + tuple(trailing)
      if model_size <= 1 or not any(spec):
        return P()
      if any(axis == _M and shape[i] % model_size for i, axis in enumerate(spec)):
        return P()  # does not divide: whole on every device
      return P(*spec)
  raise ValueError(
    f"parameter {name}: no partition rule names it (mpt_jax/sharding.py PARTITION_RULES); add one saying "
    f"which of its dimensions splits over the 'model' axis, or () to keep it whole on every device"
  )


def frozen_specs(params, model_size: int):
  """The tree of PartitionSpecs of a frozen params tree (arrays or jax.ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: partition_spec(param_path(path), np.shape(leaf), model_size), params
  )


def _nbytes(leaf) -> int:
  return math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize


def bytes_per_device(params, model_size: int) -> int:
  """Bytes of the frozen weights on each device of a 'model' axis of `model_size` (shapes suffice)."""
  specs = frozen_specs(params, model_size)
  total = 0
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    total += _nbytes(leaf) // (model_size if any(spec) else 1)
  return total


def describe(params, model_size: int) -> str:
  """'frozen weights: 2.9 GB, 0.74 GB per device (split over 4); whole on every device: ...' for the log."""
  total = sum(_nbytes(leaf) for leaf in jax.tree.leaves(params))
  text = f"frozen weights: {total / 1e9:.3g} GB"
  if model_size <= 1:
    return text + " on every device"
  per_device = bytes_per_device(params, model_size)
  whole = _unsplit_by_size(params, model_size)
  text += f", {per_device / 1e9:.3g} GB per device (split over {model_size} on the 'model' axis)"
  if whole:
    text += f"; not divisible by {model_size}, whole on every device: {', '.join(whole[:4])}"
    text += " ..." if len(whole) > 4 else ""
  return text


def _unsplit_by_size(params, model_size: int) -> list[str]:
  """Parameters a rule would split that stay whole because a dimension does not divide."""
  found = []

  def check(path, leaf):
    name = param_path(path)
    rule = next((t for pattern, t in PARTITION_RULES if re.search(pattern, name)), ())
    if any(rule) and not any(partition_spec(name, np.shape(leaf), model_size)):
      found.append(name)

  jax.tree_util.tree_map_with_path(check, params)
  return found


def shardings(mesh, specs):
  """NamedShardings on `mesh` of a tree of PartitionSpecs."""
  return jax.tree.map(
    lambda spec: jax.sharding.NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
  )
