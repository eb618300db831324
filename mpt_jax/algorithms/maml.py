"""MAML and first-order MAML on the prompt: grad-of-grad through a scanned inner loop.

Per task: K inner SGD steps on the prompt over the support set (support [K, b, ...], one `lax.scan`
step per [b, ...] slice), then the query loss at the adapted prompt phi. The meta-gradient is
d(query loss)/d(theta) through the whole inner loop (second order: it contains the Hessian-vector
products of the inner losses). First-order MAML stops the gradient of the inner gradients, so
d(phi)/d(theta) = I and the meta-gradient is the query gradient at phi.

Tasks are vmapped (support [T, K, b, ...], query [T, q, ...]); the meta-gradient is the MEAN over the
meta-batch's tasks. The reference summed them: under the study's Adafactor the two give the same
update, since Adafactor divides the gradient by the root of its own running second moment (scale
invariant up to eps1 = 1e-30) and clips the update's RMS, not the gradient's (tests/test_optim.py
checks this). Under SGD or AdamW's eps the mean is the scale that does not grow with T.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from mpt_jax.algorithms import common

# adapt(prompt, frozen_params, support [K, b, ...], rngs [K]) -> (phi, inner losses [K])
AdaptFn = Callable[..., tuple[jax.Array, jax.Array]]


def make_inner_loop(
  loss_fn: common.LossFn, inner_lr: float, *, first_order: bool = False, remat: bool = False
) -> AdaptFn:
  """K SGD steps on the prompt, one per leading slice of the support set, as a `lax.scan`.

  first_order: stop the gradient through the inner gradients (first-order MAML).
  remat: wrap each inner step in `jax.checkpoint`: the backward pass keeps only each step's input
  prompt and recomputes the step's activations, so second-order MAML holds one inner step's
  activations at a time instead of K.
  """

  def inner_step(frozen_params, phi, batch, rng):
    loss, grad = jax.value_and_grad(loss_fn)(phi, frozen_params, batch, rng)
    if first_order:
      grad = jax.lax.stop_gradient(grad)
    return phi - inner_lr * grad, loss

  if remat:
    inner_step = jax.checkpoint(inner_step)

  def adapt(prompt, frozen_params, support, rngs):
    def body(phi, batch_and_rng):
      return inner_step(frozen_params, phi, *batch_and_rng)

    return jax.lax.scan(body, prompt, (support, rngs))

  return adapt


def check_episode(episode, *, needs_query: bool) -> tuple[int, int]:
  """(T, K) of a meta-batch `{"support": [T, K, b, L], "query": [T, q, L]}`; a clear error otherwise."""
  keys = {"support", "query"} if needs_query else {"support"}
  if not isinstance(episode, dict) or not keys <= set(episode):
    got = sorted(episode) if isinstance(episode, dict) else type(episode).__name__
    raise ValueError(f"meta-batch must be a dict with keys {sorted(keys)} (docs/CONTRACTS.md), got {got}")
  num_tasks = common.leading_size(episode, "meta-batch (leading axis = tasks)")
  # Every batch array is [B, L] (docs/CONTRACTS.md), so support arrays are [T, K, b, L].
  support_shapes = [jnp.shape(x) for x in jax.tree_util.tree_leaves(episode["support"])]
  num_inner_steps = {shape[1] if len(shape) >= 4 else None for shape in support_shapes}
  if len(num_inner_steps) != 1 or None in num_inner_steps:
    raise ValueError(
      f"meta-batch support arrays must be [T, K, b, L] (T tasks, K inner steps of b "
      f"examples) with one K, got shapes "
      f"{jax.tree_util.tree_map(jnp.shape, episode['support'])}"
    )
  num_inner_steps = num_inner_steps.pop()
  return num_tasks, num_inner_steps


def make_maml_grad_fn(
  loss_fn: common.LossFn, *, inner_lr: float, first_order: bool = False, remat: bool = False
) -> common.GradFn:
  """grad_fn(prompt, frozen_params, episode, rng, shard_index) -> (meta-gradient, metrics).

  metrics: "loss" (query loss after adaptation) and "inner_loss" (support loss, mean over the K inner
  steps), both means over tasks.
  """
  adapt = make_inner_loop(loss_fn, inner_lr, first_order=first_order, remat=remat)

  def task_query_loss(prompt, frozen_params, task, task_rng, num_inner_steps):
    inner_rngs, outer_rng = common.inner_and_outer_rngs(task_rng, num_inner_steps)
    phi, inner_losses = adapt(prompt, frozen_params, task["support"], inner_rngs)
    return loss_fn(phi, frozen_params, task["query"], outer_rng), jnp.mean(inner_losses)

  def grad_fn(prompt, frozen_params, episode, rng, shard_index):
    num_tasks, num_inner_steps = check_episode(episode, needs_query=True)
    rngs = common.task_rngs(rng, num_tasks, shard_index)

    def meta_loss(prompt):
      query_losses, inner_losses = jax.vmap(
        lambda task, task_rng: task_query_loss(prompt, frozen_params, task, task_rng, num_inner_steps)
      )(episode, rngs)
      return jnp.mean(query_losses), jnp.mean(inner_losses)

    (loss, inner_loss), grad = jax.value_and_grad(meta_loss, has_aux=True)(prompt)
    return grad, {"loss": loss, "inner_loss": inner_loss}

  return grad_fn


def make_maml_step(
  loss_fn: common.LossFn,
  optimizer: optax.GradientTransformation,
  *,
  inner_lr: float,
  first_order: bool = False,
  remat: bool = False,
  axis_name: str | None = None,
) -> common.StepFn:
  """`step(state, frozen_params, episode, rng) -> (state, metrics)` of (first-order) MAML."""
  grad_fn = make_maml_grad_fn(loss_fn, inner_lr=inner_lr, first_order=first_order, remat=remat)
  return common.make_step(grad_fn, optimizer, axis_name=axis_name)
