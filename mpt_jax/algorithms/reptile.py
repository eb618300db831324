"""Reptile on the prompt: K inner SGD steps per task, meta-gradient (theta - phi) / inner_lr.

Dividing by inner_lr makes the meta-gradient the sum of the K inner gradients taken along the inner
trajectory (for K = 1 exactly the support gradient at theta), so the outer optimizer sees a gradient of
the usual scale whatever the inner learning rate. The reference fed the same quantity to Adafactor.
Tasks are vmapped; the meta-gradient is the mean over tasks, as in the reference (it added each task's
(theta - phi) / inner_lr scaled by 1 / gradient_accumulation_steps, its number of tasks per step; its
MAML summed instead, see maml.py). There is no query set and no differentiation through the inner loop.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mpt_jax.algorithms import common
from mpt_jax.algorithms.maml import check_episode, make_inner_loop


def make_reptile_grad_fn(loss_fn: common.LossFn, *, inner_lr: float) -> common.GradFn:
  """grad_fn(prompt, frozen_params, episode {"support": [T, K, b, ...]}, rng, shard_index).

  metrics: "loss" = support loss, mean over the K inner steps and the tasks.
  """
  if not inner_lr > 0:
    raise ValueError(f"Reptile needs inner_lr > 0 (its meta-gradient divides by it), got {inner_lr}")
  # Nothing differentiates through this loop, so neither first_order nor remat matter here.
  adapt = make_inner_loop(loss_fn, inner_lr)

  def grad_fn(prompt, frozen_params, episode, rng, shard_index):
    num_tasks, num_inner_steps = check_episode(episode, needs_query=False)
    rngs = common.task_rngs(rng, num_tasks, shard_index)

    def task_update(support, task_rng):
      inner_rngs, _ = common.inner_and_outer_rngs(task_rng, num_inner_steps)
      phi, inner_losses = adapt(prompt, frozen_params, support, inner_rngs)
      return (prompt - phi) / inner_lr, jnp.mean(inner_losses)

    grads, losses = jax.vmap(task_update)(episode["support"], rngs)
    return jnp.mean(grads, axis=0), {"loss": jnp.mean(losses)}

  return grad_fn


def make_reptile_step(
  loss_fn: common.LossFn,
  optimizer: optax.GradientTransformation,
  *,
  inner_lr: float,
  axis_name: str | None = None,
) -> common.StepFn:
  """`step(state, frozen_params, episode, rng) -> (state, metrics)` of Reptile."""
  return common.make_step(make_reptile_grad_fn(loss_fn, inner_lr=inner_lr), optimizer, axis_name=axis_name)
