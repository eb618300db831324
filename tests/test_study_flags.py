"""One override syntax: a study (`mpt-jax study`, experiments/run_setting.py) takes `--config.KEY=VALUE`
like a run, as an alias of `--set KEY=VALUE`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from absl import app

from mpt_jax import run_setting

REPO = Path(__file__).resolve().parents[1]


def test_config_flags_become_set_flags_and_reach_every_methods_config():
  argv = [
    "prog",
    "--setting=synth_mini",
    "--config.downstream.num_steps=7",
    "--set",
    "seed=3",
    "--config.model=a=b",
  ]
  converted = run_setting.as_set_flags(argv)
  assert converted == [
    "prog",
    "--setting=synth_mini",
    "--set=downstream.num_steps=7",
    "--set",
    "seed=3",
    "--set=model=a=b",
  ]
  overrides = ["downstream.num_steps=7", "model=a=b"]
  for method in ("pt", "maml"):
    config = run_setting.method_config(method, "synth_mini", "tiny", overrides)
    assert (config.downstream.num_steps, config.model) == (7, "a=b")
  with pytest.raises(app.UsageError, match="expected --config.key=value"):
    run_setting.as_set_flags(["--config.downstream.num_steps"])


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
