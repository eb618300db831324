"""What a researcher reads of a finished grid: every run's own TensorBoard series with the best-dev choice
marked, the plot of the dev curves, the comparison table's links to them, and the dev and test
predictions of each seed's tested prompt, which re-score to the reported test score."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

import helpers_t5
from mpt_jax import adapt, config as config_lib, logs, metrics, pipeline, results

TASK = "synth-sentiment_d"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
  """A tiny PT run on the synthetic gym, rank-classifying its classification target."""
  tmp_path = tmp_path_factory.mktemp("outputs")
  config = config_lib.base_config("pt", "synth_mini", "tiny")
  config.gym, config.dropout_rate = "synthetic", 0.0
  config.model = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  config.downstream.decoding = "auto"  # rank classification over the task's train labels
  workdir = tmp_path / "pt"
  summary = pipeline.run(config, str(workdir))
  return config, workdir, summary


def read_predictions(task_dir) -> list[dict]:
  return [json.loads(line) for line in (task_dir / results.PREDICTIONS_FILE).read_text().splitlines()]


def test_saved_predictions_rescore_to_the_reported_test_score(finished):
  config, workdir, summary = finished
  task_dir = workdir / results.DOWNSTREAM_DIR / TASK
  records = read_predictions(task_dir)
  runs = {r["seed"]: r for r in summary["tasks"][TASK]["runs"]}
  assert sorted(runs) == sorted(config.seeds)
  for seed, run in runs.items():
    for split in ("dev", "test"):
      mine = [r for r in records if r["seed"] == seed and r["split"] == split]
      assert [r["index"] for r in mine] == list(range(len(mine))) and mine
      assert {(r["learning_rate"], r["step"]) for r in mine} == {(run["best_lr"], run["tested_step"])}
      for record in mine:  # rank classification: what it chose from, and it chose the best
        scores = record["label_scores"]
        assert record["prediction"] == max(scores, key=scores.get)
        assert record["input"].startswith(f"[{TASK}]")
    test = [r for r in records if r["seed"] == seed and r["split"] == "test"]
    rescored = metrics.evaluate(TASK, [r["prediction"] for r in test], [r["gold"] for r in test])
    assert rescored == run["test_score"]


def test_every_run_has_its_own_tensorboard_series_with_the_choice_marked(finished):
  config, workdir, summary = finished
  task_dir = workdir / results.DOWNSTREAM_DIR / TASK
  d = config.downstream
  chosen = {(r["seed"], r["best_lr"]): r for r in summary["tasks"][TASK]["runs"]}
  curve = json.loads((task_dir / results.DEV_CURVE_FILE).read_text())
  assert len(curve["runs"]) == len(config.seeds) * len(d.lrs)
  for r, name in enumerate(curve["runs"]):
    seed, lr = curve["seeds"][r], curve["learning_rates"][r]
    assert name == adapt.Run(seed, lr).name
    events = logs.read_events(task_dir / "logs" / "runs" / name)
    own = [(step, scores[r]) for step, scores in curve["curve"] if scores[r] is not None]
    assert [s for s, _ in events["dev_score"]] == [s for s, _ in own]
    np.testing.assert_allclose([v for _, v in events["dev_score"]], [v for _, v in own], rtol=1e-6)
    assert [s for s, _ in events["loss"]] == [s for s, _ in own]
    (best_step, best), *_ = events["best_dev_score"]
    assert best == pytest.approx(max(v for _, v in own), rel=1e-6)
    if (seed, lr) in chosen:  # the seed's chosen run, marked at its best step with its learning rate
      run = chosen[(seed, lr)]
      assert events["chosen_dev_score"] == [(run["best_step"], pytest.approx(run["dev_score"], rel=1e-6))]
      assert events["chosen_learning_rate"] == [(run["best_step"], pytest.approx(lr))]
      assert best_step == run["best_step"]
    else:
      assert "chosen_dev_score" not in events
  assert (task_dir / results.DEV_CURVES_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # the run's ETA: its only grid is its last stage, so the run's ETA is the stage's
  perf = [r for r in logs.read_metrics(task_dir / "logs" / "metrics.jsonl") if f"{TASK}/perf/eta_run_s" in r]
  assert perf and all(r[f"{TASK}/perf/eta_run_s"] == r[f"{TASK}/perf/eta_stage_s"] for r in perf)
  assert all(r[f"{TASK}/perf/eta_run_lower_bound"] == 0.0 for r in perf)


def test_the_comparison_table_links_each_cell_to_its_grid(finished, tmp_path):
  _, workdir, summary = finished
  comparison = results.compare_methods([summary])
  files = results.write_comparison(comparison, workdir.parent, name="linked", run_dirs={"pt": workdir.name})
  text = open(files["md"]).read()
  links = re.findall(r"\[[^\]]+\]\(([^)]+)\)", text)
  assert links == [f"pt/{results.DOWNSTREAM_DIR}/{TASK}/{results.DEV_CURVES_PLOT}"]
  assert (workdir.parent / links[0]).exists()
  # without run_dirs, the same table without the links
  unlinked = re.sub(r"\[([^\]]+)\]\([^)]+\)", r"\1", text)
  rows = lambda md: [line for line in md.splitlines() if line.startswith("|")]  # noqa: E731
  assert rows(unlinked) == rows(results.comparison_table_markdown(comparison))


def write_predictions(task_dir, records):
  task_dir.mkdir(parents=True)
  (task_dir / results.PREDICTIONS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records))


def record(seed, index, gold, prediction, split="test"):
  return {
    "seed": seed,
    "index": index,
    "split": split,
    "input": f"x{index}",
    "gold": [gold],
    "prediction": prediction,
  }


def test_two_methods_compare_example_by_example(tmp_path):
  """Wins, losses and ties counted by hand; each method's label confusion and most predicted label."""
  from mpt_jax import analysis

  golds = ["happy", "sad", "sad", "happy"]
  a = ["happy", "sad", "happy", "happy"]  # right on 0, 1, 3
  b = ["sad", "sad", "sad", "sad"]  # collapsed to "sad": right on 1, 2
  for name, predictions in (("A", a), ("B", b)):
    records = [record(7, i, g, p) for i, (g, p) in enumerate(zip(golds, predictions))]
    records.append(record(7, 0, "happy", "sad", split="dev"))  # dev lines do not count for test
    write_predictions(tmp_path / name / results.DOWNSTREAM_DIR / TASK, records)
  paths = analysis.main(
    ["--compare", str(tmp_path / "A"), str(tmp_path / "B"), f"--config.out={tmp_path / 'out'}"]
  )
  report = json.loads(open(paths["json"]).read())["tasks"][TASK]
  assert (report["n"], report["wins"], report["losses"], report["ties"]) == (4, 2, 1, 1)
  assert [e["index"] for e in report["win_examples"]] == [0, 3]
  assert [e["index"] for e in report["loss_examples"]] == [2]
  assert report["a_mean_example_score"] == 0.75 and report["b_mean_example_score"] == 0.5
  assert report["a_confusion"] == {"happy": {"happy": 2}, "sad": {"happy": 1, "sad": 1}}
  assert report["b_confusion"] == {"happy": {"sad": 2}, "sad": {"sad": 2}}
  assert report["b_predicted"] == {"sad": 4}
  assert f"| {TASK} | {report['metric']} | 4 | 75.0 | 50.0 | 2 | 1 | 1 |" in open(paths["md"]).read()
  # not the same examples: refused, naming the task and the example
  write_predictions(tmp_path / "C" / TASK, [record(7, i, "happy", "happy") for i in range(4)])
  with pytest.raises(ValueError, match=f"{TASK}: seed 7 example 1 has gold"):
    analysis.main(
      ["--compare", str(tmp_path / "A"), str(tmp_path / "C" / TASK), f"--out={tmp_path / 'out2'}"]
    )
  with pytest.raises(FileNotFoundError, match="no predictions.jsonl"):
    analysis.main(["--compare", str(tmp_path / "A"), str(tmp_path), f"--out={tmp_path / 'out3'}"])


def test_the_metric_comes_from_the_results_beside_the_predictions(tmp_path):
  """A task no gym of this process knows (a data_dir's tasks.json, a gym registered elsewhere) is scored
  by the metric its results.json names; two runs scored by different metrics are refused."""
  from mpt_jax import prediction_analysis

  for name, metric in (("A", "EM"), ("B", "EM"), ("C", "ACC")):
    task_dir = tmp_path / name / results.DOWNSTREAM_DIR / "my-own-task"
    write_predictions(task_dir, [record(1, 0, "yes", "yes" if name == "A" else "no")])
    (task_dir / results.RESULTS_FILE).write_text(json.dumps({"task": "my-own-task", "metric": metric}))
  report = prediction_analysis.compare(str(tmp_path / "A"), str(tmp_path / "B"))["tasks"]["my-own-task"]
  assert (report["metric"], report["wins"], report["losses"]) == ("EM", 1, 0)
  with pytest.raises(ValueError, match="my-own-task: A's results are scored by EM, B's by ACC"):
    prediction_analysis.compare(str(tmp_path / "A"), str(tmp_path / "C"))


def test_a_run_compared_with_itself_ties_everywhere(finished, tmp_path):
  from mpt_jax import prediction_analysis

  config, workdir, _ = finished
  report = prediction_analysis.compare(str(workdir), str(workdir))["tasks"][TASK]
  assert report["ties"] == report["n"] and report["wins"] == report["losses"] == 0
  assert report["n"] > 0 and report["seeds"] == sorted(config.seeds)
  assert report["a_confusion"] == report["b_confusion"]


@pytest.mark.parametrize("metric", ["EM", "ACC", "QA-F1", "Rouge-L"])
def test_example_scores_average_to_the_metric(metric):
  predictions = ["the cat", "a dog ", "bird", "fish tank"]
  golds = [["cat"], ["dog", "puppy"], ["bird"], ["a fish"]]
  per_example = metrics.example_scores(TASK, predictions, golds, metric)
  assert np.mean(per_example) == pytest.approx(metrics.evaluate(TASK, predictions, golds, metric), abs=1e-12)
