"""The upstream loop: learn the prompt initialization on the source tasks, resumably.

One loop serves every method: MTL batches come from an `EpochSampler`, meta-learning episodes from an
`EpisodeSampler`; the step is whatever `mpt_jax.algorithms.make_step` built. Batches and dropout rngs are
pure functions of the step number, so a run killed at any point and started again with the same workdir
continues from its latest checkpoint exactly as if it had never stopped.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from mpt_jax import checkpoints, logs
from mpt_jax.algorithms import PromptState, check_finite


@dataclasses.dataclass
class LoopConfig:
  num_steps: int
  checkpoint_every: int
  log_every: int
  seed: int


def train_prompt(step_fn: Callable, state: PromptState, frozen_params: Any,
                 sample_batch: Callable[[int], dict], loop: LoopConfig, workdir: str,
                 put_batch: Callable[[dict], Any] = lambda batch: batch) -> PromptState:
  """Runs `step_fn` from the latest checkpoint in `workdir` (or from `state`) to `loop.num_steps`.

  step_fn(state, frozen_params, batch, rng) -> (state, metrics), jitted, state donated.
  sample_batch(step) -> batch (host arrays); put_batch places it (e.g. shards it over devices).
  The state is saved every `checkpoint_every` steps and at the end; a non-finite step stops the run
  with the last good state saved (the step's guard leaves the state unchanged when non-finite).
  """
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), loop.checkpoint_every)
  writer = logs.MetricWriter(os.path.join(workdir, "logs"))
  base_rng = jax.random.PRNGKey(loop.seed)
  restored = ckpt.restore_latest({"state": state, "rng": base_rng})
  start = 0
  if restored is not None:
    start, saved = restored
    state = saved["state"]
    if not np.array_equal(np.asarray(saved["rng"]), np.asarray(base_rng)):
      raise ValueError(f"{workdir}: the checkpoint was made with another seed; use a fresh --workdir "
                       f"or the seed it was made with")
    logging.info("resuming upstream from step %d (%s)", start, workdir)
  pending = []  # metrics of the steps since the last log line, fetched together (one host sync)
  try:
    for step in tqdm(range(start, loop.num_steps), initial=start, total=loop.num_steps,
                     desc="upstream", disable=jax.process_index() != 0, mininterval=5):
      batch = put_batch(sample_batch(step))
      state, metrics = step_fn(state, frozen_params, batch, jax.random.fold_in(base_rng, step))
      pending.append((step, metrics))
      done = step + 1
      last = done == loop.num_steps
      if done % loop.log_every == 0 or done % ckpt.every == 0 or last:
        _flush(pending, writer)
        ckpt.maybe_save(done, {"state": state, "rng": base_rng}, force=last)
  finally:
    ckpt.close()
    writer.close()
  return state


def _flush(pending: list, writer: logs.MetricWriter) -> None:
  """Checks every pending step for non-finite values (naming the first bad one), then logs the mean."""
  fetched = jax.device_get(pending)
  pending.clear()
  for step, metrics in fetched:
    check_finite(metrics, step)
  step = fetched[-1][0]
  keys = [k for k in fetched[-1][1] if k != "is_finite"]
  writer.write(step + 1, {k: np.mean([np.mean(m[k]) for _, m in fetched]) for k in keys}, "upstream/")
  logging.info("upstream step %d: %s", step + 1,
               ", ".join(f"{k}={np.mean(fetched[-1][1][k]):.4g}" for k in keys))
