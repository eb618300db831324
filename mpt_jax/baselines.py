"""Chance levels of a target task under its CrossFit metric: a constant answer and a random guess.

A results table means little without them: on a 5-class task with balanced test sets a macro-F1 of 6.7
is what answering one label for everything scores, and about 20 what guessing does. Both are computed
from the task's own files, per seed (the train file gives the answers, the test file is scored), then
averaged over seeds like the methods' scores:

- `constant`: every test example gets the train file's most frequent first answer (ties: the first in
  sorted order), the majority-class baseline.
- `random`: every test example gets one of the train file's distinct first answers, drawn uniformly; the
  expectation over `draws` independent guesses (a fixed seed: the same number every time).

For generation tasks both are near 0 (a train answer rarely is a test answer), which is the point: they
tell a table reader where "nothing learned" lies.
"""

from __future__ import annotations

import collections
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from mpt_jax import metrics
from mpt_jax.data.crossfit import Split, TaskData

RANDOM_DRAWS = 200


def _train_answers(train: Split) -> list[str]:
  return [golds[0] for golds in train.answers]


def constant_answer_score(train: Split, test: Split, metric: str | None = None) -> float:
  """The score of answering the train file's most frequent answer for every test example."""
  counts = collections.Counter(_train_answers(train))
  answer = min(counts, key=lambda text: (-counts[text], text))
  return float(metrics.evaluate(test.task, [answer] * len(test), [list(g) for g in test.answers], metric))


def random_guess_score(
  train: Split, test: Split, metric: str | None = None, *, draws: int = RANDOM_DRAWS, seed: int = 0
) -> float:
  """The expected score of a uniformly random train answer per test example (mean over `draws`)."""
  labels = sorted(set(_train_answers(train)))
  rng = np.random.default_rng(seed)
  golds = [list(g) for g in test.answers]
  picks = rng.integers(0, len(labels), size=(draws, len(test)))
  scores = [metrics.evaluate(test.task, [labels[i] for i in row], golds, metric) for row in picks]
  return float(np.nanmean(scores))


def task_baselines(data: TaskData, seeds: Iterable[int], metric: str | None = None) -> dict[str, float]:
  """{"constant": x, "random": y}: each baseline's mean over the seeds' (train, test) files."""
  seeds = list(seeds)
  if not seeds:
    raise ValueError(f"task {data.task!r}: no seeds to compute baselines over")
  constant, random = [], []
  for seed in seeds:
    train, test = data.split(seed, "train"), data.split(seed, "test")
    constant.append(constant_answer_score(train, test, metric))
    random.append(random_guess_score(train, test, metric, seed=seed))
  return {"constant": float(np.nanmean(constant)), "random": float(np.nanmean(random))}


def setting_baselines(tasks: Mapping[str, TaskData], seeds: Sequence[int]) -> dict[str, dict[str, float]]:
  """{task: {"constant": x, "random": y}} for every task read (with train and test files)."""
  return {task: task_baselines(data, seeds) for task, data in tasks.items()}
