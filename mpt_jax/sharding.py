"""Where the frozen weights live on a 2-D mesh ('data', 'model'): partition rules by parameter name.

The prompt, its optimizer state and every batch are small and stay as parallel.py places them
(replicated, or split over 'data'); the frozen weights are what outgrows one device (T5-XXL: 11B
parameters, 22 GB in bfloat16). Each weight is split over the 'model' axis by a rule matched on its
name, as t5x's logical axis rules do (`heads`, `mlp` and `vocab` -> 'model'). The rules are the model's
(`partition_rules` of the model protocol, mpt_jax/model/protocol.py); T5's (model/t5.py PARTITION_RULES,
the default here) are the Megatron layout, in which each device holds a slice of every attention head
group and of the feed-forward hidden units, so a layer's matmuls run on the slices and XLA inserts one
reduction per block, never gathering a whole weight.

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

from mpt_jax.model.protocol import MODEL_AXIS, PartitionRules
from mpt_jax.model.t5 import PARTITION_RULES

_M = MODEL_AXIS


def param_path(path) -> str:
  """'encoder/block_0/layer_0/SelfAttention/q/kernel' from a jax tree path."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def partition_spec(
  name: str, shape: Sequence[int], model_size: int, rules: PartitionRules = PARTITION_RULES
) -> P:
  """The PartitionSpec of the parameter `name` of `shape` on a 'model' axis of `model_size` devices."""
  for pattern, trailing in rules:
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
    f"parameter {name}: no partition rule names it (the model's partition_rules, T5's in "
    f"mpt_jax/model/t5.py PARTITION_RULES); add one saying "
    f"which of its dimensions splits over the 'model' axis, or () to keep it whole on every device"
  )


def frozen_specs(params, model_size: int, rules: PartitionRules = PARTITION_RULES):
  """The tree of PartitionSpecs of a frozen params tree (arrays or jax.ShapeDtypeStructs)."""
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: partition_spec(param_path(path), np.shape(leaf), model_size, rules), params
  )


def _nbytes(leaf) -> int:
  return math.prod(np.shape(leaf)) * np.dtype(leaf.dtype).itemsize


def bytes_per_device(params, model_size: int, rules: PartitionRules = PARTITION_RULES) -> int:
  """Bytes of the frozen weights on each device of a 'model' axis of `model_size` (shapes suffice)."""
  specs = frozen_specs(params, model_size, rules)
  total = 0
  for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))):
    total += _nbytes(leaf) // (model_size if any(spec) else 1)
  return total


def describe(params, model_size: int, rules: PartitionRules = PARTITION_RULES) -> str:
  """'frozen weights: 2.9 GB, 0.74 GB per device (split over 4); whole on every device: ...' for the log."""
  total = sum(_nbytes(leaf) for leaf in jax.tree.leaves(params))
  text = f"frozen weights: {total / 1e9:.3g} GB"
  if model_size <= 1:
    return text + " on every device"
  per_device = bytes_per_device(params, model_size, rules)
  whole = _unsplit_by_size(params, model_size, rules)
  text += f", {per_device / 1e9:.3g} GB per device (split over {model_size} on the 'model' axis)"
  if whole:
    text += f"; not divisible by {model_size}, whole on every device: {', '.join(whole[:4])}"
    text += " ..." if len(whole) > 4 else ""
  return text


def _unsplit_by_size(params, model_size: int, rules: PartitionRules) -> list[str]:
  """Parameters a rule would split that stay whole because a dimension does not divide."""
  found = []

  def check(path, leaf):
    name = param_path(path)
    rule = next((t for pattern, t in rules if re.search(pattern, name)), ())
    if any(rule) and not any(partition_spec(name, np.shape(leaf), model_size, rules)):
      found.append(name)

  jax.tree_util.tree_map_with_path(check, params)
  return found


def shardings(mesh, specs):
  """NamedShardings on `mesh` of a tree of PartitionSpecs."""
  return jax.tree.map(
    lambda spec: jax.sharding.NamedSharding(mesh, spec), specs, is_leaf=lambda x: isinstance(x, P)
  )
