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
    raise ValueError(f"init_state: the prompt must be [num_prompt_tokens, d_model], got shape {prompt.shape}")
  return PromptState(step=jnp.zeros((), jnp.int32), prompt=prompt, opt_state=optimizer.init(prompt))


# config.downstream.objective: what a classification task's prompt is trained on. "likelihood" is the token
# cross-entropy of the gold (the study's); "label_choice" the cross-entropy of the gold among the task's
# labels (mpt_jax.model.loss.label_choice_loss); "likelihood+label_choice" their sum.
OBJECTIVES = ("likelihood", "label_choice", "likelihood+label_choice")
# A label-choice batch's arrays of the task, not of its examples: [C, L], whatever the batch size.
LABEL_SET_KEYS = ("label_ids", "label_mask")


def make_loss_fn(
  model,
  *,
  deterministic: bool,
  placement: str = "prepend",
  objective: str = "likelihood",
  direction: str = "direct",
) -> LossFn:
  """The T5 loss of a prompt as a `loss_fn(prompt, frozen_params, batch, rng)`: by default the token
  cross-entropy; with a label-choice `objective`, batches carry their task's label set ("label_ids",
  "label_mask") and hold examples in `direction`'s training form (see `label_choice_loss`).

  deterministic=False turns dropout on, driven by the rng each algorithm passes (distinct per task, per
  inner step and for the outer pass); the two terms of "likelihood+label_choice" draw from split rngs.
  """
  # The model is only needed here, not by the algorithms.
  from mpt_jax.model.loss import label_choice_loss, seq2seq_loss

  if objective not in OBJECTIVES:
    raise ValueError(f"objective {objective!r}: expected one of {OBJECTIVES}")

  def likelihood(prompt, frozen_params, batch, rng):
    return seq2seq_loss(
      model, frozen_params, prompt, batch, rng, deterministic=deterministic, placement=placement
    )

  def label_choice(prompt, frozen_params, batch, rng):
    return label_choice_loss(
      model,
      frozen_params,
      prompt,
      batch,
      rng,
      direction=direction,
      deterministic=deterministic,
      placement=placement,
    )

  if objective == "likelihood":
    return likelihood
  if objective == "label_choice":
    return label_choice

  def both(prompt, frozen_params, batch, rng):
    rng_likelihood, rng_choice = (None, None) if rng is None else jax.random.split(rng)
    return likelihood(prompt, frozen_params, batch, rng_likelihood) + label_choice(
      prompt, frozen_params, batch, rng_choice
    )

  return both


def _all_finite(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _rms(x: jax.Array) -> jax.Array:
  """Root mean square, scaled by the largest entry so that squaring a finite 1e30 does not overflow."""
  x = x.astype(jnp.float32)
  largest = jnp.max(jnp.abs(x))
  return largest * jnp.sqrt(jnp.mean(jnp.square(x / jnp.where(largest > 0, largest, 1.0))))


# An update this many times the prompt's RMS (or 1, for a prompt of small entries) is a divergence even
# while float32 still holds it: a learning rate of 1e30 moves the prompt to ~1e30 in one finite step, after
# which T5's layer norms keep the loss finite and make the gradient vanish (a dead run that looks alive).
# A healthy update is about the learning rate at most (Adafactor clips it to RMS 1).
MAX_UPDATE_RATIO = 1e3


def apply_gradient(
  state: PromptState, grad: jax.Array, metrics: dict[str, jax.Array], optimizer: optax.GradientTransformation
) -> tuple[PromptState, dict[str, jax.Array]]:
  """One optimizer update of the prompt, skipped (state returned as is) when it fails the guard: a
  non-finite loss, gradient or new state, or an update over MAX_UPDATE_RATIO times the prompt's RMS.

  The guard keeps a diverging step out of the state: the host sees `metrics["update_ok"] == False` and
  stops (`check_update`) or marks the run failed, with the last good state in hand.
  """
  grad_norm = optax.tree.norm(grad)
  updates, opt_state = optimizer.update(grad, state.opt_state, state.prompt)
  new_state = PromptState(
    step=state.step + 1, prompt=optax.apply_updates(state.prompt, updates), opt_state=opt_state
  )
  prompt_rms, update_rms = _rms(state.prompt), _rms(updates)
  finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm) & _all_finite(new_state)
  update_ok = finite & (update_rms <= MAX_UPDATE_RATIO * jnp.maximum(prompt_rms, 1.0))
  new_state = jax.tree_util.tree_map(lambda new, old: jnp.where(update_ok, new, old), new_state, state)
  metrics = {
    **metrics,
    "grad_norm": grad_norm,
    "update_rms": update_rms,
    "prompt_rms": prompt_rms,
    "update_ok": update_ok,
    "learning_rate": _learning_rate_or_nan(state.opt_state),
  }
  return new_state, metrics


def _learning_rate_or_nan(opt_state) -> jax.Array:
  try:
    return jnp.asarray(optim.get_learning_rate(opt_state), jnp.float32)
  except (AttributeError, KeyError, TypeError):
    return jnp.asarray(jnp.nan, jnp.float32)


def make_step(
  grad_fn: GradFn, optimizer: optax.GradientTransformation, *, axis_name: str | None = None
) -> StepFn:
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


def guard_failure(metrics: Mapping[str, Any]) -> str:
  """Why a step failed the guard, from the host metrics of one run (scalars)."""
  value = lambda key: float(np.asarray(metrics[key]))
  loss, grad_norm, update_rms, prompt_rms = (
    value(k) for k in ("loss", "grad_norm", "update_rms", "prompt_rms")
  )
  if not np.isfinite(loss):
    return f"the loss is {loss}"
  if not np.isfinite(grad_norm):
    return f"the gradient norm is {grad_norm} (the loss, {loss:.4g}, is finite)"
  if not np.isfinite(update_rms):
    return f"the update overflowed (the loss, {loss:.4g}, and the gradient norm, {grad_norm:.4g}, are finite)"
  if update_rms > MAX_UPDATE_RATIO * max(prompt_rms, 1.0):
    return (
      f"the update's RMS, {update_rms:.3g}, is over {MAX_UPDATE_RATIO:g} times the prompt's, "
      f"{prompt_rms:.3g}: the learning rate is far too large"
    )
  return (
    f"the optimizer state overflowed (loss {loss:.4g}, gradient norm {grad_norm:.4g} and update RMS "
    f"{update_rms:.3g} are finite)"
  )


class Diverged(FloatingPointError):
  """A step failed the guard. `step` counts updates from 1, as metrics.jsonl does."""

  def __init__(self, step: int, reason: str, where: str = ""):
    self.step, self.reason = int(step), reason
    super().__init__(
      f"step {self.step}{where}: {reason}. The update was skipped, so the state in hand is "
      f"the one before this step. Lower the learning rate, check the batch at this step, or "
      f"use float32."
    )


def check_update(metrics: Mapping[str, Any], step: int) -> None:
  """Host side: raises Diverged naming `step` (counted from 1) when the step failed the guard."""
  ok = np.asarray(jax.device_get(metrics["update_ok"]))
  if ok.all():
    return
  host = jax.device_get(dict(metrics))
  if ok.ndim == 0:
    raise Diverged(step, guard_failure(host))
  bad = np.flatnonzero(~ok)
  first = {key: np.asarray(value)[bad[0]] for key, value in host.items()}
  raise Diverged(step, guard_failure(first), f" in runs {bad.tolist()} (the first shown)")


def leading_size(tree, what: str) -> int:
  """The common leading dimension of every array in `tree` (a batch's label set, LABEL_SET_KEYS, aside);
  a clear error if they differ."""
  if isinstance(tree, Mapping):
    tree = {key: value for key, value in tree.items() if key not in LABEL_SET_KEYS}
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
  return (jax.random.split(jax.random.fold_in(task_rng, 0), num_inner_steps), jax.random.fold_in(task_rng, 1))


def make_grid_step(step: StepFn, runs_at_once: int | None = None) -> StepFn:
  """R independent runs in one computation over a leading run axis: the step vmapped over all of them
  (`runs_at_once` None), or `lax.map` over them `runs_at_once` at a time (vmapped within a group; the
  remainder in a group of its own), the same step body compiled once either way.

  `grid_step(states [R], frozen_params, batches [R, ...], rngs [R]) -> (states [R], metrics [R])`.
  Each run has its own prompt, optimizer state and learning rate (a leaf of the optimizer state: see
  `init_grid_state`), so e.g. the 4 learning rates of the downstream grid compile once. Runs never
  interact (no mean across them); a non-finite run keeps its old state while the others move on.

  On a CPU, one run at a time is faster than all of them vmapped (benchmarks/results/grid_small.md:
  vmapping 4 runs of T5-small shape cost ~1.6x their time one after another); on a GPU or TPU, the
  vmapped runs fill the device (`grid_runs_at_once` picks by backend).
  """
  if runs_at_once is None:
    return jax.vmap(step, in_axes=(0, None, 0, 0))
  if runs_at_once < 1:
    raise ValueError(f"runs_at_once={runs_at_once}: expected None (all) or a group size >= 1")

  def grid_step(states, frozen_params, batches, rngs):
    def one(run):
      return step(run[0], frozen_params, run[1], run[2])

    return jax.lax.map(one, (states, batches, rngs), batch_size=None if runs_at_once == 1 else runs_at_once)

  return grid_step


def grid_runs_at_once(setting: int, backend: str | None = None) -> int | None:
  """`make_grid_step`'s group size for config.downstream.runs_at_once: 0 (auto) is one run at a time on
  a CPU and every run at once on another backend; n > 0 is n at a time."""
  if setting < 0:
    raise ValueError(f"downstream.runs_at_once={setting}: expected 0 (auto) or a group size >= 1")
  if setting > 0:
    return setting
  return 1 if (backend or jax.default_backend()) == "cpu" else None


def init_grid_state(
  prompts: jax.Array, optimizer: optax.GradientTransformation, learning_rates
) -> PromptState:
  """States of R runs: `prompts` [R, P, d] (or one [P, d] prompt shared by all) and R learning rates.

  `optimizer` must come from `mpt_jax.optim.make_optimizer` (its learning rate is a state leaf).
  """
  learning_rates = jnp.asarray(learning_rates, jnp.float32)
  if learning_rates.ndim != 1:
    raise ValueError(
      f"init_grid_state: learning_rates must be a list of R numbers, got shape {learning_rates.shape}"
    )
  num_runs = learning_rates.shape[0]
  prompts = jnp.asarray(prompts)
  if prompts.ndim == 2:
    prompts = jnp.broadcast_to(prompts, (num_runs, *prompts.shape))
  if prompts.ndim != 3 or prompts.shape[0] != num_runs:
    raise ValueError(f"init_grid_state: prompts must be [R={num_runs}, P, d] or [P, d], got {prompts.shape}")
  states = jax.vmap(lambda p: init_state(p, optimizer))(prompts)
  return states.replace(opt_state=optim.set_learning_rate(states.opt_state, learning_rates))
