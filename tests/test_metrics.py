"""The 7 CrossFit metrics: hand-computed values, edge cases, and agreement with an independent
re-implementation of CrossFit's dataloader/metrics.py (written here from CrossFit's source)."""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections import Counter

import numpy as np
import pytest
from rouge import Rouge
from scipy.stats import pearsonr
from sklearn.metrics import f1_score, matthews_corrcoef

from mpt_jax import metrics


# ---------------------------------------------------------------------------------------------------
# Reference: CrossFit's evaluate(predictions, data, metric), data = [(input, [golds...]), ...].
# Re-written from INK-USC/CrossFit dataloader/metrics.py; mirrors its control flow, not this module's.
# ---------------------------------------------------------------------------------------------------
def _ref_normalize(s):
  s = s.lower()
  s = "".join(ch for ch in s if ch not in set(string.punctuation))
  s = re.sub(r"\b(a|an|the)\b", " ", s)
  return " ".join(s.split())


def _ref_over_list(fn, prediction, golds):
  if len(golds) == 0:
    return 0
  return np.max([fn(prediction, g) for g in golds])


def _ref_f1(prediction, gold):
  p, g = _ref_normalize(prediction).split(), _ref_normalize(gold).split()
  same = sum((Counter(p) & Counter(g)).values())
  if same == 0:
    return 0
  precision, recall = 1.0 * same / len(p), 1.0 * same / len(g)
  return (2 * precision * recall) / (precision + recall)


def _ref_rouge(prediction, golds):
  if len("".join(ch for ch in prediction if ch not in set(string.punctuation))) == 0:
    return 0.0
  rouge = Rouge()  # all default metrics, as CrossFit built it
  if len(golds) == 0:
    return 0
  return np.max([rouge.get_scores(prediction, g, avg=True)["rouge-l"]["f"] for g in golds])


def _ref_evaluate(predictions, data, metric):
  assert len(predictions) == len(data)
  if metric == "EM":
    return np.mean(
      [
        _ref_over_list(lambda p, g: _ref_normalize(p) == _ref_normalize(g), p, dp[1])
        for p, dp in zip(predictions, data)
      ]
    )
  if metric == "ACC":
    return np.mean(
      [_ref_over_list(lambda p, g: p.lower() == g.lower(), p, dp[1]) for p, dp in zip(predictions, data)]
    )
  if metric == "QA-F1":
    return np.mean([_ref_over_list(_ref_f1, p, dp[1]) for p, dp in zip(predictions, data)])
  if metric == "Classification-F1":
    return f1_score([dp[1][0] for dp in data], predictions, average="macro")
  if metric == "Matthew-Correlation":
    preds = [1.0 if p.strip() == "acceptable" else 0.0 for p in predictions]
    golds = [1.0 if dp[1][0] == "acceptable" else 0.0 for dp in data]
    return matthews_corrcoef(golds, preds)
  if metric == "Pearson-Correlation":
    floats = []
    for p in predictions:
      try:
        floats.append(float(p.strip()))
      except:  # noqa: E722  (CrossFit's bare except)
        floats.append(float("NaN"))
    return pearsonr([float(dp[1][0]) for dp in data], floats)[0]
  if metric == "Rouge-L":
    return np.mean([_ref_rouge(p, dp[1]) for p, dp in zip(predictions, data)])
  raise AssertionError(metric)


def _ref_evaluate_task(predictions, data, metric):
  """CrossFit's NLPFewshotGymSingleTaskData.evaluate: strip predictions, then evaluate."""
  return _ref_evaluate([p.strip() for p in predictions], data, metric)


# ---------------------------------------------------------------------------------------------------
# Hand-computed values.
# ---------------------------------------------------------------------------------------------------
def test_normalize_answer_lowercases_strips_punctuation_articles_and_spaces():
  assert metrics.normalize_answer("The  Cat's, a HAT!") == "cats hat"
  assert metrics.normalize_answer("An apple\tthe end.") == "apple end"
  # "a" inside a word is not an article; punctuation goes before articles are matched.
  assert metrics.normalize_answer("banana-a") == "bananaa"
  assert metrics.normalize_answer("a.") == ""


def test_exact_match_normalizes_and_takes_max_over_golds():
  assert metrics.exact_match("The cat.", ["cat"]) == 1.0
  assert metrics.exact_match("cat", ["dog", "A cat!"]) == 1.0  # max over golds
  assert metrics.exact_match("cats", ["cat"]) == 0.0
  assert metrics.exact_match("cat", []) == 0.0
  # mean over examples: 1, 1, 0 -> 2/3
  assert metrics.score(
    "EM", ["The cat.", "cat", "cats"], [["cat"], ["dog", "A cat!"], ["cat"]]
  ) == pytest.approx(2 / 3)


def test_accuracy_compares_lowercased_strings_only():
  assert metrics.accuracy("Positive", ["positive"]) == 1.0
  assert metrics.accuracy("positive.", ["positive"]) == 0.0  # no punctuation stripping
  assert metrics.accuracy("the positive", ["positive"]) == 0.0  # no article stripping
  assert metrics.accuracy("neg", ["pos", "NEG"]) == 1.0
  # score() uses predictions as given; evaluate() strips them first (CrossFit's data wrapper).
  assert metrics.score("ACC", [" positive"], [["positive"]]) == 0.0
  assert metrics.evaluate("boolq", [" positive\n"], [["positive"]], metric="ACC") == 1.0
  assert metrics.score("ACC", ["a", "b", "c", "d"], [["a"], ["B"], ["x"], ["y", "d"]]) == 0.75


def test_qa_f1_token_f1_max_over_golds():
  # pred tokens [big, red, dog]; gold "a red dog" -> [red, dog]: P 2/3, R 1, F 0.8;
  # gold "big cat" -> [big, cat]: P 1/3, R 1/2, F 0.4. Max 0.8.
  assert metrics.qa_f1("the big red dog", ["a red dog", "big cat"]) == pytest.approx(0.8)
  assert metrics.qa_f1("dog dog", ["dog"]) == pytest.approx(2 * 0.5 * 1 / 1.5)  # repeated tokens
  assert metrics.qa_f1("the", ["a"]) == 0.0  # both empty after normalization
  assert metrics.score("QA-F1", ["the big red dog", "x"], [["a red dog", "big cat"], ["y"]]) == pytest.approx(
    0.4
  )


def test_classification_f1_uses_first_gold_and_free_text_is_an_extra_class():
  golds = [["pos"], ["neg"], ["pos"], ["neg"]]
  predictions = ["pos", "neg", "neg", "maybe so"]
  # pos: P 1, R 1/2 -> F 2/3; neg: P 1/2, R 1/2 -> F 1/2; "maybe so": F 0. Macro over 3 classes.
  assert metrics.score("Classification-F1", predictions, golds) == pytest.approx((2 / 3 + 1 / 2) / 3)
  # Only the first gold counts: a prediction matching the second gold is wrong.
  assert metrics.score("Classification-F1", ["pos", "neg"], [["neg", "pos"], ["neg"]]) == pytest.approx(
    (0 + 2 / 3) / 2
  )  # pos: P 0 -> F 0; neg: P 1, R 1/2 -> F 2/3
  assert metrics.score("Classification-F1", ["a", "b"], [["a"], ["b"]]) == 1.0


def test_matthews_correlation_cola_conventions():
  golds = [["acceptable"], ["unacceptable"], ["acceptable"], ["unacceptable"]]
  # Prediction: stripped, case-sensitive. -> [1, 0, 0, 0]; gold [1, 0, 1, 0].
  predictions = [" acceptable ", "unacceptable", "Acceptable", "junk"]
  # TP 1, TN 2, FP 0, FN 1: (1*2 - 0*1) / sqrt(1 * 2 * 2 * 3)
  assert metrics.score("Matthew-Correlation", predictions, golds) == pytest.approx(2 / math.sqrt(12))
  # A gold is compared exactly (not stripped): " acceptable" is a 0.
  assert metrics.score("Matthew-Correlation", ["acceptable", "x"], [[" acceptable"], ["x"]]) == 0.0
  assert metrics.score("Matthew-Correlation", ["acceptable", "x"], [["acceptable"], ["x"]]) == 1.0


def test_pearson_correlation_and_nan_on_unparsable_prediction():
  golds = [["1"], ["2"], ["3"]]
  # x = [1, 2, 3], y = [1, 2.5, 2]: sum dx dy = 1, sum dx^2 = 2, sum dy^2 = 7/6 -> 1 / sqrt(7/3)
  assert metrics.score("Pearson-Correlation", ["1", " 2.5 ", "2"], golds) == pytest.approx(
    1 / math.sqrt(7 / 3)
  )
  assert math.isnan(metrics.score("Pearson-Correlation", ["1", "two", "2"], golds))
  assert math.isnan(metrics.score("Pearson-Correlation", ["1", "1", "1"], golds))  # constant
  with pytest.raises(ValueError, match="not a number"):
    metrics.score("Pearson-Correlation", ["1", "2"], [["1"], ["many"]])


def test_rouge_l_values_max_over_golds_and_empty_after_punctuation():
  # Single sentences, no repeated words: LCS 3, R 3/5, P 3/3; the package's F = 2PR / (P + R + 1e-8).
  p, r = 1.0, 0.6
  assert metrics.rouge_l("cat sat on", ["a cat sat on mat"]) == pytest.approx(2 * p * r / (p + r + 1e-8))
  assert metrics.rouge_l("cat sat on", ["dog", "a cat sat on mat"]) == pytest.approx(
    2 * p * r / (p + r + 1e-8)
  )  # max over golds
  assert metrics.rouge_l("...", ["a cat"]) == 0.0
  assert metrics.rouge_l("", ["a cat"]) == 0.0
  assert metrics.rouge_l("cat", []) == 0.0
  # A gold the package rejects as empty scores 0 (CrossFit would crash), the others still count.
  assert metrics.rouge_l("cat", ["", ".", "cat"]) == pytest.approx(1.0, abs=1e-7)
  assert metrics.rouge_l("cat", ["."]) == 0.0


# ---------------------------------------------------------------------------------------------------
# Agreement with the CrossFit re-implementation on a mixed corpus.
# ---------------------------------------------------------------------------------------------------
_TEXT_CORPUS = [
  ("The Eiffel Tower.", ["Eiffel tower", "the eiffel tower in paris"]),
  ("  paris, france ", ["Paris"]),
  ("an apple a day", ["apple day", "an orange"]),
  ("", ["something"]),
  ("...", ["dots."]),
  ("42", ["forty-two", "42."]),
  ("New York City is big. It is old.", ["New York is big", "the city is old. it is big."]),
  ("yes", ["Yes"]),
  ("no!", ["no"]),
  ("the the the", ["the"]),
  ("cat dog cat dog bird", ["dog cat bird", "bird"]),
  ("x", []),
]


@pytest.mark.parametrize("metric", ["EM", "ACC", "QA-F1", "Rouge-L"])
def test_per_example_metrics_match_crossfit(metric):
  predictions = [p for p, _ in _TEXT_CORPUS]
  data = [("input", g) for _, g in _TEXT_CORPUS]
  golds = [g for _, g in _TEXT_CORPUS]
  assert metrics.score(metric, predictions, golds) == pytest.approx(
    _ref_evaluate(predictions, data, metric), abs=1e-12
  )
  assert metrics.evaluate("any", predictions, golds, metric=metric) == pytest.approx(
    _ref_evaluate_task(predictions, data, metric), abs=1e-12
  )


def test_corpus_metrics_match_crossfit():
  labels = ["positive", "negative", "neutral"]
  rng = np.random.default_rng(0)
  golds = [[labels[i]] + (["other"] if i == 0 else []) for i in rng.integers(0, 3, 40)]
  predictions = [
    labels[i] if i < 3 else ("I think positive" if i == 3 else " negative ") for i in rng.integers(0, 5, 40)
  ]
  data = [("input", g) for g in golds]
  for metric in ("Classification-F1", "ACC", "EM"):
    assert metrics.evaluate("t", predictions, golds, metric=metric) == pytest.approx(
      _ref_evaluate_task(predictions, data, metric), abs=1e-12
    )

  cola = ["acceptable", "unacceptable"]
  golds = [[cola[i]] for i in rng.integers(0, 2, 30)]
  predictions = [
    [" acceptable", "unacceptable", "Acceptable", "acceptable"][i] for i in rng.integers(0, 4, 30)
  ]
  data = [("input", g) for g in golds]
  assert metrics.score("Matthew-Correlation", predictions, golds) == pytest.approx(
    _ref_evaluate(predictions, data, "Matthew-Correlation"), abs=1e-12
  )

  values = rng.uniform(1, 5, 25)
  golds = [[f"{v:.1f}"] for v in values]
  predictions = [f" {v + rng.normal():.2f}" for v in values]
  data = [("input", g) for g in golds]
  assert metrics.score("Pearson-Correlation", predictions, golds) == pytest.approx(
    _ref_evaluate(predictions, data, "Pearson-Correlation"), abs=1e-12
  )
  predictions[3] = "four"
  with np.errstate(invalid="ignore"):
    assert np.isnan(_ref_evaluate(predictions, data, "Pearson-Correlation"))
  assert np.isnan(metrics.score("Pearson-Correlation", predictions, golds))


# ---------------------------------------------------------------------------------------------------
# Task -> metric, and input errors.
# ---------------------------------------------------------------------------------------------------
def test_evaluate_picks_the_task_metric():
  # glue-cola is Matthew-Correlation: "Acceptable" would be right under ACC but is a 0 here.
  golds = [["acceptable"], ["unacceptable"]]
  assert metrics.evaluate("glue-cola", ["acceptable", "unacceptable"], golds) == 1.0
  assert metrics.evaluate("glue-cola", ["Acceptable", "unacceptable"], golds) == 0.0
  assert metrics.evaluate("glue-cola", ["Acceptable", "unacceptable"], golds, metric="ACC") == 1.0
  # squad-with_context is QA-F1 (0.8), squad-no_context is EM (0).
  assert metrics.evaluate("squad-with_context", ["the big red dog"], [["a red dog"]]) == pytest.approx(0.8)
  assert metrics.evaluate("squad-no_context", ["the big red dog"], [["a red dog"]]) == 0.0


def test_every_crossfit_task_metric_is_one_of_the_seven():
  path = os.path.join(os.path.dirname(metrics.__file__), "data", "crossfit_task_metrics.json")
  with open(path) as f:
    table = json.load(f)
  assert len(table) == 160 and set(table.values()) == set(metrics.METRIC_NAMES)


def test_bad_inputs_give_clear_errors():
  with pytest.raises(ValueError, match="unknown metric"):
    metrics.score("BLEU", ["a"], [["a"]])
  with pytest.raises(ValueError, match="2 predictions but 1 gold"):
    metrics.score("EM", ["a", "b"], [["a"]])
  with pytest.raises(ValueError, match="list of strings"):
    metrics.score("EM", ["a"], ["a"])  # golds must be lists of answers, not bare strings
  with pytest.raises(ValueError, match="no examples"):
    metrics.score("EM", [], [])
  with pytest.raises(ValueError, match="no gold answer"):
    metrics.score("Classification-F1", ["a"], [[]])
  with pytest.raises((ValueError, KeyError), match="not-a-task"):
    metrics.evaluate("not-a-task", ["a"], [["a"]])
