"""The CrossFit reader and validator, on the hand-written fixtures of tests/fixtures."""

from __future__ import annotations

import shutil

import pytest

from mpt_jax.data import crossfit
from tests.helpers_data import BROKEN_FIXTURES, CROSSFIT_FIXTURES


def test_reads_every_seed_and_split_with_k_from_the_file_names():
  data = crossfit.read_crossfit(CROSSFIT_FIXTURES, ["sentiment_toy"])
  task = data["sentiment_toy"]
  assert task.k == 2
  assert task.seeds == crossfit.SEEDS
  assert sorted(task.splits) == sorted((s, n) for s in crossfit.SEEDS for n in crossfit.SPLITS)
  train = task.split(13, "train")
  assert train.inputs[1] == "review: broken chairs everywhere"
  assert train.answers == (("positive",), ("negative",), ("positive",), ("negative",))
  assert train.path.endswith("sentiment_toy/sentiment_toy_2_13_train.tsv")
  assert len(task.split(100, "test")) == 3


def test_multiple_golds_are_kept_in_order_and_crlf_is_dropped():
  data = crossfit.read_crossfit(CROSSFIT_FIXTURES, ["qa_toy"], seeds=[100, 13])
  train = data["qa_toy"].split(100, "train")
  assert data["qa_toy"].k == 3
  assert train.answers[0] == ("william shakespeare", "shakespeare")
  assert train.answers[2] == ("paris", "paris, france", "in paris")
  dev = data["qa_toy"].split(100, "dev")
  assert dev.answers[0] == ("honey",)  # the line ends with \r\n
  assert dev.answers[1] == ("eight", "8")


def test_only_requested_seeds_and_splits_are_read():
  data = crossfit.read_crossfit(CROSSFIT_FIXTURES, ["qa_toy"], seeds=[13], splits=["dev"])
  assert list(data["qa_toy"].splits) == [(13, "dev")]
  with pytest.raises(KeyError, match="was not read"):
    data["qa_toy"].split(100, "dev")


def test_every_problem_is_reported_at_once_with_file_and_line():
  with pytest.raises(crossfit.CrossFitError) as info:
    crossfit.read_crossfit(
      BROKEN_FIXTURES, ["broken_task", "two_k", "missing_task", "empty_file"], seeds=[100]
    )
  found = {
    (p.path.split("crossfit_broken/")[-1], p.line, p.message.split(" (")[0]) for p in info.value.problems
  }
  expected = {
    ("broken_task/broken_task_2_100_train.tsv", 2, "no tab between input and answer"),
    ("broken_task/broken_task_2_100_train.tsv", 3, "empty input"),
    ("broken_task/broken_task_2_100_dev.tsv", 2, "not UTF-8"),
    ("broken_task/broken_task_2_100_dev.tsv", 4, "empty line"),
    ("broken_task/broken_task_2_100_test.tsv", None, "file not found"),
    (
      "two_k",
      None,
      "ambiguous k: files exist for k in [2, 4]; keep one k per task directory or pass k explicitly",
    ),
    ("missing_task", None, "task directory of 'missing_task' not found"),
    ("empty_file/empty_file_2_100_train.tsv", None, "empty file: no examples"),
  }
  assert found == expected
  message = str(info.value)
  assert "8 problem(s)" in message
  assert "broken_task_2_100_train.tsv:3: empty input" in message
  assert "broken_task_2_100_dev.tsv:2: not UTF-8" in message


def test_an_explicit_k_overrides_discovery():
  data = crossfit.read_crossfit(BROKEN_FIXTURES, ["two_k"], seeds=[100], splits=["train"], k=4)
  assert data["two_k"].k == 4
  assert data["two_k"].split(100, "train").path.endswith("two_k_4_100_train.tsv")


def test_a_directory_without_matching_files_is_reported(tmp_path):
  (tmp_path / "lonely").mkdir()
  (tmp_path / "lonely" / "other_2_100_train.tsv").write_text("a\tb\n")
  with pytest.raises(crossfit.CrossFitError, match=r"lonely: no file named lonely_\{k\}"):
    crossfit.read_crossfit(tmp_path, ["lonely"])


def test_task_names_with_underscores_do_not_match_longer_names(tmp_path):
  # "tweet_eval" must not pick up the files of "tweet_eval-hate" had they been put in its directory.
  shutil.copytree(CROSSFIT_FIXTURES / "qa_toy", tmp_path / "qa")
  with pytest.raises(crossfit.CrossFitError, match="no file named qa_"):
    crossfit.read_crossfit(tmp_path, ["qa"], seeds=[100])


def test_validate_returns_problems_and_what_was_readable():
  data, problems = crossfit.validate_crossfit(BROKEN_FIXTURES, ["broken_task", "empty_file"], seeds=[100])
  assert len(problems) == 6
  assert sorted(data["empty_file"].splits) == [(100, "dev"), (100, "test")]


def test_bad_requests_fail_early():
  with pytest.raises(TypeError, match="list of task names"):
    crossfit.read_crossfit(CROSSFIT_FIXTURES, "qa_toy")
  with pytest.raises(ValueError, match="more than once"):
    crossfit.read_crossfit(CROSSFIT_FIXTURES, ["qa_toy", "qa_toy"])
  with pytest.raises(ValueError, match="unknown split"):
    crossfit.read_crossfit(CROSSFIT_FIXTURES, ["qa_toy"], splits=["validation"])
  with pytest.raises(crossfit.CrossFitError, match="data directory not found"):
    crossfit.read_crossfit(CROSSFIT_FIXTURES / "nope", ["qa_toy"])


def test_parse_lines_matches_the_reference_reading_of_valid_lines():
  data = b"  premise: a [SEP] hypothesis: b\tentailment\t yes \n"
  inputs, answers, problems = crossfit.parse_lines(data, "x.tsv")
  line = data.decode().strip().split("\t")  # how the reference code reads a line
  assert problems == []
  assert inputs == [line[0]] and answers == [tuple(line[1:])]


def test_a_utf8_byte_order_mark_is_not_part_of_the_first_input():
  inputs, answers, problems = crossfit.parse_lines(b"\xef\xbb\xbfhello\tworld\n", "x.tsv")
  assert (inputs, answers, problems) == (["hello"], [("world",)], [])


def _write_task(root, task, files):
  (root / task).mkdir(parents=True)
  for name, text in files.items():
    (root / task / f"{task}_2_100_{name}.tsv").write_text(text)


def test_lines_without_an_answer_are_dropped_or_kept_as_the_reference(tmp_path):
  # "x<TAB>" (nothing after the tab but whitespace): the reference's meta-learning and multi-task
  # loaders dropped such lines, its single-task (downstream) loader kept them with no gold.
  _write_task(
    tmp_path,
    "qa_toy",
    {
      "train": "q1\ta1\nq2\t\nq3\ta3\t\n",  # a trailing tab is no empty answer (strip)
      "dev": "q1\t \t\nq2\ta2\nq3\t\n",
      "test": "q1\ta\t\tb\n",  # an empty field between answers is the gold "", as the reference read it
    },
  )
  with pytest.warns(UserWarning) as caught:
    dropped = crossfit.read_crossfit(tmp_path, ["qa_toy"], seeds=[100])["qa_toy"]
  assert sorted(str(w.message) for w in caught) == sorted(
    [
      f"{tmp_path}/qa_toy/qa_toy_2_100_train.tsv: 1 of 3 line(s) without an answer, dropped, as the "
      f"reference's meta-learning and multi-task loaders did",
      f"{tmp_path}/qa_toy/qa_toy_2_100_dev.tsv: 2 of 3 line(s) without an answer, dropped, as the "
      f"reference's meta-learning and multi-task loaders did",
    ]
  )
  train = dropped.split(100, "train")
  assert train.inputs == ("q1", "q3") and train.answers == (("a1",), ("a3",))
  assert train.num_without_answer == 1
  assert dropped.split(100, "dev").answers == (("a2",),)
  assert dropped.split(100, "test").answers == (("a", "", "b"),)

  with pytest.warns(UserWarning, match=r"dev.tsv: 2 of 3 line\(s\) without an answer, kept"):
    kept = crossfit.read_crossfit(
      tmp_path, ["qa_toy"], seeds=[100], splits=["dev"], keep_empty_answers=["dev", "test"]
    )["qa_toy"]
  dev = kept.split(100, "dev")
  assert dev.inputs == ("q1", "q2", "q3") and dev.answers == ((), ("a2",), ())
  assert dev.num_without_answer == 2


def test_a_file_of_lines_without_answers_has_no_examples_left(tmp_path):
  _write_task(tmp_path, "qa_toy", {"train": "q1\t\nq2\t\n"})
  with pytest.warns(UserWarning), pytest.raises(crossfit.CrossFitError, match="all 2 line.s. lack an answer"):
    crossfit.read_crossfit(tmp_path, ["qa_toy"], seeds=[100], splits=["train"])
  with pytest.raises(ValueError, match="keep_empty_answers: unknown split"):
    crossfit.read_crossfit(tmp_path, ["qa_toy"], seeds=[100], keep_empty_answers=["validation"])
