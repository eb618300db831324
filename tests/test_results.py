"""Result tables: hand-computed means, population stds, averages and ARG; files written and readable;
NaN handling; the study's column order (PT first); the run record."""

from __future__ import annotations

import csv
import json
import math
import os
import re
from importlib import metadata

import ml_collections
import numpy as np
import pytest

from mpt_jax import results

NAN = float("nan")


def _runs(method_scores):
  """{task: [scores for seeds 100, 13, 21]} -> run dicts, with per-run info."""
  return [
    {
      "task": task,
      "seed": seed,
      "test_score": score,
      "dev_score": 0.9,
      "best_lr": 0.3,
      "best_step": 150,
      "metric": "ACC",
    }
    for task, scores in method_scores.items()
    for seed, score in zip((100, 13, 21), scores)
  ]


# Hand-made example. MAML: A = [.5, .6, .7] -> mean .6, population std sqrt(.02 / 3);
# B = [.2, .4, NaN] -> (omit) mean .3, std .1, one NaN. Average (.6 + .3) / 2 = .45.
# PT: A mean .4, B mean .3 -> gains (.6 - .4) / .4 = .5 and 0 -> ARG .25.
MAML = {"A": [0.5, 0.6, 0.7], "B": [0.2, 0.4, NAN]}
PT = {"A": [0.4, 0.4, 0.4], "B": [0.3, 0.3, 0.3]}


def test_task_summary_mean_and_population_std():
  summary = results.summarize_task(
    "A", [results.RunResult("A", s, x) for s, x in zip((13, 100, 21), (0.6, 0.5, 0.7))]
  )
  assert summary["seeds"] == [13, 21, 100]  # sorted by seed
  assert summary["test_scores"] == [0.6, 0.7, 0.5]
  assert summary["mean"] == pytest.approx(0.6)
  assert summary["std"] == pytest.approx(math.sqrt(0.02 / 3))  # ddof=0, not sqrt(.02 / 2)
  assert summary["std_ddof"] == 0 and summary["n_nan"] == 0 and summary["n_seeds"] == 3


def test_setting_summary_average_and_arg_by_hand():
  pt = results.summarize_runs(_runs(PT), setting="toy", method="pt")
  maml = results.summarize_runs(_runs(MAML), setting="toy", method="maml", pt=pt)
  assert list(maml["tasks"]) == ["A", "B"]
  b = maml["tasks"]["B"]
  assert b["mean"] == pytest.approx(0.3) and b["std"] == pytest.approx(0.1) and b["n_nan"] == 1
  assert maml["average"] == pytest.approx(0.45)
  assert maml["relative_gain"] == {"A": pytest.approx(0.5), "B": pytest.approx(0.0)}
  assert maml["arg"] == pytest.approx(0.25)
  assert pt["average"] == pytest.approx(0.35) and "arg" not in pt
  # Each run's extra info is kept.
  assert maml["tasks"]["A"]["runs"][0]["best_lr"] == 0.3
  assert maml["tasks"]["A"]["metric"] == "ACC"


def test_nan_policy_propagate_gives_nan_means():
  maml = results.summarize_runs(_runs(MAML), setting="toy", method="maml", nan_policy="propagate")
  assert math.isnan(maml["tasks"]["B"]["mean"]) and math.isnan(maml["average"])
  assert maml["tasks"]["A"]["mean"] == pytest.approx(0.6)
  assert maml["tasks_without_score"] == ["B"]


def test_all_nan_task_and_zero_pt_are_flagged_not_fatal(tmp_path):
  pt = results.summarize_runs(_runs({"A": [0.0, 0.0, 0.0], "B": [0.5, 0.5, 0.5]}), setting="toy", method="pt")
  m = results.summarize_runs(
    _runs({"A": [0.2, 0.2, 0.2], "B": [NAN, NAN, NAN], "C": [1, 1, 1]}), setting="toy", method="mtl", pt=pt
  )
  assert m["tasks_without_score"] == ["B"]
  assert m["average"] == pytest.approx(0.6)  # (0.2 + 1) / 2, B left out
  assert m["arg_tasks_missing_in_pt"] == ["C"]
  assert sorted(m["arg_tasks_without_gain"]) == ["A", "B"]  # PT mean 0, and NaN mean
  assert math.isnan(m["arg"])  # no task has a finite gain
  table = results.setting_table_markdown(m)
  assert "No finite score: B" in table and "left out of the ARG: C" in table
  paths = results.write_setting_results(m, tmp_path)  # NaN bars are labelled, not a crash
  assert results.load_results(paths["json"])["tasks"]["B"]["mean"] is None


def test_setting_files_written_and_readable(tmp_path):
  pt = results.summarize_runs(_runs(PT), setting="toy", method="pt")
  pt_paths = results.write_setting_results(pt, tmp_path / "pt")
  # PT given as the path of its results.json.
  maml = results.summarize_runs(_runs(MAML), setting="toy", method="maml", pt=pt_paths["json"])
  paths = results.write_setting_results(maml, tmp_path / "maml")
  assert sorted(os.path.basename(p) for p in paths.values()) == [
    "results.csv",
    "results.json",
    "results.md",
    "results.png",
  ]

  # JSON: strict (NaN written as null), and reads back to the same numbers.
  text = open(paths["json"]).read()
  assert "NaN" not in text
  loaded = results.load_results(tmp_path / "maml")
  assert loaded["tasks"]["B"]["seeds"] == [13, 21, 100]
  assert loaded["tasks"]["B"]["test_scores"] == [0.4, None, 0.2]
  assert loaded["average"] == pytest.approx(0.45) and loaded["arg"] == pytest.approx(0.25)
  assert loaded["std_ddof"] == 0 and loaded["pt_source"] == pt_paths["json"]

  # Markdown: x100, NaN said in the table, average and ARG rows.
  md = open(paths["md"]).read()
  rows = {
    line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
    for line in md.splitlines()
    if line.startswith("| ")
  }
  assert rows["A"] == ["ACC", "60.0", "70.0", "50.0", f"60.0 ± {100 * math.sqrt(0.02 / 3):.1f}", "+50.0%"]
  assert rows["B"] == ["ACC", "40.0", "NaN", "20.0", "30.0 ± 10.0 (1/3 NaN)", "+0.0%"]
  assert rows["**Average**"][-2] == "45.0" and rows["**ARG**"][-1] == "+25.0%"

  # CSV: raw scores, full precision.
  with open(paths["csv"]) as f:
    table = {row["task"]: row for row in csv.DictReader(f)}
  assert float(table["A"]["mean"]) == pytest.approx(0.6)
  assert float(table["A"]["std"]) == pytest.approx(math.sqrt(0.02 / 3))
  assert math.isnan(float(table["B"]["seed_21"])) and table["B"]["n_nan"] == "1"
  assert float(table["average"]["mean"]) == pytest.approx(0.45)
  assert float(table["ARG"]["relative_gain_vs_pt"]) == pytest.approx(0.25)

  # PNG: a real image.
  with open(paths["png"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  import matplotlib.image  # pylint: disable=g-import-not-at-top

  assert matplotlib.image.imread(paths["png"]).ndim == 3

  # A task's own results.json.
  task_path = results.write_task_results(maml["tasks"]["B"], tmp_path / "maml" / "B")
  assert results.load_results(task_path)["test_scores"] == [0.4, None, 0.2]


def test_comparison_orders_pt_first_and_computes_arg(tmp_path):
  base = {"A": [0.4, 0.4, 0.4], "B": [0.3, 0.3, 0.3]}
  summaries = {
    "pt": base,
    "mtl": {"A": [0.44, 0.44, 0.44], "B": [0.3, 0.3, 0.3]},  # ARG (.1 + 0) / 2 = .05
    "maml": MAML,  # ARG .25 (B over its 2 finite seeds)
    "fomaml": {"A": [0.2, 0.2, 0.2], "B": [0.15, 0.15, 0.15]},  # ARG -.5
    "reptile": {"A": [0.4, 0.4, 0.4]},  # B missing: ARG 0 over A only
    "MyMethod": base,
  }
  given = [
    results.summarize_runs(_runs(summaries[m]), setting="toy", method=m)
    for m in ("reptile", "MyMethod", "maml", "pt", "fomaml", "mtl")
  ]
  comparison = results.compare_methods(given)
  assert comparison["methods"] == ["pt", "mtl", "maml", "fomaml", "reptile", "MyMethod"]
  assert comparison["arg"] == {
    "mtl": pytest.approx(0.05),
    "maml": pytest.approx(0.25),
    "fomaml": pytest.approx(-0.5),
    "reptile": pytest.approx(0.0),
    "MyMethod": pytest.approx(0.0),
  }
  assert comparison["average"]["mtl"] == pytest.approx(0.37)
  assert comparison["n_tasks"]["reptile"] == 1

  paths = results.write_comparison(comparison, tmp_path)
  md = open(paths["md"]).read()
  header = next(line for line in md.splitlines() if line.startswith("| task"))
  assert [c.strip() for c in header.split("|")[1:-1]] == [
    "task",
    "PT",
    "MTL",
    "MAML",
    "FoMAML",
    "Reptile",
    "MyMethod",
  ]
  first_table = md.split("\n\n| method")[0]  # the paired comparison against PT follows
  lines = [line for line in first_table.splitlines() if line.startswith("| ")]
  assert [line.split("|")[1].strip() for line in lines[1:]] == ["A", "B", "**Average**", "**ARG**"]
  assert "| MAML | 5 |" in md  # paired against PT over (task, seed) pairs: B has a NaN seed
  arg_row = [c.strip() for c in lines[-1].split("|")[2:-1]]
  assert arg_row == ["—", "+5.0%", "+25.0%", "-50.0%", "+0.0%", "+0.0%"]
  b_row = [c.strip() for c in lines[2].split("|")[2:-1]]
  assert b_row[2] == "30.0 ± 10.0 (1/3 NaN)" and b_row[4] == "—"  # NaN seed said; Reptile lacks B
  assert "(1 tasks)" in lines[3]
  with open(paths["csv"]) as f:
    reader = csv.reader(f)
    assert next(reader)[:5] == ["task", "PT_mean", "PT_std", "MTL_mean", "MTL_std"]
  assert json.load(open(paths["json"]))["methods"][0] == "pt"
  with open(paths["png"], "rb") as f:
    assert f.read(4) == b"\x89PNG"


def test_comparison_without_pt_uses_each_methods_own_arg(tmp_path):
  pt = results.summarize_runs(_runs(PT), setting="toy", method="pt")
  maml = results.summarize_runs(_runs(MAML), setting="toy", method="maml", pt=pt)
  mtl = results.summarize_runs(_runs(PT), setting="toy", method="mtl")  # no PT given: no ARG
  comparison = results.compare_methods([mtl, maml])
  assert comparison["methods"] == ["mtl", "maml"]
  assert comparison["arg"] == {"maml": pytest.approx(0.25)}
  # Through files and the command line.
  p1 = results.write_setting_results(maml, tmp_path / "maml")["json"]
  p2 = results.write_setting_results(pt, tmp_path / "pt")["json"]
  paths = results.main([p1, p2, "--out", str(tmp_path / "tables")])
  assert os.path.basename(paths["md"]) == "comparison_toy.md"
  md = open(paths["md"]).read()
  assert re.search(r"\| task \| PT \| MAML \|", md) and "+25.0%" in md


def test_bad_inputs_give_clear_errors():
  with pytest.raises(ValueError, match="lacks \\['test_score'\\]"):
    results.summarize_task("A", [{"task": "A", "seed": 1}])
  with pytest.raises(ValueError, match="more than one run for seeds \\[1\\]"):
    results.summarize_task("A", [{"task": "A", "seed": 1, "test_score": 0.1}] * 2)
  with pytest.raises(ValueError, match="nan_policy"):
    results.summarize_task("A", [{"task": "A", "seed": 1, "test_score": 0.1}], nan_policy="drop")
  a = results.summarize_runs(_runs(PT), setting="s1", method="pt")
  b = results.summarize_runs(_runs(PT), setting="s2", method="maml")
  with pytest.raises(ValueError, match="different settings"):
    results.compare_methods([a, b])
  with pytest.raises(ValueError, match="given twice"):
    results.compare_methods([a, a])
  with pytest.raises(FileNotFoundError, match="no results file"):
    results.load_results("/nonexistent/dir/results.json")


def test_run_record(tmp_path, monkeypatch):
  config = ml_collections.ConfigDict({"method": "maml", "seeds": (100, 13), "upstream": {"lr": 0.5}})
  record = results.run_record(config, tmp_path)
  stored = json.load(open(tmp_path / "run_record.json"))
  assert stored == [json.loads(json.dumps(record))]
  assert record["config"] == {"method": "maml", "seeds": [100, 13], "upstream": {"lr": 0.5}}
  for name in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy"):
    assert record["packages"][name] == metadata.version(name)
  assert re.fullmatch(r"\d+\.\d+\.\d+", record["packages"]["python"])
  assert record["devices"]["count"] == len(record["devices"]["devices"]) >= 1
  assert record["devices"]["devices"][0]["platform"] == "cpu"
  assert record["hostname"] and record["time_utc"].endswith("+00:00") and record["command_line"]
  commit = record["git"]["commit"]
  assert commit == "unknown" or re.fullmatch(r"[0-9a-f]{40}", commit)

  # Not a git checkout: "unknown", no failure. A second call (a resume) appends.
  monkeypatch.setattr(results, "__file__", str(tmp_path / "not_a_repo" / "mpt_jax" / "results.py"))
  second = results.run_record({"method": "maml", "lr": np.float32(0.5)}, tmp_path)
  assert second["git"] == {"commit": "unknown", "dirty": None}
  stored = json.load(open(tmp_path / "run_record.json"))
  assert len(stored) == 2 and stored[1]["config"] == {"method": "maml", "lr": 0.5}
