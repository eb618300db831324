"""What every prompt step shares: the state, the optimizer update with its NaN guard, the rng plan.

A step is `step(state, frozen_params, batch, rng) -> (state, metrics)` (docs/CONTRACTS.md), built from a
method-specific gradient function

  grad_fn(prompt, frozen_params, batch, rng, shard_index) -> (grad, metrics)   # metrics has "loss"

by `make_step`. `shard_index` is this device's index along the data axis (0 without one); methods use it
so that an example or task draws the same dropout rng whether the batch is sharded or not.

Data parallel (mpt_jax/parallel.py) runs the step per device inside `jax.shard_map` with
`axis_name="data"`. There the prompt arrives replicated ("invariant" to shard_map's varying-manual-axes
check), and the gradient of a per-device loss w.r.t. an invariant input comes back already summed over
devices (the transpose of the implicit broadcast is a psum): a further pmean would double it, and inside
an inner loop every task would adapt with the sum of all devices' gradients. So the step first makes the
prompt device-local (`lax.pcast(..., to="varying")`), takes the per-device gradient w.r.t. that, and
averages it across devices exactly once with `lax.pmean`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from mpt_jax import optim

Params = Any
Batch = Mapping[str, Any]
# loss_fn(prompt, frozen_params, batch, rng) -> float32 scalar: the only thing the algorithms know about
# the model.
LossFn = Callable[[jax.Array, Params, Batch, jax.Array], jax.Array]
GradFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
StepFn = Callable[..., tuple["PromptState", dict[str, jax.Array]]]


@flax.struct.dataclass
class PromptState:
  """What a prompt-training run carries from step to step (and checkpoints)."""
  step: jax.Array  # int32 scalar: updates applied so far (a skipped non-finite step does not count)
  prompt: jax.Array  # [P, d_model] float32
  opt_state: optax.OptState


def init_state(prompt: jax.Array, optimizer: optax.GradientTransformation) -> PromptState:
  prompt = jnp.array(prompt)  # a copy: donating the state to a step must not delete the caller's prompt
  if prompt.ndim != 2:
    raise ValueError(f"init_state: the prompt must be [num_prompt_tokens, d_model], got shape "
                     f"{prompt.shape}")
  return PromptState(step=jnp.zeros((), jnp.int32), prompt=prompt, opt_state=optimizer.init(prompt))


def make_loss_fn(model, *, deterministic: bool, placement: str = "prepend") -> LossFn:
  """The T5 token cross-entropy as a `loss_fn(prompt, frozen_params, batch, rng)`.

  deterministic=False turns dropout on, driven by the rng each algorithm passes (distinct per task, per
  inner step and for the outer pass).
  """
  from mpt_jax.model.loss import seq2seq_loss  # the model is only needed here, not by the algorithms

  def loss_fn(prompt, frozen_params, batch, rng):
    return seq2seq_loss(model, frozen_params, prompt, batch, rng, deterministic=deterministic,
                        placement=placement)

  return loss_fn


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def apply_gradient(state: PromptState, grad: jax.Array, metrics: dict[str, jax.Array],
                   optimizer: optax.GradientTransformation) -> tuple[PromptState, dict[str, jax.Array]]:
  """One optimizer update of the prompt, skipped (state returned as is) when anything is non-finite.

  The guard makes a NaN/inf loss or gradient harmless to the saved state: the host sees
  `metrics["is_finite"] == False` and stops (`check_finite`) with the last good state in hand.
  """
  grad_norm = optax.tree.norm(grad)
  updates, opt_state = optimizer.update(grad, state.opt_state, state.prompt)
  new_state = PromptState(step=state.step + 1, prompt=optax.apply_updates(state.prompt, updates),
                          opt_state=opt_state)
  is_finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & _all_finite(new_state)
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(is_finite, new, old), new_state, state)
  metrics = {**metrics, "grad_norm": grad_norm, "is_finite": is_finite,
             "learning_rate": _learning_rate_or_nan(state.opt_state)}
  return new_state, metrics


def _learning_rate_or_nan(opt_state) -> jax.Array:
  try:
    return jnp.asarray(optim.get_learning_rate(opt_state), jnp.float32)
  except (AttributeError, KeyError, TypeError):
    return jnp.asarray(jnp.nan, jnp.float32)


def make_step(grad_fn: GradFn, optimizer: optax.GradientTransformation, *,
              axis_name: str | None = None) -> StepFn:
  """`step(state, frozen_params, batch, rng) -> (state, metrics)` from a method's gradient function.

  With `axis_name`, the step is the per-device body of a `jax.shard_map` over that mesh axis: the
  batch is this device's shard, the state, frozen params and rng are replicated, and the gradient and
  metrics are averaged across devices once (see the module docstring for why the prompt is made
  device-local first).
  """

  def step(state: PromptState, frozen_params: Params, batch: Batch, rng: jax.Array):
    prompt = state.prompt
    shard_index = jnp.zeros((), jnp.int32)
    if axis_name is not None:
      prompt = jax.lax.pcast(prompt, axis_name, to="varying")
      shard_index = jax.lax.axis_index(axis_name)
    grad, metrics = grad_fn(prompt, frozen_params, batch, rng, shard_index)
    if axis_name is not None:
      grad, metrics = jax.lax.pmean((grad, metrics), axis_name)
    return apply_gradient(state, grad, metrics, optimizer)

  return step


def jit_step(step: StepFn, *, donate_state: bool = True) -> StepFn:
  """The step compiled once per shape; the input state's buffers are reused for the output state.

  Donation means the caller must not touch the state it passed in (keep the returned one); the frozen
  params (argument 1) are never donated.
  """
  return jax.jit(step, donate_argnums=(0,) if donate_state else ())


def check_finite(metrics: Mapping[str, Any], step: int) -> None:
  """Host side: raise FloatingPointError naming the step when the step's loss or gradient was not finite.

  The state returned by that step is the state before it (see `apply_gradient`), so it is safe to save.
  """
  is_finite = np.asarray(jax.device_get(metrics["is_finite"]))
  if is_finite.all():
    return
  loss = np.asarray(jax.device_get(metrics["loss"]))
  grad_norm = np.asarray(jax.device_get(metrics["grad_norm"]))
  where = "" if is_finite.ndim == 0 else f" in runs {np.flatnonzero(~is_finite).tolist()}"
  raise FloatingPointError(
      f"step {step}: non-finite loss or gradient{where} (loss={loss.tolist()}, "
      f"grad_norm={grad_norm.tolist()}); the update was skipped, so the returned state is the one before "
      f"this step. Lower the learning rate, check the batch at this step, or use float32.")


def leading_size(tree, what: str) -> int:
  """The common leading dimension of every array in `tree`; a clear error if they differ."""
  sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for x in jax.tree_util.tree_leaves(tree)}
  if len(sizes) != 1 or None in sizes:
    shapes = jax.tree_util.tree_map(jnp.shape, tree)
    raise ValueError(f"{what}: every array needs the same leading dimension, got shapes {shapes}")
  return sizes.pop()


def example_rng(rng: jax.Array, shard_index: jax.Array) -> jax.Array:
  """The dropout rng of a device's (PT/MTL) batch: the step rng folded with the device index."""
  return jax.random.fold_in(rng, shard_index)


def task_rngs(rng: jax.Array, num_tasks: int, shard_index: jax.Array) -> jax.Array:
  """One rng per task of this device's shard, keyed by the task's global index in the meta-batch.

  Keying by the global index makes the sharded step draw the same dropout as the single-device one.
  """
  global_index = shard_index * num_tasks + jnp.arange(num_tasks, dtype=jnp.int32)
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(global_index)


def inner_and_outer_rngs(task_rng: jax.Array, num_inner_steps: int) -> tuple[jax.Array, jax.Array]:
  """Distinct rngs for a task's K inner steps ([K]) and for its outer (query) pass."""
  return (jax.random.split(jax.random.fold_in(task_rng, 0), num_inner_steps),
          jax.random.fold_in(task_rng, 1))


def make_grid_step(step: StepFn) -> StepFn:
  """R independent runs in one computation: the step vmapped over a leading run axis.

  `grid_step(states [R], frozen_params, batches [R, ...], rngs [R]) -> (states [R], metrics [R])`.
  Each run has its own prompt, optimizer state and learning rate (a leaf of the optimizer state: see
  `init_grid_state`), so e.g. the 4 learning rates of the downstream grid compile once. Runs never
  interact (no mean across them); a non-finite run keeps its old state while the others move on.
  """
  return jax.vmap(step, in_axes=(0, None, 0, 0))


def init_grid_state(prompts: jax.Array, optimizer: optax.GradientTransformation,
                    learning_rates) -> PromptState:
  """States of R runs: `prompts` [R, P, d] (or one [P, d] prompt shared by all) and R learning rates.

  `optimizer` must come from `mpt_jax.optim.make_optimizer` (its learning rate is a state leaf).
  """
  learning_rates = jnp.asarray(learning_rates, jnp.float32)
  if learning_rates.ndim != 1:
    raise ValueError(f"init_grid_state: learning_rates must be a list of R numbers, got shape "
                     f"{learning_rates.shape}")
  num_runs = learning_rates.shape[0]
  prompts = jnp.asarray(prompts)
  if prompts.ndim == 2:
    prompts = jnp.broadcast_to(prompts, (num_runs, *prompts.shape))
  if prompts.ndim != 3 or prompts.shape[0] != num_runs:
    raise ValueError(f"init_grid_state: prompts must be [R={num_runs}, P, d] or [P, d], got "
                     f"{prompts.shape}")
  states = jax.vmap(lambda p: init_state(p, optimizer))(prompts)
  return states.replace(opt_state=optim.set_learning_rate(states.opt_state, learning_rates))
