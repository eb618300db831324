"""Prompt tuning (PT) and multi-task learning (MTL): a plain gradient step on the prompt.

MTL is the same step; only its batches differ (examples drawn across all source tasks), which is the
data pipeline's business.
"""

from __future__ import annotations

import jax
import optax

from mpt_jax.algorithms import common


def make_pt_grad_fn(loss_fn: common.LossFn) -> common.GradFn:
  """grad_fn(prompt, frozen_params, batch [B, ...], rng, shard_index) -> (dloss/dprompt, {"loss"}).

  Sharded over devices, each device takes the token mean of its own shard and the step averages those
  means: equal to the single-device loss when the shards hold equally many target tokens (the usual
  data-parallel approximation otherwise). Dropout draws differ from the unsharded run (one rng per
  device).
  """

  def grad_fn(prompt, frozen_params, batch, rng, shard_index):
    common.leading_size(batch, "PT/MTL batch")
    loss, grad = jax.value_and_grad(loss_fn)(
      prompt, frozen_params, batch, common.example_rng(rng, shard_index)
    )
    return grad, {"loss": loss}

  return grad_fn


def make_pt_step(
  loss_fn: common.LossFn, optimizer: optax.GradientTransformation, *, axis_name: str | None = None
) -> common.StepFn:
  """`step(state, frozen_params, batch [B, ...], rng) -> (state, metrics)` of prompt tuning."""
  return common.make_step(make_pt_grad_fn(loss_fn), optimizer, axis_name=axis_name)


make_mtl_step = make_pt_step
