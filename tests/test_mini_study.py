"""experiments/mini_study.py's bookkeeping: PT runs shared between settings, the downstream loss table."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
  "mini_study", Path(__file__).resolve().parents[1] / "experiments" / "mini_study.py"
)
mini_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mini_study)


def _write_task(
  root: Path, setting: str, method: str, task: str, losses: dict | None, done: bool, kind: str = "downstream"
):
  task_dir = root / setting / method / kind / task
  (task_dir / "logs").mkdir(parents=True)
  if losses is not None:
    (task_dir / "logs" / "metrics.jsonl").write_text(
      "".join(
        json.dumps({"step": s, f"{task}/loss": v, f"{task}/dev_score": 0.5}) + "\n" for s, v in losses.items()
      )
    )
  if done:
    (task_dir / "results.json").write_text("{}")


def test_pt_runs_are_shared_only_when_finished_and_never_overwritten(tmp_path):
  _write_task(tmp_path, "a", "pt", "t1", {20: 1.0}, done=True)
  _write_task(tmp_path, "a", "pt", "t2", {20: 1.0}, done=False)  # killed mid-task: not shared
  _write_task(tmp_path, "b", "pt", "t3", {20: 9.0}, done=True)  # already done in b: kept as is
  _write_task(tmp_path, "a", "pt", "t3", {20: 1.0}, done=True)
  _write_task(tmp_path, "a", "pt", "s1", {20: 2.0}, done=True, kind="sources")
  _write_task(tmp_path, "a", "pt", "t5", {20: 1.0}, done=True)  # neither a target nor a source of b
  copied = mini_study.share_pt_runs(
    str(tmp_path), "b", ["a"], targets=["t1", "t2", "t3", "s1"], sources=["t1", "t4", "s1"]
  )
  # Each kind from its own kind only: a source's grid has fewer seeds than a target's.
  assert copied == ["t1 (from a/pt/downstream/t1)", "s1 (from a/pt/sources/s1)"]
  assert (tmp_path / "b" / "pt" / "downstream" / "t1" / "results.json").is_file()
  assert (tmp_path / "b" / "pt" / "sources" / "s1" / "results.json").is_file()
  assert not (tmp_path / "b" / "pt" / "downstream" / "s1").exists()  # a source's run is not a target's
  assert not (tmp_path / "b" / "pt" / "sources" / "t1").exists()  # nor a target's a source's
  assert not (tmp_path / "b" / "pt" / "downstream" / "t2").exists()
  assert not (tmp_path / "b" / "pt" / "downstream" / "t5").exists()
  assert "9.0" in (tmp_path / "b" / "pt" / "downstream" / "t3" / "logs" / "metrics.jsonl").read_text()


def test_downstream_loss_table_lists_each_method_per_task_in_study_order(tmp_path):
  _write_task(tmp_path, "s", "maml", "t1", {20: 4.5, 40: 4.25}, done=True)
  _write_task(tmp_path, "s", "pt", "t1", {20: 6.0, 40: 5.5}, done=True)
  _write_task(tmp_path, "s", "pt", "t2", {20: 7.0, 40: 6.125}, done=True)
  table = mini_study.downstream_loss_table(str(tmp_path / "s"))
  assert "at steps 20/40" in table
  assert "| task | pt | maml |" in table
  assert "| t1 | 6.00/5.50 | 4.50/4.25 |" in table
  assert "| t2 | 7.00/6.12 |  |" in table
