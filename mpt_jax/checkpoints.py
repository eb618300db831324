"""Resumable training state on disk (orbax), so a preempted run continues exactly where it stopped.

What is saved is a pytree of arrays: the prompt, the optimizer state, the step and the rng. Batches are a
pure function of (seed, step), so nothing about the data stream needs saving.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over orbax's CheckpointManager: save every `every` steps, restore the latest."""

  def __init__(self, directory: str | os.PathLike, every: int, max_to_keep: int = 2):
    self.every = max(int(every), 1)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def restore_latest(self, like: Any) -> tuple[int, Any] | None:
    """The latest saved state, shaped like `like` (a pytree of arrays), or None when nothing was saved."""
    step = self._manager.latest_step()
    if step is None:
      return None
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), like)
    state = self._manager.restore(step, args=ocp.args.StandardRestore(abstract))
    return step, state

  def maybe_save(self, step: int, state: Any, *, force: bool = False) -> bool:
    """Saves at multiples of `every` (and when forced, e.g. the last step). Asynchronous; see close()."""
    if not force and step % self.every:
      return False
    if self._manager.latest_step() == step:
      return False
    self._manager.save(step, args=ocp.args.StandardSave(state))
    return True

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
