"""A computation over many independent runs, in the fewest chunks of runs that fit the device's memory.

The downstream grid trains its R runs (5 seeds x 4 learning rates) as one vmapped step, and scores them
with one vmapped decoder; the memory of both grows with R. `RunChunks` wraps such a jitted function and,
for each new argument shape, picks the fewest equal chunks of runs whose compiled program fits the
memory budget (XLA's memory analysis of the compiled executable: the temporaries and outputs it
allocates), then calls it chunk by chunk and concatenates the results. Runs never interact, so the
result is the one of a single call over all runs; only memory and time change.

The budget is what the device reports as free (its memory limit minus what is in use: frozen params,
states) times `fraction`, or a number of bytes given by the config (`downstream.memory_budget_gb`);
CPUs report no memory limit, and without a configured budget there everything runs in one chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging


def device_memory_budget(device: jax.Device | None = None, fraction: float = 0.9) -> int | None:
  """Bytes a new program may allocate on `device` (default: the first), or None when the backend does
  not report its memory (CPU)."""
  device = device or jax.devices()[0]
  try:
    stats = device.memory_stats()
  except (NotImplementedError, RuntimeError):
    return None
  if not stats or "bytes_limit" not in stats:
    return None
  return int(fraction * (stats["bytes_limit"] - stats.get("bytes_in_use", 0)))


def compiled_bytes(compiled) -> int | None:
  """What running a compiled executable allocates beyond its (already resident) arguments: its
  temporaries and its outputs, less the outputs written into donated arguments (None: the backend
  does not analyze it)."""
  memory = compiled.memory_analysis()
  if memory is None:
    return None
  return int(
    memory.temp_size_in_bytes
    + memory.output_size_in_bytes
    - memory.alias_size_in_bytes
    + memory.generated_code_size_in_bytes
  )


@dataclasses.dataclass(frozen=True)
class Plan:
  num_chunks: int
  chunk_bytes: int | None  # compiled memory of one chunk's call (None: not measured)
  call: Callable  # the compiled executable of one chunk (or the jitted function)


class RunChunks:
  """`fn(*args)` over the leading run axis of the arguments marked in `run_axes` (0: split by run,
  None: shared by every run, e.g. the frozen params), in the fewest chunks that fit `budget_bytes`.

  fn: a jitted function (`jax.jit`, or a sharded step) whose outputs all have the run axis first.
  budget_bytes: an int, or None for the device's free memory (`device_memory_budget`); where neither
    is known (CPU without a configured budget), fn is called once on all runs, as it is.
  run_multiple: chunk sizes are multiples of this (the number of devices a sharded step splits runs over).
  Plans (chunk count and compiled executable) are kept per argument shape, on this object.
  """

  def __init__(
    self,
    fn: Callable,
    run_axes: Sequence[int | None],
    *,
    budget_bytes: int | None = None,
    run_multiple: int = 1,
    name: str = "runs",
  ):
    self.fn = fn
    self.run_axes = tuple(run_axes)
    self.budget_bytes = budget_bytes
    self.run_multiple = run_multiple
    self.name = name
    self.plans: dict[Any, Plan] = {}

  def __call__(self, *args):
    plan = self.plan(*args)
    num_runs = self._num_runs(args)
    if plan.num_chunks == 1:
      return plan.call(*args)
    size = num_runs // plan.num_chunks
    outputs = [plan.call(*self._chunk(args, start, start + size)) for start in range(0, num_runs, size)]
    return jax.tree_util.tree_map(lambda *parts: jnp.concatenate(parts), *outputs)

  def plan(self, *args) -> Plan:
    """The plan for arguments of these shapes: made (compiling) on the first call with them."""
    leaves, treedef = jax.tree_util.tree_flatten(args)
    key = (treedef, tuple((tuple(jnp.shape(x)), str(x.dtype)) for x in leaves))
    if key not in self.plans:
      self.plans[key] = self._make_plan(args)
    return self.plans[key]

  def _make_plan(self, args) -> Plan:
    budget = self.budget_bytes if self.budget_bytes is not None else device_memory_budget()
    if budget is None:
      return Plan(1, None, self.fn)
    num_runs = self._num_runs(args)
    sizes = [
      num_runs // k
      for k in range(1, num_runs + 1)
      if num_runs % k == 0 and (num_runs // k) % self.run_multiple == 0
    ]
    full = self._compile(args, sizes[0])
    needed = compiled_bytes(full)
    if needed is None or needed <= budget:
      return Plan(1, needed, full)
    # Memory is nearly proportional to the runs in a chunk: start from the size that estimate allows,
    # and check each candidate's compiled program.
    per_run = needed / sizes[0]
    for size in sizes[1:]:
      if size * per_run > budget and size != sizes[-1]:
        continue
      compiled = self._compile(args, size)
      chunk_bytes = compiled_bytes(compiled)
      if chunk_bytes <= budget or size == sizes[-1]:
        if chunk_bytes > budget:
          logging.warning(
            "%s: one chunk of %d runs needs %.2f GiB, over the budget of %.2f GiB; running it anyway",
            self.name,
            size,
            chunk_bytes / 2**30,
            budget / 2**30,
          )
        logging.info(
          "%s: %d runs in %d chunks of %d (%.2f GiB each; all at once: %.2f GiB; budget %.2f GiB)",
          self.name,
          num_runs,
          num_runs // size,
          size,
          chunk_bytes / 2**30,
          needed / 2**30,
          budget / 2**30,
        )
        return Plan(num_runs // size, chunk_bytes, compiled)
    raise AssertionError("unreachable: the last candidate is always taken")

  def _num_runs(self, args) -> int:
    sizes = {
      jnp.shape(leaf)[0]
      for arg, axis in zip(args, self.run_axes)
      if axis is not None
      for leaf in jax.tree_util.tree_leaves(arg)
    }
    if len(sizes) != 1:
      raise ValueError(f"{self.name}: the run axis of the arguments differs in size: {sorted(sizes)}")
    return sizes.pop()

  def _chunk(self, args, start: int, stop: int):
    return tuple(
      arg if axis is None else jax.tree_util.tree_map(lambda x: x[start:stop], arg)
      for arg, axis in zip(args, self.run_axes)
    )

  def _compile(self, args, size: int):
    shapes = tuple(
      jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(jnp.shape(x) if axis is None else (size, *jnp.shape(x)[1:]), x.dtype),
        arg,
      )
      for arg, axis in zip(args, self.run_axes)
    )
    return self.fn.lower(*shapes).compile()
