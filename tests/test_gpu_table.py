"""The GPU table's arithmetic: the whole study's wall time from measured step times (benchmarks/README.md)."""

from __future__ import annotations

import pytest

from benchmarks import gpu_table
from mpt_jax.data import settings as settings_lib


def test_study_estimate_counts_every_target_method_step_and_evaluation():
  record = {
    "scale": "large",
    "sections": {
      "reference": {"pt_time": {"median_s": 0.25}, "maml_time": {"median_s": 1.4}},
      "maml_scan": {"time": {"median_s": 0.2}},
      "maml_bf16": {"skipped": "no time"},
      "grid_padded": {"time": {"median_s": 2.0}},
      "grid_bucketed": {"time": {"median_s": 0.5}},
      "dev_eval": {"time": {"median_s": 4.0}},
    },
  }
  targets = sum(len(settings_lib.get_setting(s).target) for s in settings_lib.STUDY_SETTINGS)
  estimate = gpu_table.study_estimate(record)
  assert estimate["target_tasks_over_settings"] == targets and estimate["settings"] == 11
  evaluations = 3000 // 50 + 1  # dev at step 0 and every 50 steps
  for label, grid_s, maml_s in (
    ("ours_padded", 2.0, 0.2),
    ("ours_bucketed", 0.5, 0.2),
    ("reference_padded", 20 * 0.25, 1.4),
  ):
    downstream = 5 * targets * (3000 * grid_s + evaluations * 4.0) / 3600
    upstream = 11 * 3 * 5000 * maml_s / 3600
    assert estimate[label]["downstream_h"] == pytest.approx(downstream, abs=0.06)
    assert estimate[label]["upstream_h"] == pytest.approx(upstream, abs=0.06)
  assert "ours_bucketed" in gpu_table.markdown({**record, "command": "x", "total_s": 1.0})
