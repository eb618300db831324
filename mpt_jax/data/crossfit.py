"""Reader and validator of the CrossFit few-shot layout.

Layout: `DATA_DIR/{task}/{task}_{k}_{seed}_{split}.tsv` for the seeds 100, 13, 21, 42, 87 and the splits
train, dev, test. A line is `input<TAB>answer[<TAB>answer2...]`. `k` (16 per class for classification,
32 otherwise in the study) is read from the file names on disk, never assumed.

Validation collects every problem of every requested file (missing directory or file, bad UTF-8, a line
without a tab, an empty input, a file without examples) and raises them together in one `CrossFitError`,
each as `path:line: what`, so a broken data directory is fixed in one pass before any compute is spent.

Lines without an answer (`input<TAB>` with nothing after it but whitespace; some CrossFit tasks have
them) are read as the reference read them: its meta-learning and multi-task loaders dropped them
(upstream), its single-task loader kept them (downstream), where they score 0 under EM, ACC, QA-F1 and
Rouge-L. `keep_empty_answers` names the splits that keep them; each file with such lines gives one
warning with their count.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence

from mpt_jax import paths, study

SEEDS = study.SEEDS
SPLITS = ("train", "dev", "test")
# How many problems the exception message spells out; `CrossFitError.problems` always holds all of them.
_MESSAGE_PROBLEMS = 200


@dataclasses.dataclass(frozen=True)
class Problem:
  path: str
  line: int | None  # 1-based; None for a problem of the whole file or directory
  message: str

  def __str__(self) -> str:
    return f"{self.path}:{self.line}: {self.message}" if self.line else f"{self.path}: {self.message}"


class CrossFitError(ValueError):
  """Every problem found in a CrossFit directory, raised at once."""

  def __init__(self, problems: Sequence[Problem]):
    self.problems = list(problems)
    shown = "\n".join(f"  {p}" for p in self.problems[:_MESSAGE_PROBLEMS])
    more = len(self.problems) - _MESSAGE_PROBLEMS
    tail = f"\n  ... and {more} more (all in CrossFitError.problems)" if more > 0 else ""
    super().__init__(
      f"{len(self.problems)} problem(s) in the CrossFit data; fix them all, then rerun:\n{shown}{tail}"
    )


@dataclasses.dataclass(frozen=True)
class Split:
  """One file: `inputs[i]` with its gold answers `answers[i]` (at least one each, in file order)."""

  task: str
  seed: int
  split: str  # "train" | "dev" | "test"
  path: str
  inputs: tuple[str, ...]
  answers: tuple[tuple[str, ...], ...]  # () for a kept line without an answer
  num_without_answer: int = 0  # lines of the file without an answer (dropped, or kept with answers ())

  def __len__(self) -> int:
    return len(self.inputs)


@dataclasses.dataclass(frozen=True)
class TaskData:
  """The requested files of one task, keyed by (seed, split)."""

  task: str
  k: int
  splits: dict[tuple[int, str], Split]

  def split(self, seed: int, split: str) -> Split:
    try:
      return self.splits[(seed, split)]
    except KeyError:
      raise KeyError(
        f"task {self.task!r}: split ({seed}, {split!r}) was not read; read it with "
        f"read_crossfit(..., seeds=[{seed}], splits=[{split!r}])"
      ) from None

  @property
  def seeds(self) -> tuple[int, ...]:
    return tuple(dict.fromkeys(seed for seed, _ in self.splits))


def split_path(data_dir: str | os.PathLike, task: str, k: int, seed: int, split: str) -> str:
  """<data_dir>/<task>/<task>_<k>_<seed>_<split>.tsv (data_dir: a local path or a URL, mpt_jax/paths.py)."""
  return paths.join(data_dir, task, f"{task}_{k}_{seed}_{split}.tsv")


def discover_k(task_dir: str, task: str) -> tuple[int | None, list[Problem]]:
  """The k of the task's file names; a problem when there is none or more than one."""
  pattern = re.compile(rf"^{re.escape(task)}_(\d+)_(\d+)_({'|'.join(SPLITS)})\.tsv$")
  ks = sorted({int(m.group(1)) for name in paths.listdir(task_dir) if (m := pattern.match(name))})
  if not ks:
    return None, [
      Problem(
        str(task_dir), None, f"no file named {task}_{{k}}_{{seed}}_{{train,dev,test}}.tsv in this directory"
      )
    ]
  if len(ks) > 1:
    return None, [
      Problem(
        str(task_dir),
        None,
        f"ambiguous k: files exist for k in {ks}; keep one k per task directory or pass k explicitly",
      )
    ]
  return ks[0], []


def parse_lines(data: bytes, path: str) -> tuple[list[str], list[tuple[str, ...]], list[Problem]]:
  """Examples of one file's bytes, and every problem of it with its 1-based line number.

  Values are read as the reference does (`line.strip().split("\t")`), so a line gives the same input and
  golds as there: a line without an answer (`input<TAB>`) gives the golds (), and an empty field between
  two answers the gold "". The checks are made on the raw line (a tab, a non-empty input).
  """
  inputs, answers, problems = [], [], []
  if data.startswith(codecs.BOM_UTF8):  # written by some editors; not part of the first input
    data = data[len(codecs.BOM_UTF8) :]
  lines = data.split(b"\n")
  if lines and lines[-1] == b"":  # the newline that ends the last line opens no new line
    lines.pop()
  for number, raw in enumerate(lines, start=1):
    try:
      line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      problems.append(Problem(path, number, f"not UTF-8 ({e.reason} at byte {e.start} of the line)"))
      continue
    line = line.rstrip("\r")
    if "\t" not in line:
      what = "empty line" if not line.strip() else "no tab between input and answer"
      problems.append(Problem(path, number, what))
      continue
    if not line.split("\t")[0].strip():
      problems.append(Problem(path, number, "empty input"))
      continue
    values = line.strip().split("\t")
    inputs.append(values[0])
    answers.append(tuple(values[1:]))
  if not lines:
    problems.append(Problem(path, None, "empty file: no examples"))
  return inputs, answers, problems


def read_split(
  path: str | os.PathLike, task: str, seed: int, split: str, keep_empty_answers: bool = False
) -> tuple[Split | None, list[Problem]]:
  """One file; lines without an answer are kept (answers ()) or dropped, with one warning either way."""
  path = str(path)
  try:
    data = paths.read_bytes(path)
  except OSError as e:
    return None, [Problem(path, None, f"cannot read ({e.strerror or e})")]
  inputs, answers, problems = parse_lines(data, path)
  if problems:
    return None, problems
  without_answer = sum(not golds for golds in answers)
  if without_answer:
    num_lines = len(answers)
    if keep_empty_answers:
      what = "kept, as the reference's single-task loader did: they score 0 (EM, ACC, QA-F1, Rouge-L)"
    else:
      what = "dropped, as the reference's meta-learning and multi-task loaders did"
      kept = [i for i, golds in enumerate(answers) if golds]
      inputs, answers = [inputs[i] for i in kept], [answers[i] for i in kept]
    warnings.warn(
      f"{path}: {without_answer} of {num_lines} line(s) without an answer, {what}", UserWarning, stacklevel=2
    )
    if not inputs:
      return None, [Problem(path, None, f"no examples left: all {without_answer} line(s) lack an answer")]
  return Split(task, seed, split, path, tuple(inputs), tuple(answers), without_answer), []


def _check_requests(tasks: Sequence[str], seeds: Sequence[int], splits: Sequence[str]) -> None:
  if isinstance(tasks, str):
    raise TypeError(f"tasks must be a list of task names, not the string {tasks!r}")
  bad_splits = [s for s in splits if s not in SPLITS]
  if bad_splits:
    raise ValueError(f"unknown split(s) {bad_splits}; CrossFit splits are {list(SPLITS)}")
  duplicates = sorted({t for t in tasks if list(tasks).count(t) > 1})
  if duplicates:
    raise ValueError(f"task(s) listed more than once: {duplicates}")
  if not seeds:
    raise ValueError("no seeds requested")


def validate_crossfit(
  data_dir: str | os.PathLike,
  tasks: Sequence[str],
  seeds: Iterable[int] = SEEDS,
  splits: Iterable[str] = SPLITS,
  k: int | None = None,
  keep_empty_answers: Iterable[str] = (),
) -> tuple[dict[str, TaskData], list[Problem]]:
  """Reads what is readable and lists every problem; `read_crossfit` raises when the list is not empty.

  keep_empty_answers: the splits whose lines without an answer are kept (the reference downstream:
  dev and test; train too, where its loader then failed); elsewhere they are dropped.
  """
  seeds, splits, keep_empty_answers = tuple(seeds), tuple(splits), tuple(keep_empty_answers)
  _check_requests(tasks, seeds, splits)
  bad_keep = [s for s in keep_empty_answers if s not in SPLITS]
  if bad_keep:
    raise ValueError(f"keep_empty_answers: unknown split(s) {bad_keep}; CrossFit splits are {list(SPLITS)}")
  data_dir = os.fspath(data_dir)
  if not paths.isdir(data_dir):
    raise CrossFitError([Problem(str(data_dir), None, "CrossFit data directory not found")])
  result, problems = {}, []
  for task in tasks:
    task_dir = paths.join(data_dir, task)
    if not paths.isdir(task_dir):
      problems.append(Problem(str(task_dir), None, f"task directory of {task!r} not found"))
      continue
    task_k = k
    if task_k is None:
      task_k, k_problems = discover_k(task_dir, task)
      if k_problems:
        problems.extend(k_problems)
        continue
    task_splits = {}
    for seed in seeds:
      for split in splits:
        path = split_path(data_dir, task, task_k, seed, split)
        if not paths.isfile(path):
          problems.append(Problem(str(path), None, "file not found"))
          continue
        parsed, split_problems = read_split(path, task, seed, split, split in keep_empty_answers)
        problems.extend(split_problems)
        if parsed is not None:
          task_splits[(seed, split)] = parsed
    result[task] = TaskData(task, task_k, task_splits)
  return result, problems


def read_crossfit(
  data_dir: str | os.PathLike,
  tasks: Sequence[str],
  seeds: Iterable[int] = SEEDS,
  splits: Iterable[str] = SPLITS,
  k: int | None = None,
  keep_empty_answers: Iterable[str] = (),
) -> dict[str, TaskData]:
  """The requested files of every task, checked; raises one `CrossFitError` listing every problem.
  Lines without an answer are dropped, except in the `keep_empty_answers` splits (module docstring)."""
  result, problems = validate_crossfit(data_dir, tasks, seeds, splits, k, keep_empty_answers)
  if problems:
    raise CrossFitError(problems)
  return result


# --- writing (the offline gyms write their tasks in this layout) ----------------------------------------


def tsv_bytes(examples: Iterable[tuple[str, Sequence[str]]]) -> bytes:
  """A split file: one `input<TAB>answer[<TAB>answer2...]` line per (input, golds) example."""
  lines = []
  for text, golds in examples:
    fields = (text,) + tuple(golds)
    if not all(f.strip() and "\t" not in f and "\n" not in f for f in fields):
      raise ValueError(f"cannot write {fields!r}: empty field, tab or newline")
    lines.append("\t".join(fields) + "\n")
  return "".join(lines).encode("utf-8")


def json_bytes(data) -> bytes:
  """A gym's metric table or settings file, byte-stable (sorted keys)."""
  return (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8")
