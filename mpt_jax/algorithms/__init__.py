"""Prompt-tuning and meta-learning steps (PT, MTL, MAML, first-order MAML, Reptile) as pure functions.

Each method's gradient function lives here; which method uses which, with its options and defaults, is
the table in mpt_jax/methods.py, whose `make_step(method, loss_fn, optimizer, ...)` builds `step(state,
frozen_params, batch, rng) -> (state, metrics)`; compile it with `jit_step` (or shard it with
mpt_jax.parallel).
"""

from __future__ import annotations

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
  grid_runs_at_once,
  make_grid_step,
  make_loss_fn,
)
from mpt_jax.algorithms.maml import make_maml_grad_fn, make_maml_step
from mpt_jax.algorithms.pt import make_mtl_step, make_pt_grad_fn, make_pt_step
from mpt_jax.algorithms.reptile import make_reptile_grad_fn, make_reptile_step

__all__ = [
  "OBJECTIVES",
  "Diverged",
  "PromptState",
  "apply_gradient",
  "check_update",
  "guard_failure",
  "init_grid_state",
  "init_state",
  "jit_step",
  "grid_runs_at_once",
  "make_grid_step",
  "make_loss_fn",
  "make_maml_grad_fn",
  "make_maml_step",
  "make_mtl_step",
  "make_pt_grad_fn",
  "make_pt_step",
  "make_reptile_grad_fn",
  "make_reptile_step",
]
