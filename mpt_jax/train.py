"""The upstream loop: learn the prompt initialization on the source tasks, resumably.

One loop serves every method: MTL batches come from an `EpochSampler`, meta-learning episodes from an
`EpisodeSampler`; the step is whatever `mpt_jax.algorithms.make_step` built. Batches and dropout rngs are
pure functions of the step number, so a run killed at any point and started again with the same workdir
continues from its latest checkpoint exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from mpt_jax import checkpoints, logs, optim, parallel, paths, throughput
from mpt_jax.algorithms import Diverged, PromptState, check_update


@dataclasses.dataclass(frozen=True)
class LoopConfig:
  num_steps: int
  checkpoint_every: int
  log_every: int
  seed: int
  # The optimizer's learning rate, set on a restored state: it comes from the config, not from the
  # checkpoint (it may change on a rerun after a divergence). None: keep the checkpoint's.
  learning_rate: float | None = None


def train_prompt(
  step_fn: Callable,
  state: PromptState,
  frozen_params: Any,
  sample_batch: Callable[[int], dict],
  loop: LoopConfig,
  workdir: str,
  checkpoint_meta: dict | None = None,
) -> PromptState:
  """Runs `step_fn` from the latest checkpoint in `workdir` (or from `state`) to `loop.num_steps`.

  step_fn(state, frozen_params, batch, rng) -> (state, metrics), jitted, state donated.
  sample_batch(step) -> the step's batch, placed for step_fn (`parallel.fed_by_process` splits it over
  the devices, each process building its own rows). `state` is placed as step_fn takes it (replicated on
  the mesh): a checkpoint is restored with its placement.
  The state is saved every `checkpoint_every` steps and at the end, with `checkpoint_meta` (the config
  fingerprint). A step that fails the guard (a non-finite or diverging update) stops the run with
  `algorithms.Diverged`; every checkpoint is of steps that passed it, and the exception's `resume_step`
  is the latest of them (0: none, the initial state), where a rerun with a lower learning rate continues.
  """
  ckpt = checkpoints.Checkpointer(paths.join(workdir, "checkpoints"), loop.checkpoint_every)
  writer = logs.MetricWriter(paths.join(workdir, "logs"))
  # On the host: the same on every process, and saved by the primary one alone.
  base_rng = np.asarray(jax.random.PRNGKey(loop.seed))
  start = 0
  pending = []  # metrics of the steps since the last log line, fetched together (one host sync)
  try:
    restored = ckpt.restore_latest({"state": state, "rng": base_rng})
    if restored is not None:
      start, state = restored.step, restored.arrays["state"]
      if not np.array_equal(np.asarray(restored.arrays["rng"]), np.asarray(base_rng)):
        raise ValueError(
          f"{workdir}: the checkpoint was made with another seed; use a fresh --workdir "
          f"or the seed it was made with"
        )
      if start > loop.num_steps:
        raise ValueError(
          f"{workdir}: the checkpoint is at step {start}, past num_steps={loop.num_steps}; "
          f"use a fresh --workdir"
        )
      if loop.learning_rate is not None:
        state = state.replace(opt_state=optim.set_learning_rate(state.opt_state, loop.learning_rate))
      logging.info("resuming upstream from step %d (%s)", start, workdir)
    progress = tqdm(
      range(start, loop.num_steps),
      initial=start,
      total=loop.num_steps,
      desc="upstream",
      disable=jax.process_index() != 0,
      mininterval=5,
    )
    meter = throughput.StageMeter("upstream", loop.num_steps, start)
    with meter:
      for step in progress:
        batch = sample_batch(step)
        state, metrics = step_fn(state, frozen_params, batch, jax.random.fold_in(base_rng, step))
        meter.after_step(batch, metrics)
        pending.append((step, metrics))
        done = step + 1
        last = done == loop.num_steps
        if done % loop.log_every == 0 or done % ckpt.every == 0 or last:
          _flush(pending, writer, meter, progress)
          meter.pause()  # a checkpoint is not step time
          ckpt.save(done, {"state": state, "rng": base_rng}, checkpoint_meta, force=last)
          meter.resume()
    if parallel.is_primary() and meter.summary()["steps"]:
      throughput.write_summary(meter.summary(), paths.join(workdir, "logs"))
  except Diverged as diverged:
    ckpt.close()
    diverged.resume_step = ckpt.latest_step() or 0
    raise
  finally:
    ckpt.close()
    writer.close()
  return state


def _flush(pending: list, writer: logs.MetricWriter, meter: throughput.StageMeter, progress) -> None:
  """Checks every pending step with the guard (naming the first bad one, counted from 1 as the log
  lines are), then logs the mean of the steps, with the interval's time and memory under perf/."""
  fetched = jax.device_get(pending)
  pending.clear()
  for step, metrics in fetched:
    check_update(metrics, step + 1)
  step = fetched[-1][0]
  keys = [k for k in fetched[-1][1] if k != "update_ok"]
  perf = meter.interval(step + 1)  # after the fetch above: every step of the interval has finished
  scalars = {k: np.mean([np.mean(m[k]) for _, m in fetched]) for k in keys}
  writer.write(step + 1, {**scalars, **{f"perf/{k}": v for k, v in perf.items()}}, "upstream/")
  text = throughput.progress_text(perf)
  progress.set_postfix_str(text, refresh=False)
  logging.info(
    "upstream step %d: %s | %s",
    step + 1,
    ", ".join(f"{k}={np.mean(fetched[-1][1][k]):.4g}" for k in keys),
    text,
  )
