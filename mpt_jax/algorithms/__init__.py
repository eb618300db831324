"""Prompt-tuning and meta-learning steps (PT, MTL, MAML, first-order MAML, Reptile) as pure functions.

`make_step(method, loss_fn, optimizer, ...)` builds `step(state, frozen_params, batch, rng) ->
(state, metrics)` for any method; compile it with `jit_step` (or shard it with mpt_jax.parallel).
"""

from __future__ import annotations

import optax

from mpt_jax import study
from mpt_jax.algorithms.common import (
  OBJECTIVES,
  Diverged,
  PromptState,
  apply_gradient,
  check_update,
  guard_failure,
  init_grid_state,
  init_state,
  jit_step,
  make_grid_step,
  make_loss_fn,
)
from mpt_jax.algorithms.maml import make_maml_grad_fn, make_maml_step
from mpt_jax.algorithms.pt import make_mtl_step, make_pt_grad_fn, make_pt_step
from mpt_jax.algorithms.reptile import make_reptile_grad_fn, make_reptile_step

METHODS = study.METHODS


def make_step(
  method: str,
  loss_fn,
  optimizer: optax.GradientTransformation,
  *,
  inner_lr: float | None = None,
  remat: bool = False,
  axis_name: str | None = None,
):
  """The (unjitted) step of `method`; meta-learning methods need `inner_lr`.

  remat: rematerialize each inner step (MAML/FoMAML; no effect elsewhere).
  axis_name: build the per-device body of a data-parallel step (see mpt_jax.parallel).
  """
  if method in ("pt", "mtl"):
    return make_pt_step(loss_fn, optimizer, axis_name=axis_name)
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
  if inner_lr is None:
    raise ValueError(f"method {method!r} needs inner_lr (the inner-loop SGD learning rate)")
  if method == "reptile":
    return make_reptile_step(loss_fn, optimizer, inner_lr=inner_lr, axis_name=axis_name)
  return make_maml_step(
    loss_fn, optimizer, inner_lr=inner_lr, first_order=(method == "fomaml"), remat=remat, axis_name=axis_name
  )


__all__ = [
  "METHODS",
  "OBJECTIVES",
  "Diverged",
  "PromptState",
  "apply_gradient",
  "check_update",
  "guard_failure",
  "init_grid_state",
  "init_state",
  "jit_step",
  "make_grid_step",
  "make_loss_fn",
  "make_maml_grad_fn",
  "make_maml_step",
  "make_mtl_step",
  "make_pt_grad_fn",
  "make_pt_step",
  "make_reptile_grad_fn",
  "make_reptile_step",
  "make_step",
]
