"""One override syntax: a study (`mpt-jax study`, experiments/run_setting.py) takes `--config.KEY=VALUE`
like a run, as an alias of `--set KEY=VALUE`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


REPO = Path(__file__).resolve().parents[1]


CONVERSION_CHECK = """
import pytest
from absl import app
from mpt_jax import run_setting

argv = ["prog", "--setting=synth_mini", "--config.downstream.num_steps=7", "--set", "seed=3", "--config.model=a=b"]
assert run_setting.as_set_flags(argv) == [
  "prog", "--setting=synth_mini", "--set=downstream.num_steps=7", "--set", "seed=3", "--set=model=a=b"
]
for method in ("pt", "maml"):
  config = run_setting.method_config(method, "synth_mini", "tiny", ["downstream.num_steps=7", "model=a=b"])
  assert (config.downstream.num_steps, config.model) == (7, "a=b")
with pytest.raises(app.UsageError, match="expected --config.key=value"):
  run_setting.as_set_flags(["--config.downstream.num_steps"])
print("ok")
"""


def test_config_flags_become_set_flags_and_reach_every_methods_config():
  """In a process of its own: run_setting defines absl flags (--workdir) that mpt_jax.main defines too."""
  result = subprocess.run(
    [sys.executable, "-c", CONVERSION_CHECK], capture_output=True, text=True, timeout=300, cwd=REPO
  )
  assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-2000:]


def test_a_study_refuses_a_mistyped_config_flag_before_any_compute(tmp_path):
  result = subprocess.run(
    [
      sys.executable,
      str(REPO / "experiments" / "run_setting.py"),
      "--setting=synth_mini",
      "--preset=tiny",
      "--methods=pt",
      f"--workdir={tmp_path / 'study'}",
      "--config.downstream.num_stepz=7",
    ],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert result.returncode != 0
  assert "downstream.num_stepz" in result.stderr and "Traceback" not in result.stderr
  assert not (tmp_path / "study").exists()
