"""The offline synthetic gym: CrossFit layout, validity, determinism, balance, settings."""

from __future__ import annotations

import collections
import json
import re
import warnings

import pytest

from mpt_jax.data import crossfit, settings, synthetic
from tests.helpers_data import tree_hash


@pytest.fixture(scope="module")
def gym_dir(tmp_path_factory):
  out = tmp_path_factory.mktemp("gym")
  names = synthetic.write_synthetic_gym(out, seed=0)
  assert names == list(synthetic.TASK_METRICS)
  return out


@pytest.fixture(scope="module")
def gym(gym_dir):
  return crossfit.read_crossfit(gym_dir, list(synthetic.TASK_METRICS))


def test_the_gym_passes_the_crossfit_validator_for_every_seed(gym):
  for task, data in gym.items():
    assert data.seeds == crossfit.SEEDS
    assert data.k == (16 if task in synthetic.CLASSIFICATION_TASKS else 32)


def test_same_seed_same_bytes_other_seed_other_bytes(gym_dir, tmp_path):
  again = tmp_path / "again"
  synthetic.write_synthetic_gym(again, seed=0)
  assert tree_hash(again) == tree_hash(gym_dir)
  other = tmp_path / "other"
  synthetic.write_synthetic_gym(other, seed=1, tasks=["synth-sentiment_a"])
  same_task = gym_dir / "synth-sentiment_a" / "synth-sentiment_a_16_100_train.tsv"
  assert (other / same_task.relative_to(gym_dir)).read_bytes() != same_task.read_bytes()


def test_classification_files_have_k_examples_per_class(gym):
  for task in synthetic.CLASSIFICATION_TASKS:
    labels = synthetic.task_specs(0)[task].labels
    for seed in crossfit.SEEDS:
      for split in ("train", "dev"):
        counts = collections.Counter(a for (a,) in gym[task].split(seed, split).answers)
        assert counts == {label: 16 for label in labels}, (task, seed, split)
    test = gym[task].split(100, "test")
    assert len(test) == synthetic.TEST_SIZE
    assert set(a for (a,) in test.answers) == set(labels)


def test_non_classification_files_have_k_examples(gym):
  for task in synthetic.TASK_METRICS:
    if task not in synthetic.CLASSIFICATION_TASKS:
      assert len(gym[task].split(87, "train")) == 32 and len(gym[task].split(87, "dev")) == 32


def test_test_is_shared_by_seeds_and_disjoint_from_train_and_dev(gym):
  for task, data in gym.items():
    test = data.split(100, "test")
    for seed in crossfit.SEEDS:
      assert data.split(seed, "test").inputs == test.inputs
      train, dev = set(data.split(seed, "train").inputs), set(data.split(seed, "dev").inputs)
      assert len(train) == len(data.split(seed, "train"))  # no duplicates
      assert not train & dev and not (train | dev) & set(test.inputs), (task, seed)
    assert data.split(100, "train").inputs != data.split(13, "train").inputs


def test_answers_follow_the_rule_of_their_task(gym):
  """Independent checks of a few rules, read back from the files."""
  for text, (gold,) in zip(*_split(gym, "synth-transform_reverse")):
    assert gold.split() == text.removeprefix("text: ").split()[::-1]
  for text, (gold,) in zip(*_split(gym, "synth-transform_sort")):
    assert gold.split() == sorted(text.removeprefix("text: ").split())
  for text, golds in zip(*_split(gym, "synth-qa_owns")):
    name = re.match(r"question: what does (\w+) own\? context: ", text).group(1)
    assert f"{name} owns a {golds[0]}." in text and golds == (golds[0], f"a {golds[0]}")
  for text, (gold,) in zip(*_split(gym, "synth-pair_nli")):
    premise, hypothesis = text.removeprefix("premise: ").split(" [SEP] hypothesis: ")
    words = set(hypothesis.split()) - {"not"}
    if gold == "contradiction":
      assert "not" in hypothesis.split() and words <= set(premise.split())
    elif gold == "entailment":
      assert set(hypothesis.split()) <= set(premise.split())
    else:
      assert not set(hypothesis.split()) <= set(premise.split())


def _split(gym, task):
  split = gym[task].split(21, "train")
  return split.inputs, split.answers


def test_related_tasks_share_lexicons_but_differ():
  specs = synthetic.task_specs(0)
  assert {s.family for s in specs.values()} == {
    "sentiment",
    "topic",
    "pair",
    "transform",
    "mapping",
    "qa",
    "keywords",
  }
  by_family = collections.Counter(s.family for s in specs.values())
  assert min(by_family.values()) >= 2


def test_the_gym_settings_are_registered_and_written(gym_dir):
  written_metrics = json.loads((gym_dir / synthetic.METRICS_FILE).read_text())
  written_settings = json.loads((gym_dir / synthetic.SETTINGS_FILE).read_text())
  assert written_metrics == synthetic.TASK_METRICS and written_settings == synthetic.SETTINGS
  for name in ("synth_cls2cls", "synth_nocls2cls", "synth_nocls2nocls", "synth_both2cls", "synth_mini"):
    with warnings.catch_warnings():
      warnings.simplefilter("error")  # no leak: source and target are disjoint
      setting = settings.get_setting(name)
    assert setting.gym == "synthetic" and not set(setting.source) & set(setting.target)
    for task in setting.source + setting.target:
      assert settings.metric_for_task(task) == written_metrics[task]
  classification = set(synthetic.CLASSIFICATION_TASKS)
  assert set(settings.get_setting("synth_cls2cls").source) <= classification
  assert not set(settings.get_setting("synth_nocls2cls").source) & classification
  assert set(settings.get_setting("synth_nocls2cls").target) <= classification
  assert not set(settings.get_setting("synth_nocls2nocls").target) & classification


def test_a_subset_of_tasks_and_sizes(tmp_path):
  names = synthetic.write_synthetic_gym(
    tmp_path, tasks=["synth-topic_b", "synth-qa_made"], seeds=[13], k_per_class=4, k=8, test_size=10
  )
  data = crossfit.read_crossfit(tmp_path, names, seeds=[13])
  assert len(data["synth-topic_b"].split(13, "train")) == 4 * 4
  assert len(data["synth-qa_made"].split(13, "dev")) == 8
  assert len(data["synth-qa_made"].split(13, "test")) == 10
  with pytest.raises(ValueError, match="not tasks of the synthetic gym"):
    synthetic.write_synthetic_gym(tmp_path, tasks=["glue-mrpc"])
