"""A downstream grid killed with SIGKILL and started again ends bitwise equal to one that never stopped.

The killed run is a real process (`python -c`, this module's `_child`) that SIGKILLs itself when the grid
asks for the batch of a given step: after a dev evaluation's checkpoint, mid-way between two of them.
Before issue 14 the grid was not checkpointed at all: a preempted 3000-step grid started again from step 0.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

import helpers_t5
from mpt_jax import config as config_lib, pipeline

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates (tests/helpers_t5.py)

TASK = "synth-sentiment_d"
KILL_AT = 5  # the grid's checkpoints: every dev evaluation (steps 2, 4, 6, 8)


def grid_config(checkpoint: str):
  """PT (no upstream) on the synthetic gym: 2 seeds x 2 learning rates, 8 steps, dev every 2."""
  config = config_lib.base_config("pt", "synth_mini", "tiny")
  config.gym, config.model, config.dropout_rate = "synthetic", checkpoint, 0.1  # dropout: the rng matters
  config.downstream.num_steps, config.downstream.eval_every = 8, 2
  config.downstream.max_epochs = 0
  return config


def _child(checkpoint: str, workdir: str, kill_at: int, fast_compile: bool) -> None:
  """The killed run: pipeline.run in this process, which SIGKILLs itself at the grid's step `kill_at`;
  compiled as the parent compiles (the same bits need the same programs)."""
  import signal

  import jax

  from mpt_jax.data import batching

  jax.config.update("jax_threefry_partitionable", False)  # as tests/conftest.py
  jax.config.update("jax_disable_most_optimizations", fast_compile)  # as this module (fast_compile)
  sample = batching.GridSampler.__call__

  def sample_or_die(self, step, runs=None):
    if step == kill_at:
      os.kill(os.getpid(), signal.SIGKILL)
    return sample(self, step, runs)

  batching.GridSampler.__call__ = sample_or_die
  pipeline.run(grid_config(checkpoint), workdir)


def _files(task_dir: Path) -> dict[str, bytes]:
  names = ["results.json", "dev_curve.json"] + [f"prompts/{p.name}" for p in (task_dir / "prompts").iterdir()]
  return {name: (task_dir / name).read_bytes() for name in sorted(names)}


@pytest.mark.compat
def test_a_killed_grid_resumes_to_the_uninterrupted_results_bitwise(tmp_path, monkeypatch):
  from mpt_jax.data import batching

  checkpoint = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  pipeline.run(grid_config(checkpoint), str(straight))

  env = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
  }
  fast = jax.config.read("jax_disable_most_optimizations")
  code = f"import test_preemption as t; t._child({checkpoint!r}, {str(killed)!r}, {KILL_AT}, {fast})"
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
  assert done.returncode == -9, done.stderr[-3000:]  # SIGKILL
  task_dir = killed / "downstream" / TASK
  assert not (task_dir / "results.json").exists()
  saved = [int(p.name) for p in (task_dir / "checkpoints").iterdir() if p.name.isdigit()]
  assert saved and max(saved) <= 4  # what the killed grid left: its checkpoints up to step 4

  sampled = []  # the grid steps the rerun trains: from the latest checkpoint on, not from 0
  sample = batching.GridSampler.__call__
  monkeypatch.setattr(
    batching.GridSampler,
    "__call__",
    lambda self, step, runs=None: sampled.append(step) or sample(self, step, runs),
  )
  pipeline.run(grid_config(checkpoint), str(killed))
  assert sampled == list(range(max(saved), 8))
  assert _files(task_dir) == _files(straight / "downstream" / TASK)
  assert (killed / "results.json").read_bytes() == (straight / "results.json").read_bytes()
  assert not (task_dir / "checkpoints").exists()  # dropped once the results are written


@pytest.mark.parametrize("with_results", [False, True])
def test_a_grid_checkpoint_of_another_config_is_not_resumed(tmp_path, with_results):
  # What stays in a task directory (a grid checkpoint, or results) is refused under another config.
  from mpt_jax import fingerprint

  task_dir = tmp_path / "run" / "downstream" / TASK
  fingerprint.Record(keys={"downstream.lrs": [0.5, 0.3]}).save(str(task_dir))
  assert fingerprint.check_stage(str(task_dir), {}, what="", fix="").problem is None  # nothing to reuse yet
  if with_results:
    (task_dir / "results.json").write_text("{}")
  else:
    (task_dir / "checkpoints" / "4").mkdir(parents=True)
  check = fingerprint.check_stage(
    str(task_dir), {"downstream.lrs": [0.4]}, what=str(task_dir), fix="Use a fresh --workdir"
  )
  assert (
    "downstream.lrs: [0.5, 0.3] -> [0.4]\n  Use a fresh --workdir, or rerun with the values it was made "
    "with: '--config.downstream.lrs=(0.5, 0.3)'." in check.problem
  )
