"""The 7 CrossFit metrics, with CrossFit's exact definitions (INK-USC/CrossFit, dataloader/metrics.py).

The study reports these numbers, so they follow CrossFit's code rather than "cleaner" variants:

- EM / QA-F1: SQuAD normalization (lowercase, drop ASCII punctuation, drop the words a/an/the,
  squeeze whitespace); QA-F1 is token-level F1 of the normalized strings.
- ACC: the lowercased strings compared as they are (no punctuation or whitespace normalization).
- EM, ACC, QA-F1, Rouge-L: max over an example's golds (0 for an example without golds), then the
  mean over examples.
- Classification-F1: sklearn's macro F1 of the FIRST gold vs the prediction. Labels are the union of
  golds and predictions, so each free-text prediction becomes an extra class that scores 0 and pulls
  the macro average down.
- Matthew-Correlation (glue-cola): a prediction is 1 when `prediction.strip() == "acceptable"`, a
  gold when `gold == "acceptable"` exactly; sklearn's `matthews_corrcoef`.
- Pearson-Correlation: scipy's `pearsonr` of float(first gold) vs float(prediction.strip()); a
  prediction that fails the cast becomes NaN, and the score is then NaN (scipy propagates it). A
  constant column also gives NaN (scipy warns).
- Rouge-L: the "f" of "rouge-l" from the `rouge` package 1.0.1 (summary-level LCS over "."-split
  sentences, duplicate tokens counted once), max over golds; 0.0 for a prediction that is empty
  after ASCII punctuation removal.

`score(metric, ...)` is CrossFit's `evaluate(predictions, data, metric)`. `evaluate(task, ...)` is what
CrossFit's dataset wrapper did around it: strip every prediction first, then score with the task's
metric. Use `evaluate` for the study's numbers.

Where CrossFit's code crashes or returns None, this module raises one clear ValueError instead
(unknown metric, mismatched lengths, a non-numeric gold under Pearson, an example without golds under a
first-gold metric), with one deliberate exception: a gold that the rouge package rejects as empty
(e.g. "" or ".") scores 0.0 for that gold instead of aborting a whole evaluation.
"""

from __future__ import annotations

import collections
import functools
import re
import string
import warnings
from collections.abc import Callable, Sequence

import numpy as np

EM = "EM"
ACC = "ACC"
QA_F1 = "QA-F1"
CLASSIFICATION_F1 = "Classification-F1"
MATTHEW_CORRELATION = "Matthew-Correlation"
PEARSON_CORRELATION = "Pearson-Correlation"
ROUGE_L = "Rouge-L"
METRIC_NAMES = (EM, ACC, QA_F1, CLASSIFICATION_F1, MATTHEW_CORRELATION, PEARSON_CORRELATION, ROUGE_L)
# Those of a task with a fixed label set (decoded by rank classification under decoding "auto")
CLASSIFICATION_METRICS = (ACC, CLASSIFICATION_F1, MATTHEW_CORRELATION)

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


# ---------------------------------------------------------------------------------------------------
# Per-example scores (max over golds).
# ---------------------------------------------------------------------------------------------------
def _remove_punctuation(text: str) -> str:
  return "".join(ch for ch in text if ch not in _PUNCTUATION)


def normalize_answer(text: str) -> str:
  """SQuAD normalization in CrossFit's order: lowercase, punctuation, articles, whitespace."""
  text = _remove_punctuation(text.lower())
  text = _ARTICLES.sub(" ", text)
  return " ".join(text.split())


def _max_over_golds(
  example_score: Callable[[str, str], float], prediction: str, golds: Sequence[str]
) -> float:
  if not golds:  # CrossFit: an example without golds scores 0.
    return 0.0
  return float(max(example_score(prediction, gold) for gold in golds))


def _exact_match_one(prediction: str, gold: str) -> float:
  return float(normalize_answer(prediction) == normalize_answer(gold))


def _accuracy_one(prediction: str, gold: str) -> float:
  return float(prediction.lower() == gold.lower())


def _qa_f1_one(prediction: str, gold: str) -> float:
  prediction_tokens = normalize_answer(prediction).split()
  gold_tokens = normalize_answer(gold).split()
  num_same = sum((collections.Counter(prediction_tokens) & collections.Counter(gold_tokens)).values())
  if num_same == 0:
    return 0.0
  precision = num_same / len(prediction_tokens)
  recall = num_same / len(gold_tokens)
  return 2 * precision * recall / (precision + recall)


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
  from rouge import Rouge  # pylint: disable=g-import-not-at-top

  # Only rouge-l "f" is read; CrossFit built Rouge() with all metrics, which gives the same rouge-l.
  return Rouge(metrics=["rouge-l"], stats=["f"])


def _rouge_l_one(prediction: str, gold: str) -> float:
  try:
    return float(_rouge_scorer().get_scores(prediction, gold, avg=True)["rouge-l"]["f"])
  except ValueError as e:
    # The rouge package rejects a gold (or prediction) with no words between the "."s. CrossFit would
    # crash here; such a gold cannot be matched, so it scores 0.
    if "empty" in str(e) or "at least 1 sentence" in str(e):
      return 0.0
    raise


def exact_match(prediction: str, golds: Sequence[str]) -> float:
  """1.0 when the normalized prediction equals some normalized gold."""
  return _max_over_golds(_exact_match_one, prediction, golds)


def accuracy(prediction: str, golds: Sequence[str]) -> float:
  """1.0 when the lowercased prediction equals some lowercased gold (nothing else normalized)."""
  return _max_over_golds(_accuracy_one, prediction, golds)


def qa_f1(prediction: str, golds: Sequence[str]) -> float:
  """Best token-level F1 of the normalized prediction against any normalized gold."""
  return _max_over_golds(_qa_f1_one, prediction, golds)


def rouge_l(prediction: str, golds: Sequence[str]) -> float:
  """Best rouge-l F (rouge 1.0.1) against any gold; 0.0 when nothing is left after punctuation."""
  if not _remove_punctuation(prediction):
    return 0.0
  return _max_over_golds(_rouge_l_one, prediction, golds)


_PER_EXAMPLE = {EM: exact_match, ACC: accuracy, QA_F1: qa_f1, ROUGE_L: rouge_l}


# ---------------------------------------------------------------------------------------------------
# Corpus-level scores (first gold only).
# ---------------------------------------------------------------------------------------------------
def _first_golds(golds: Sequence[Sequence[str]], metric: str) -> list[str]:
  for i, example_golds in enumerate(golds):
    if not example_golds:
      raise ValueError(
        f"{metric}: example {i} has no gold answer; {metric} scores the first gold of "
        "every example, so each needs at least one (check the task's .tsv lines)"
      )
  return [example_golds[0] for example_golds in golds]


def classification_f1(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
  """Macro F1 over the union of first-gold labels and predictions (free text = extra 0-F1 class)."""
  from sklearn.metrics import f1_score  # pylint: disable=g-import-not-at-top

  # zero_division=0 is the value sklearn's default ("warn") uses too, without the warning.
  return float(
    f1_score(_first_golds(golds, CLASSIFICATION_F1), list(predictions), average="macro", zero_division=0)
  )


def matthews_correlation(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
  """glue-cola: prediction 1 iff `strip() == "acceptable"`, gold 1 iff `== "acceptable"` exactly."""
  from sklearn.metrics import matthews_corrcoef  # pylint: disable=g-import-not-at-top

  gold_labels = [1.0 if gold == "acceptable" else 0.0 for gold in _first_golds(golds, MATTHEW_CORRELATION)]
  predicted_labels = [1.0 if prediction.strip() == "acceptable" else 0.0 for prediction in predictions]
  return float(matthews_corrcoef(gold_labels, predicted_labels))


def _to_float_or_nan(prediction: str) -> float:
  try:
    return float(prediction.strip())
  except ValueError:
    return float("nan")


def pearson_correlation(predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
  """scipy pearsonr of float golds vs float predictions; an unparsable prediction makes it NaN."""
  from scipy.stats import pearsonr  # pylint: disable=g-import-not-at-top

  gold_values = []
  for i, gold in enumerate(_first_golds(golds, PEARSON_CORRELATION)):
    try:
      gold_values.append(float(gold))
    except ValueError:
      raise ValueError(
        f"{PEARSON_CORRELATION}: gold {gold!r} of example {i} is not a number; this "
        "metric is for regression tasks with numeric answers"
      ) from None
  predicted_values = [_to_float_or_nan(prediction) for prediction in predictions]
  if len(gold_values) < 2:
    raise ValueError(f"{PEARSON_CORRELATION} needs at least 2 examples, got {len(gold_values)}")
  if any(np.isnan(predicted_values)):
    return float("nan")  # What scipy returns too; skip its computation (and warnings).
  with warnings.catch_warnings():
    # A constant column: scipy warns and returns NaN, which is the score.
    warnings.simplefilter("ignore")
    return float(pearsonr(gold_values, predicted_values)[0])


_CORPUS_LEVEL = {
  CLASSIFICATION_F1: classification_f1,
  MATTHEW_CORRELATION: matthews_correlation,
  PEARSON_CORRELATION: pearson_correlation,
}
FIRST_GOLD_METRICS = tuple(_CORPUS_LEVEL)  # they need a gold in every example


# ---------------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------------
def _check_inputs(predictions: Sequence[str], golds: Sequence[Sequence[str]], what: str) -> None:
  if len(predictions) != len(golds):
    raise ValueError(
      f"{what}: {len(predictions)} predictions but {len(golds)} gold lists; they must align one to one"
    )
  if not predictions:
    raise ValueError(f"{what}: no examples to score")
  for i, (prediction, example_golds) in enumerate(zip(predictions, golds)):
    if not isinstance(prediction, str):
      raise ValueError(
        f"{what}: prediction {i} is a {type(prediction).__name__}, expected a str "
        "(decode token ids to text first)"
      )
    if isinstance(example_golds, str) or not all(isinstance(g, str) for g in example_golds):
      raise ValueError(
        f"{what}: golds[{i}] must be a list of strings (all gold answers of the example),"
        f" got {example_golds!r}"
      )


def score(metric: str, predictions: Sequence[str], golds: Sequence[Sequence[str]]) -> float:
  """CrossFit's `evaluate(predictions, data, metric)`: predictions used as given (not stripped)."""
  _check_inputs(predictions, golds, metric)
  if metric in _PER_EXAMPLE:
    example_score = _PER_EXAMPLE[metric]
    return float(np.mean([example_score(p, g) for p, g in zip(predictions, golds)]))
  if metric in _CORPUS_LEVEL:
    return _CORPUS_LEVEL[metric](predictions, golds)
  raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_NAMES}")


def evaluate(
  task: str, predictions: Sequence[str], golds: Sequence[Sequence[str]], metric: str | None = None
) -> float:
  """The study's score of `task`: predictions stripped (as CrossFit's data wrapper did), then scored.

  Args:
    task: CrossFit task name (or a registered offline gym task); picks the metric unless `metric` is set.
    predictions: decoded text, one per example.
    golds: per example, the list of all its gold answers.
    metric: one of METRIC_NAMES, to override the task's metric.
  """
  if metric is None:
    metric = _metric_for_task(task)
  return score(metric, [p.strip() if isinstance(p, str) else p for p in predictions], golds)


def example_scores(
  task: str, predictions: Sequence[str], golds: Sequence[Sequence[str]], metric: str | None = None
) -> list[float]:
  """Each example's own score under `task`'s metric, predictions stripped as in `evaluate`: for a metric
  that is a mean over examples (EM, ACC, QA-F1, Rouge-L), its value on the example (their mean is the
  score); for a corpus-level one (Classification-F1, Matthew-Correlation, Pearson-Correlation), 1.0 when
  the prediction is the example's first gold and 0.0 otherwise (what those scores are built from)."""
  if metric is None:
    metric = _metric_for_task(task)
  predictions = [p.strip() if isinstance(p, str) else p for p in predictions]
  _check_inputs(predictions, golds, metric)
  if metric in _PER_EXAMPLE:
    return [float(_PER_EXAMPLE[metric](p, g)) for p, g in zip(predictions, golds)]
  if metric in _CORPUS_LEVEL:
    first = _first_golds(golds, metric)
    return [float(p == g) for p, g in zip(predictions, first)]
  raise ValueError(f"unknown metric {metric!r}; expected one of {METRIC_NAMES}")


def _metric_for_task(task: str) -> str:
  # Imported here: the task registry (CrossFit's table and the offline gyms) is not needed to score.
  from mpt_jax.data.settings import metric_for_task  # pylint: disable=g-import-not-at-top

  return metric_for_task(task)
