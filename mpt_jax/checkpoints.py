"""Resumable training state on disk (orbax), so a preempted run continues exactly where it stopped.

A checkpoint holds two items: `arrays`, a pytree of arrays (upstream: the prompt state and the rng; the
downstream grid: every run's state and best prompts), and `meta`, a JSON object (the config fingerprint,
and the grid's host-side bookkeeping: best scores and steps, dev curve, failed runs). Batches are a pure
function of (seed, step), so nothing about the data stream needs saving.

Restoring takes the latest checkpoint that reads back; an unreadable one (a truncated file, a disk error)
is moved aside to `<directory>.unreadable/` with a warning naming it, and the previous one is used.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from mpt_jax import lease, parallel, paths


@dataclasses.dataclass(frozen=True)
class Restored:
  step: int
  arrays: Any
  meta: dict[str, Any]


class Checkpointer:
  """A thin wrapper over orbax's CheckpointManager: save every `every` steps, restore the latest readable."""

  def __init__(self, directory: str | os.PathLike, every: int = 1, max_to_keep: int = 2):
    self.directory = paths.absolute(directory)  # a URL as it is (orbax writes gs:// itself)
    self.every = max(int(every), 1)
    self._options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._manager = self._open()

  def _open(self):
    return ocp.CheckpointManager(orbax_directory(self.directory), options=self._options)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> int | None:
    """The latest step saved (after close(): on disk)."""
    if self._manager is None:
      steps = [int(name) for name in paths.listdir(self.directory) if name.isdigit()]
      return max(steps, default=None)
    return self._manager.latest_step()

  def restore_latest(self, like: Any) -> Restored | None:
    """The latest checkpoint that reads back, its arrays shaped like `like`; None when there is none.

    Falls back over unreadable checkpoints (moved aside, with a warning); raises when checkpoints exist
    but none reads back.
    """
    abstract = jax.tree.map(_abstract, like)
    unreadable = []
    for step in reversed(self.steps()):
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(arrays=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()),
        )
      except Exception as error:  # noqa: BLE001 (tensorstore, JSON and shape errors alike mean unreadable)
        unreadable.append((step, error))
        continue
      if unreadable:
        self._set_aside([s for s, _ in unreadable])
        logging.warning(
          "%s: checkpoint(s) %s unreadable (%s); resuming from step %d, the latest intact one",
          self.directory,
          [s for s, _ in unreadable],
          _brief(unreadable[0][1]),
          step,
        )
      return Restored(step, restored["arrays"], dict(restored["meta"] or {}))
    if unreadable:
      details = "; ".join(f"step {s}: {_brief(e)}" for s, e in unreadable)
      raise RuntimeError(
        f"{self.directory}: no checkpoint reads back ({details}). Delete the directory to "
        f"start this stage over, or use a fresh --workdir."
      )
    return None

  def _set_aside(self, steps: list[int]) -> None:
    """Moves unreadable checkpoints out of the manager's way (later saves reuse their step numbers); the
    primary process moves them, every process then opens the directory again."""
    if parallel.is_primary():
      aside = self.directory + ".unreadable"
      paths.makedirs(aside)
      for step in steps:
        target = paths.join(aside, str(step))
        paths.remove(target, recursive=True)
        paths.move(paths.join(self.directory, str(step)), target)
    parallel.sync(f"set aside {self.directory}")
    self._manager.close()
    self._manager = self._open()

  def save(self, step: int, arrays: Any, meta: dict[str, Any] | None = None, *, force: bool = False) -> bool:
    """Saves at multiples of `every` (and when forced, e.g. the last step). Asynchronous; see close()."""
    if not force and step % self.every:
      return False
    if self._manager.latest_step() == step:
      return False
    # Not beside another job that took the workdir over (mpt_jax/lease.py); every process stops together.
    parallel.primary_says(lambda: lease.check(self.directory), refusals=(lease.LeaseLost,))
    self._manager.save(
      step,
      args=ocp.args.Composite(arrays=ocp.args.StandardSave(arrays), meta=ocp.args.JsonSave(dict(meta or {}))),
    )
    return True

  def close(self) -> None:
    """Waits for the pending saves and releases the manager (again: nothing)."""
    if self._manager is not None:
      self._manager.wait_until_finished()
      self._manager.close()
      self._manager = None


def orbax_directory(directory: str) -> str:
  """What orbax is given for a checkpoint directory: the path or URL itself (orbax reads and writes
  gs:// through etils.epath and tensorstore, not through mpt_jax/paths.py). One place, so a test can map
  a fake bucket's URL to the local directory behind it."""
  return directory


def _abstract(x):
  """What orbax restores a leaf as: a jax.Array placed like `x` (e.g. replicated on the mesh of a
  multi-process run), or a host array for a host array."""
  if isinstance(x, jax.Array):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
  return np.asarray(x)


def _brief(error: Exception) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:200] if text else ''}"
