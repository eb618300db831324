"""Where a stage's time and memory go: step time, examples and tokens per second, compile time, ETA,
device memory and host RSS, per logged interval and in total.

Timing only: nothing here changes what a step computes, and nothing adds a host sync after the first
step. Steps are dispatched asynchronously, so a step's time is known only at a sync; each loop already
syncs once per logged interval (it fetches the interval's metrics), so the step time of an interval is
its wall time over its steps (their mean: a median would need a sync after every step). Work between
intervals (dev scoring, checkpoints) is not step time: the loop calls `pause()` before it and
`resume()` after, and it is reported as `other_s`. The stage's first step is blocked on and reported
apart as `first_step_s` (tracing, compiling or loading from the persistent cache, then one run); its
XLA compile time is `compile_s` (JAX's backend-compile events, every program of the stage), and the
persistent cache's hits and misses are counted.

The ETA of the whole run (`eta_run_s`) needs the stages still to come: `pipeline.run` declares them
(`plan_run`: upstream, then each target task's grid with its step budget), each StageMeter takes its own
off the plan when it starts, and an interval's ETA is its stage's remaining steps at its step time plus
each later stage's steps at the step time last measured for that kind of stage (upstream, downstream).
Before a kind has run once (the grids, while upstream trains) its stages cannot be timed:
`eta_run_lower_bound` is 1 then, and the ETA counts only what can be.

Device memory is read from `Device.memory_stats()` on the first local device, which GPUs and TPUs
report and the CPU backend does not (None): there the memory fields are left out of the intervals and
the summary says so instead of reporting a number.
"""

from __future__ import annotations

import contextvars
import json
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from mpt_jax import compilation, paths

# JAX records the XLA compilation of each program under this event (jax/_src/dispatch.py).
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
SUMMARY_FILE = "throughput.json"


def count_batch(batch: Mapping[str, Any]) -> tuple[int, int]:
  """(examples, non-padding tokens) of a batch: rows with any input token, and the input plus target
  mask sums, over every `*input_mask` / `*target_mask` leaf (support and query of an episode alike; every
  run of a grid batch). A batch placed on several processes is counted from this process's shards,
  times the number of processes (each feeds an equal share: `parallel.fed_by_process`)."""
  examples = tokens = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
    name = str(getattr(path[-1], "key", path[-1]))
    if not name.endswith(("input_mask", "target_mask")):
      continue
    mask, scale = _local_rows(leaf)
    tokens += int(mask.sum()) * scale
    if name.endswith("input_mask"):
      examples += int((mask.sum(-1) > 0).sum()) * scale
  return examples, tokens


def _local_rows(leaf) -> tuple[np.ndarray, int]:
  """The rows this process holds, and by how much to scale its counts to the whole batch."""
  if not isinstance(leaf, jax.Array) or leaf.is_fully_addressable:
    return np.asarray(jax.device_get(leaf)).reshape(-1, np.shape(leaf)[-1]), 1
  shards, seen = [], set()
  for shard in leaf.addressable_shards:
    key = str(shard.index)
    if key not in seen:  # a replicated axis holds the same rows on several devices
      seen.add(key)
      shards.append(np.asarray(jax.device_get(shard.data)).reshape(-1, leaf.shape[-1]))
  return np.concatenate(shards), jax.process_count()


def _masks(batch: Mapping[str, Any]) -> dict:
  """The mask leaves of a batch, kept until the interval's sync (counting them now would sync)."""
  masks = {}
  for i, (path, leaf) in enumerate(jax.tree_util.tree_leaves_with_path(batch)):
    name = str(getattr(path[-1], "key", path[-1]))
    if name.endswith(("input_mask", "target_mask")):
      masks[f"{i}:{name}"] = leaf
  return masks


def device_memory() -> dict[str, float]:
  """GB in use and peak on the first local device where the backend reports them (GPU, TPU); empty
  where `memory_stats()` is None (CPU)."""
  stats = jax.local_devices()[0].memory_stats() or {}
  out = {}
  if "bytes_in_use" in stats:
    out["device_memory_gb"] = stats["bytes_in_use"] / 1e9
  if "peak_bytes_in_use" in stats:
    out["device_memory_peak_gb"] = stats["peak_bytes_in_use"] / 1e9
  return out


def host_rss_gb() -> float | None:
  """This process's resident memory in GB (Linux /proc; None elsewhere)."""
  try:
    with open("/proc/self/statm", encoding="ascii") as statm:
      pages = int(statm.read().split()[1])
  except (OSError, ValueError, IndexError):
    return None
  return pages * os.sysconf("SC_PAGE_SIZE") / 1e9


class RunPlan:
  """The stages a run has still to train, in order: (stage name, steps), the kind of a stage being its
  name's first part ("upstream", "downstream/<task>" -> "downstream"); and each kind's last step time."""

  def __init__(self, stages: Sequence[tuple[str, int]]):
    self.pending = [(str(name), int(steps)) for name, steps in stages]
    self.step_s: dict[str, float] = {}

  def take(self, stage: str) -> None:
    """`stage` starts (or is reused, skipped): it is no longer to come."""
    for i, (name, _) in enumerate(self.pending):
      if name == stage:
        del self.pending[i]
        return

  def eta_after(self, stage: str, step_s: float) -> tuple[float, bool]:
    """(seconds the stages to come take, whether some could not be timed yet), with `stage`'s step time
    now `step_s`."""
    self.step_s[_kind(stage)] = step_s
    seconds, untimed = 0.0, False
    for name, steps in self.pending:
      kind_s = self.step_s.get(_kind(name))
      if kind_s is None:
        untimed = True
      else:
        seconds += kind_s * steps
    return seconds, untimed


def _kind(stage: str) -> str:
  return stage.split("/", 1)[0]


_PLAN: contextvars.ContextVar[RunPlan | None] = contextvars.ContextVar("mpt_jax_run_plan", default=None)


def plan_run(stages: Sequence[tuple[str, int]]) -> RunPlan:
  """Declares the run's stages (see the module doc); `end_run()` when the run ends."""
  plan = RunPlan(stages)
  _PLAN.set(plan)
  return plan


def skip_stage(stage: str) -> None:
  """A declared stage that will not train (its work is reused)."""
  plan = _PLAN.get()
  if plan is not None:
    plan.take(stage)


def end_run() -> None:
  _PLAN.set(None)


def _zero() -> dict[str, int]:
  return {"steps": 0, "examples": 0, "tokens": 0}


class StageMeter:
  """Measures one stage of `total_steps` steps, started (or resumed) at `start_step`.

  Use as a context manager around the loop (it listens to JAX's compile and persistent-cache events
  while open): `after_step(batch, outputs)` after each step it dispatches, `interval(done)` at each
  logged step, right after the host sync, for the interval's scalars; `pause()` / `resume()` around work
  that is not a step; `summary()` for the totals."""

  def __init__(self, stage: str, total_steps: int, start_step: int = 0):
    self.stage, self.total_steps, self.start_step = stage, int(total_steps), int(start_step)
    self.compile_s, self.compiles = 0.0, 0
    self.first_step_s: float | None = None
    self.other_s = 0.0
    self._cache_counter = compilation.count_cache_events()
    self._cache = compilation.CacheEvents()
    self._interval, self._totals, self._masks = _zero(), _zero(), []
    self._peak_device_gb: float | None = None
    self._peak_rss_gb: float | None = None
    self._started = self._interval_started = time.perf_counter()
    self._paused_at: float | None = None
    self._wall_s: float | None = None
    self._plan = _PLAN.get()
    if self._plan is not None:
      self._plan.take(stage)

  def _on_duration(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event == COMPILE_EVENT:
      self.compile_s += float(duration)
      self.compiles += 1

  def __enter__(self) -> StageMeter:
    self._cache = self._cache_counter.__enter__()
    jax.monitoring.register_event_duration_secs_listener(self._on_duration)
    self._started = self._interval_started = time.perf_counter()
    return self

  def __exit__(self, *exc) -> None:
    self._wall_s = time.perf_counter() - self._started
    jax.monitoring.unregister_event_duration_listener(self._on_duration)
    self._cache_counter.__exit__(*exc)

  def after_step(self, batch: Mapping[str, Any], outputs: Any) -> None:
    """Counts a step just dispatched. The stage's first step is blocked on and timed from the start;
    the intervals are timed from its end, so the step time and the rates leave it out."""
    if self.first_step_s is None:
      jax.block_until_ready(outputs)
      now = time.perf_counter()
      self.first_step_s = now - self._started
      self._interval_started = now
      examples, tokens = count_batch(batch)
      self._totals = {"steps": 1, "examples": examples, "tokens": tokens}
      return
    self._interval["steps"] += 1
    self._masks.append(_masks(batch))

  def interval(self, done: int) -> dict[str, float]:
    """The scalars of the interval that ends at step `done` (call it after the host sync)."""
    now = time.perf_counter()
    counts = self._interval
    for masks in self._masks:
      examples, tokens = count_batch(masks)
      counts["examples"] += examples
      counts["tokens"] += tokens
    self._masks = []
    elapsed = now - self._interval_started
    out: dict[str, float] = {}
    if counts["steps"] > 0 and elapsed > 0:
      step_s = elapsed / counts["steps"]
      out["step_time_s"] = step_s
      out["examples_per_s"] = counts["examples"] / elapsed
      out["tokens_per_s"] = counts["tokens"] / elapsed
      out["eta_stage_s"] = step_s * max(self.total_steps - done, 0)
      if self._plan is not None:
        later_s, untimed = self._plan.eta_after(self.stage, step_s)
        out["eta_run_s"] = out["eta_stage_s"] + later_s
        out["eta_run_lower_bound"] = float(untimed)
    elif done >= self.total_steps:
      out["eta_stage_s"] = 0.0
    if self.first_step_s is not None:
      out["first_step_s"] = self.first_step_s
    out["compile_s"] = self.compile_s
    out["compile_cache_hits"] = float(self._cache.hits)
    memory = device_memory()
    out.update(memory)
    if "device_memory_peak_gb" in memory:
      self._peak_device_gb = max(self._peak_device_gb or 0.0, memory["device_memory_peak_gb"])
    rss = host_rss_gb()
    if rss is not None:
      out["host_rss_gb"] = rss
      self._peak_rss_gb = max(self._peak_rss_gb or 0.0, rss)
    for key in ("steps", "examples", "tokens"):
      self._totals[key] += counts[key]
    self._interval = _zero()
    self._interval_started = now
    return out

  def pause(self) -> None:
    """Work that is not a step starts (dev scoring, a checkpoint): its time is `other_s`."""
    self._paused_at = time.perf_counter()

  def resume(self) -> None:
    now = time.perf_counter()
    if self._paused_at is not None:
      self.other_s += now - self._paused_at
      self._paused_at = None
    self._interval_started = now

  def summary(self) -> dict[str, Any]:
    """Totals of the stage (steps counted up to the last interval)."""
    wall = self._wall_s if self._wall_s is not None else time.perf_counter() - self._started
    steps = self._totals["steps"]
    steady_steps = steps - 1 if self.first_step_s is not None else steps
    steady_s = wall - (self.first_step_s or 0.0) - self.other_s
    memory_note = (
      None
      if self._peak_device_gb is not None
      else f"not reported by the {jax.default_backend()} backend (Device.memory_stats() is None)"
    )
    return {
      "stage": self.stage,
      "start_step": self.start_step,
      "total_steps": self.total_steps,
      "steps": steps,
      "wall_s": wall,
      "first_step_s": self.first_step_s,
      "steady_s": steady_s,
      "other_s": self.other_s,
      "compile_s": self.compile_s,
      "compiles": self.compiles,
      "compile_cache_hits": self._cache.hits,
      "compile_cache_misses": self._cache.misses,
      "steps_per_s": steady_steps / steady_s if steady_steps > 0 and steady_s > 0 else None,
      "examples": self._totals["examples"],
      "tokens": self._totals["tokens"],
      "device_memory_peak_gb": self._peak_device_gb,
      "device_memory_note": memory_note,
      "host_rss_peak_gb": self._peak_rss_gb,
      "backend": jax.default_backend(),
      "device_kind": jax.local_devices()[0].device_kind,
    }


def progress_text(scalars: Mapping[str, float]) -> str:
  """One short line for the progress bar and the log."""
  parts = []
  if "step_time_s" in scalars:
    parts.append(f"{scalars['step_time_s'] * 1e3:.0f}ms/step")
    parts.append(f"{scalars['examples_per_s']:.1f}ex/s")
    parts.append(f"{scalars['tokens_per_s']:.0f}tok/s")
  if "eta_stage_s" in scalars:
    parts.append(f"eta {scalars['eta_stage_s']:.0f}s")
  if "eta_run_s" in scalars:
    parts.append(f"run eta {'>' if scalars.get('eta_run_lower_bound') else ''}{scalars['eta_run_s']:.0f}s")
  parts.append(f"compile {scalars.get('compile_s', 0.0):.1f}s")
  if "device_memory_gb" in scalars:
    parts.append(f"mem {scalars['device_memory_gb']:.2f}GB")
  if "host_rss_gb" in scalars:
    parts.append(f"rss {scalars['host_rss_gb']:.2f}GB")
  return " ".join(parts)


def write_summary(summary: Mapping[str, Any], directory: str) -> str:
  """Appends the stage's totals to `directory/throughput.json` (a list, one entry per invocation: a
  resumed stage keeps the record of its first part) and returns its path."""
  path = paths.join(directory, SUMMARY_FILE)
  history = []
  if paths.exists(path):
    try:
      history = json.loads(paths.read_text(path))
    except json.JSONDecodeError:
      history = None
    if not isinstance(history, list):
      logging.warning("%s: unreadable, replaced by this run's throughput summary", path)
      history = []
  paths.write_text(path, json.dumps([*history, dict(summary)], indent=2) + "\n")
  logging.info(
    "%s: %d steps in %.1f s (first step %.1f s, compile %.1f s, other %.1f s), %s steps/s; peak device "
    "memory %s GB, host RSS %s GB (%s)",
    summary["stage"],
    summary["steps"],
    summary["wall_s"],
    summary["first_step_s"] or 0.0,
    summary["compile_s"],
    summary["other_s"],
    _fmt(summary["steps_per_s"]),
    _fmt(summary["device_memory_peak_gb"]),
    _fmt(summary["host_rss_peak_gb"]),
    path,
  )
  return path


def _fmt(x) -> str:
  return "n/a" if x is None else f"{x:.3g}"


def read_summaries(path: str | os.PathLike) -> list[dict]:
  """The entries of a throughput.json file."""
  return json.loads(paths.read_text(os.fspath(path)))
