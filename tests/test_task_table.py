"""A new task from files alone: its metric and kind in DATA_DIR/tasks.json, a setting file naming it,
and a run (README, "Add your own task")."""

from __future__ import annotations

import json
import shutil

import pytest

import helpers_t5
from mpt_jax import config as config_lib, gyms, pipeline
from mpt_jax.data import settings as settings_lib, synthetic


def my_task_dir(tmp_path) -> str:
  """A data dir with one task of our own, "my-reviews": a synthetic task's files under a new name."""
  gym = tmp_path / "gym"
  synthetic.write_synthetic_gym(gym, tasks=["synth-sentiment_d"])
  data = tmp_path / "data" / "my-reviews"
  data.mkdir(parents=True)
  for path in (gym / "synth-sentiment_d").iterdir():
    shutil.copy(path, data / path.name.replace("synth-sentiment_d", "my-reviews"))
  return str(tmp_path / "data")


def test_tasks_json_gives_a_new_task_its_metric_and_kind(tmp_path):
  data_dir = my_task_dir(tmp_path)
  with pytest.raises(settings_lib.SettingError, match=r"tasks.json"):
    settings_lib.check_task_names(["my-reviews-unlisted"])  # the hint names the file to write
  (tmp_path / "data" / "tasks.json").write_text(
    json.dumps({"my-reviews": {"metric": "ACC"}, "my-qa": "QA-F1"})
  )
  gyms.register_data_dir_tasks(data_dir)
  assert settings_lib.metric_for_task("my-reviews") == "ACC" and settings_lib.is_classification("my-reviews")
  assert settings_lib.metric_for_task("my-qa") == "QA-F1" and settings_lib.is_classification("my-qa") is False
  for bad, match in (
    ({"my-reviews": {"metric": "Accuracy"}}, "unknown metric 'Accuracy'"),
    ({"my-reviews": {"metric": "ACC", "kind": "cls"}}, "expected"),
    ({"my-reviews": {"metric": "ACC", "classification": "yes"}}, "true or false"),
    ([], "expected an object"),
  ):
    (tmp_path / "data" / "tasks.json").write_text(json.dumps(bad))
    with pytest.raises(settings_lib.SettingError, match=rf"data/tasks.json: .*{match}"):
      gyms.register_data_dir_tasks(data_dir)
  (tmp_path / "data" / "tasks.json").write_text("{not json")
  with pytest.raises(settings_lib.SettingError, match="tasks.json: not valid JSON"):
    gyms.register_data_dir_tasks(data_dir)


def test_a_new_task_runs_from_files_alone(tmp_path):
  data_dir = my_task_dir(tmp_path)
  (tmp_path / "data" / "tasks.json").write_text(
    json.dumps({"my-reviews": {"metric": "ACC", "classification": True}})
  )
  (tmp_path / "my_setting.json").write_text(json.dumps({"target": ["my-reviews"]}))
  config = config_lib.base_config("pt", "synth_mini", "tiny")
  config.data_dir, config.setting_file, config.dropout_rate = data_dir, str(tmp_path / "my_setting.json"), 0.0
  config.model = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  config.downstream.decoding = "auto"  # a classification task: rank classification over its labels
  summary = pipeline.run(config, str(tmp_path / "run"))
  task = summary["tasks"]["my-reviews"]
  assert task["metric"] == "ACC" and len(task["test_scores"]) == len(config.seeds)
