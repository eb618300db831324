"""Task-similarity analysis on a fabricated study directory whose similarities and gains are known, so
that the embeddings, cosines, gains and Spearman correlations are known exactly; chance baselines and
the paired comparison against PT on hand-made cases."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mpt_jax import analysis, baselines, results
from mpt_jax.data.crossfit import Split, TaskData

SEEDS = (100, 13)
LRS = (0.5, 0.3)
PROMPT_LENGTH = 3


def _write_task(task_dir, per_seed_vectors, init_vector=None, best_lr=0.3):
  """A finished grid: results.json, and for each seed a best-lr prompt whose rows average to the given
  vector (the other lr's prompt is noise that must be ignored), plus its initial prompt."""
  os.makedirs(os.path.join(task_dir, "prompts"), exist_ok=True)
  runs = []
  rng = np.random.default_rng(0)
  for seed, vector in zip(SEEDS, per_seed_vectors):
    vector = np.asarray(vector, np.float32)
    rows = np.tile(vector, (PROMPT_LENGTH, 1)) + np.asarray([[1.0], [-1.0], [0.0]]) * rng.normal(
      size=vector.shape
    ).astype(np.float32)  # rows differ, their mean is `vector`
    np.save(os.path.join(task_dir, "prompts", f"seed{seed}_lr{best_lr:g}.npy"), rows)
    for lr in LRS:
      if lr != best_lr:
        np.save(os.path.join(task_dir, "prompts", f"seed{seed}_lr{lr:g}.npy"), 100 + rows)
    init = (
      np.zeros_like(rows)
      if init_vector is None
      else np.tile(np.asarray(init_vector, np.float32), (PROMPT_LENGTH, 1))
    )
    np.save(os.path.join(task_dir, "prompts", f"init_seed{seed}.npy"), init)
    runs.append({"task": os.path.basename(task_dir), "seed": seed, "test_score": 0.5, "best_lr": best_lr})
  with open(os.path.join(task_dir, "results.json"), "w") as f:
    json.dump({"task": os.path.basename(task_dir), "runs": runs}, f)


def _unit(angle):
  return [math.cos(angle), math.sin(angle), 0.0]


# Sources at angles 0 and 90 degrees; targets at 10, 30, 50, 75 degrees from the first source.
SOURCES = {"s0": _unit(0.0), "s90": _unit(math.pi / 2)}
TARGET_ANGLES = {"t10": 10, "t30": 30, "t50": 50, "t75": 75}


def _study(tmp_path, name, gains_by_method):
  study = tmp_path / name
  for source, vector in SOURCES.items():
    _write_task(str(study / "pt" / "sources" / source), [vector, vector])
  for target, degrees in TARGET_ANGLES.items():
    v = _unit(math.radians(degrees))
    # Two seeds whose mean is v: the embedding is the mean over seeds.
    _write_task(str(study / "pt" / "downstream" / target), [np.multiply(v, 0.5), np.multiply(v, 1.5)])
  pt = {t: {"mean": 0.5, "std": 0.0} for t in TARGET_ANGLES}
  cells = {"pt": pt}
  for method, gains in gains_by_method.items():
    cells[method] = {t: {"mean": 0.5 * (1 + g), "std": 0.0} for t, g in gains.items()}
  comparison = {
    "setting": name,
    "methods": ["pt", *gains_by_method],
    "tasks": list(TARGET_ANGLES),
    "cells": cells,
  }
  (study / f"comparison_{name}.json").write_text(json.dumps(comparison))
  return str(study)


def test_embeddings_similarities_gains_and_correlations_are_exact(tmp_path):
  # maml gains grow with the similarity to the closest source; mtl gains shrink with it.
  maml = {"t10": 0.4, "t30": 0.3, "t50": 0.2, "t75": 0.1}
  mtl = {"t10": -0.1, "t30": 0.0, "t50": 0.1, "t75": 0.3}
  study = _study(tmp_path, "fab", {"maml": maml, "mtl": mtl})

  emb = analysis.task_embedding(os.path.join(study, "pt", "downstream", "t30"), "mean")
  np.testing.assert_allclose(emb, _unit(math.radians(30)), atol=1e-6)

  sims = analysis.setting_similarities(study, "mean")
  for target, degrees in TARGET_ANGLES.items():
    expected = {"s0": math.cos(math.radians(degrees)), "s90": math.sin(math.radians(degrees))}
    assert sims[target]["sources"] == pytest.approx(expected, abs=1e-6)
    assert sims[target]["max"] == pytest.approx(max(expected.values()), abs=1e-6)
    assert sims[target]["mean"] == pytest.approx(np.mean(list(expected.values())), abs=1e-6)

  gains = analysis.relative_gains(analysis.load_comparison(study))
  assert gains["maml"] == pytest.approx(maml)

  result = analysis.analyze([study])
  # By mean similarity (cos + sin over 2: 10 -> .578, 30 -> .683, 50 -> .704, 75 -> .612 deg) the order
  # is t10 < t75 < t30 < t50; by max similarity it is t50 < t30 < t75 < t10 (cos 50 < cos 30 < sin 75 < cos 10).
  assert [p["target"] for p in sorted(result["points"], key=lambda p: p["similarity"]["mean"]["mean"])] == [
    "t10",
    "t75",
    "t30",
    "t50",
  ]
  by_max = sorted(result["points"], key=lambda p: p["similarity"]["mean"]["max"])
  assert [p["target"] for p in by_max] == ["t50", "t30", "t75", "t10"]
  # maml's gains by max similarity: t50 .2, t30 .3, t75 .1, t10 .4 -> ranks (2, 3, 1, 4) vs (1, 2, 3, 4):
  # d^2 = 1 + 1 + 4 + 0 = 6, rho = 1 - 6 * 6 / (4 * 15) = 0.4.
  assert result["correlations"]["maml"]["mean"]["max"]["rho"] == pytest.approx(0.4)
  assert result["correlations"]["maml"]["mean"]["max"]["n"] == 4
  # mtl by mean similarity: t10 -.1, t75 .3, t30 0, t50 .1 -> ranks (1, 4, 2, 3): d^2 = 0+4+1+1 = 6 -> 0.4.
  assert result["correlations"]["mtl"]["mean"]["mean"]["rho"] == pytest.approx(0.4)
  # delta embeddings with zero initial prompts are the mean embeddings.
  assert result["correlations"]["maml"]["delta"]["max"]["rho"] == pytest.approx(0.4)


def test_delta_embedding_removes_the_initial_prompt(tmp_path):
  task_dir = str(tmp_path / "t")
  _write_task(task_dir, [[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], init_vector=[1.0, 1.0, 1.0])
  np.testing.assert_allclose(analysis.task_embedding(task_dir, "mean"), [2.0, 2.0, 2.0], atol=1e-6)
  np.testing.assert_allclose(analysis.task_embedding(task_dir, "delta"), [1.0, 1.0, 1.0], atol=1e-6)


def test_perfect_rank_agreement_pooled_over_two_settings(tmp_path):
  maml = {"t10": 0.4, "t30": 0.2, "t50": 0.1, "t75": 0.3}  # same order as the max similarity
  studies = [_study(tmp_path, name, {"maml": maml}) for name in ("a", "b")]
  result = analysis.analyze(studies)
  corr = result["correlations"]["maml"]["mean"]["max"]
  assert corr["n"] == 8 and corr["rho"] == pytest.approx(1.0)
  paths = analysis.write_report(result, str(tmp_path / "out"))
  text = open(paths["md"]).read()
  assert "+1.00" in text and "| a | t10 |" in text
  assert os.path.getsize(paths["png"]) > 0


def test_points_of_an_earlier_analysis_pool_like_its_study_directories(tmp_path):
  maml_a = {"t10": 0.4, "t30": 0.2, "t50": 0.1, "t75": 0.3}
  maml_b = {"t10": -0.2, "t30": 0.5, "t50": 0.0, "t75": 0.1}
  a = _study(tmp_path, "a", {"maml": maml_a, "mtl": maml_b})
  b = _study(tmp_path, "b", {"maml": maml_b})  # no mtl column: its points have no mtl gain
  together = analysis.analyze([a, b])
  earlier = analysis.write_report(analysis.analyze([a]), str(tmp_path / "earlier"))
  import shutil

  shutil.rmtree(a)  # the earlier setting's run directory is gone; its analysis JSON remains
  pooled = analysis.analyze([b], points_from=[earlier["json"]])
  assert [(p["setting"], p["target"]) for p in pooled["points"]] == [
    (p["setting"], p["target"]) for p in together["points"]
  ]
  for method in ("maml", "mtl"):
    for kind in analysis.EMBEDDINGS:
      for summary in analysis.SUMMARIES:
        got, want = (
          pooled["correlations"][method][kind][summary],
          together["correlations"][method][kind][summary],
        )
        assert got["n"] == want["n"] and got["rho"] == pytest.approx(want["rho"])
  assert pooled["correlations"]["mtl"]["mean"]["max"]["n"] == 4  # b's points have no mtl gain
  assert pooled["study_dirs"][0].endswith(f"(points from {earlier['json']})") and pooled["study_dirs"][1] == b
  paths = analysis.write_report(pooled, str(tmp_path / "pooled"))
  assert "| a | t10 |" in open(paths["md"]).read() and os.path.getsize(paths["png"]) > 0
  # From the command line, with no study directory at all.
  analysis.main(["--out", str(tmp_path / "cli"), "--points_from", earlier["json"]])
  assert json.load(open(tmp_path / "cli" / "similarity_analysis.json"))["points"][0]["setting"] == "a"


def test_a_point_given_twice_or_a_file_that_is_not_an_analysis_is_refused(tmp_path):
  a = _study(tmp_path, "a", {"maml": {t: 0.1 for t in TARGET_ANGLES}})
  earlier = analysis.write_report(analysis.analyze([a]), str(tmp_path / "earlier"))
  with pytest.raises(ValueError, match="'a', target 't10' appears twice"):
    analysis.analyze([a], points_from=[earlier["json"]])
  not_analysis = tmp_path / "comparison.json"
  not_analysis.write_text(json.dumps({"cells": {}}))
  with pytest.raises(ValueError, match="comparison.json: not a similarity analysis"):
    analysis.analyze([], points_from=[str(not_analysis)])


def test_missing_source_prompts_say_how_to_make_them(tmp_path):
  study = _study(tmp_path, "x", {"maml": {t: 0.0 for t in TARGET_ANGLES}})
  import shutil

  shutil.rmtree(os.path.join(study, "pt", "sources"))
  with pytest.raises(FileNotFoundError, match="prompt_tune_sources"):
    analysis.analyze([study])


def test_spearman_needs_three_varying_points():
  assert math.isnan(analysis.spearman([1, 2], [3, 4])["rho"])
  assert math.isnan(analysis.spearman([1, 2, 3], [5, 5, 5])["rho"])


# --- chance baselines ------------------------------------------------------------------------------------


def _split(task, split, rows):
  return Split(
    task, 100, split, f"{task}_{split}.tsv", tuple(r[0] for r in rows), tuple(tuple(r[1:]) for r in rows)
  )


def test_constant_answer_on_balanced_five_classes_is_two_over_c_times_c_plus_one():
  labels = ["animal", "plant", "person", "body", "food"]
  train = _split(
    "wn-noun_category_living", "train", [(f"x{i}", labels[i % 5]) for i in range(10)] + [("y", "plant")]
  )  # plant is the majority in train
  test = _split("wn-noun_category_living", "test", [(f"t{i}", labels[i % 5]) for i in range(20)])
  # macro-F1 over the gold classes: "plant" has precision 1/5, recall 1 -> F1 1/3; the others 0.
  assert baselines.constant_answer_score(train, test, "Classification-F1") == pytest.approx(1 / 15)
  random = baselines.random_guess_score(train, test, "Classification-F1")
  assert 0.1 < random < 0.3  # about 1/5 in expectation


def test_random_guess_on_balanced_binary_accuracy_is_about_a_half():
  train = _split("wn-antonym_pair", "train", [("a", "opposite"), ("b", "similar")])
  test = _split("wn-antonym_pair", "test", [(f"t{i}", "opposite" if i % 2 else "similar") for i in range(40)])
  assert baselines.constant_answer_score(train, test, "ACC") == pytest.approx(0.5)
  assert baselines.random_guess_score(train, test, "ACC") == pytest.approx(0.5, abs=0.02)
  data = TaskData("wn-antonym_pair", 16, {(100, "train"): train, (100, "test"): test})
  assert baselines.task_baselines(data, [100], "ACC")["constant"] == pytest.approx(0.5)


# --- paired comparison against PT ------------------------------------------------------------------------


def _summary(method, scores_by_task):
  return results.summarize_runs(
    [
      {"task": t, "seed": s, "test_score": x}
      for t, scores in scores_by_task.items()
      for s, x in zip((100, 13, 21), scores)
    ],
    setting="s",
    method=method,
  )


def test_paired_comparison_counts_pairs_and_matches_the_exact_wilcoxon():
  pt = _summary("pt", {"A": [0.1, 0.1, 0.1], "B": [0.5, 0.5, 0.5]})
  # differences: A +.1 +.2 +.3, B +.4 0 +.5 -> five positive, one tie dropped.
  maml = _summary("maml", {"A": [0.2, 0.3, 0.4], "B": [0.9, 0.5, 1.0]})
  paired = results.paired_comparison(maml, pt)
  assert (paired["n_pairs"], paired["wins"], paired["ties"], paired["losses"]) == (6, 5, 1, 0)
  assert paired["mean_difference"] == pytest.approx(1.5 / 6)
  # all 5 non-zero differences positive: exact two-sided p = 2 / 2^5.
  assert paired["wilcoxon_p"] == pytest.approx(2 / 32)
  low, high = paired["bootstrap_ci95"]
  assert 0 <= low < paired["mean_difference"] < high <= 0.5
  comparison = results.compare_methods(
    [pt, maml], baselines={"A": {"constant": 0.1, "random": 0.2}, "B": {"constant": 0.5, "random": 0.5}}
  )
  assert comparison["paired"]["maml"]["n_pairs"] == 6
  assert comparison["baseline_average"] == pytest.approx({"constant": 0.3, "random": 0.35})
  text = results.comparison_table_markdown(comparison)
  assert "constant answer" in text and "| 30.0 | 35.0 |" in text and "5/1/0" in text


def test_paired_comparison_all_ties_gives_p_one():
  pt = _summary("pt", {"A": [0.5, 0.5, 0.5]})
  paired = results.paired_comparison(_summary("mtl", {"A": [0.5, 0.5, 0.5]}), pt)
  assert paired["wilcoxon_p"] == 1.0 and paired["mean_difference"] == 0.0
