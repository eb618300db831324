"""The study's 11 settings, user settings, and the gym registry behind `metric_for_task`."""

from __future__ import annotations

import json
import warnings

import ml_collections
import pytest

from mpt_jax.data import settings
from mpt_jax.data.settings import SettingError

SETTINGS_JSON = settings.CROSSFIT_SETTINGS_FILE
SPLITS_DIR = SETTINGS_JSON.parent / "task_splits"


def _raw_settings() -> dict:
  return json.loads(SETTINGS_JSON.read_text())


def test_the_eleven_study_settings_round_trip_from_settings_json():
  raw = _raw_settings()
  assert list(raw) == list(settings.STUDY_SETTINGS)
  for name, spec in raw.items():
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      setting = settings.get_setting(name)
    assert setting.gym == "crossfit"
    assert list(setting.source) == spec["source"] and list(setting.target) == spec["target"]


def test_every_task_of_every_setting_has_a_crossfit_metric():
  metrics = json.loads(settings.CROSSFIT_METRICS_FILE.read_text())
  assert len(metrics) == 160
  for spec in _raw_settings().values():
    for task in spec["source"] + spec["target"]:
      assert settings.metric_for_task(task) == metrics[task]


def test_sources_are_the_original_split_files_training_tasks():
  # An independent record of the study: its split files (`train` = source tasks).
  for name, spec in _raw_settings().items():
    split = json.loads((SPLITS_DIR / spec["split_file"]).read_text())
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # nonli2nli's warning has its own test
      setting = settings.get_setting(name)
    assert sorted(setting.source) == sorted(split["train"]), name


# Where each study setting's target list comes from in its split file; the *2nocls targets come from the
# reference's run scripts only (their split files are the *2cls ones).
_TARGETS_IN_SPLIT_FILE = {
  "cls2cls": "test",
  "nocls2cls": "test",
  "both2cls": "test",
  "qa2qa": "dev",
  "noqa2qa": "dev",
  "nonli2nli": "dev",
  "nopara2para": "dev",
  "random": "test",
}


def test_targets_agree_with_the_study_split_files():
  # settings.json is what the code reads; the split files are the study's record of the same lists.
  raw = _raw_settings()
  for name, key in _TARGETS_IN_SPLIT_FILE.items():
    split = json.loads((SPLITS_DIR / raw[name]["split_file"]).read_text())
    expected = split[key] + (["samsum"] if name == "random" else [])
    assert raw[name]["target"] == expected, name
  both = json.loads((SPLITS_DIR / raw["both2cls"]["split_file"]).read_text())
  assert "amazon_polarity" in both["test"] and "financial_phrasebank" not in both["test"]


def test_random_adapts_to_the_21_targets_of_the_reference_runs():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    setting = settings.get_setting("random")
  assert len(setting.target) == 21 and "samsum" in setting.target
  assert len(setting.source) == 114 and "samsum" not in setting.source
  assert "samsum" in setting.note


def test_nonli2nli_keeps_the_sick_leak_and_warns():
  with pytest.warns(UserWarning, match=r"\['sick'\].*leak in the original split file"):
    setting = settings.get_setting("nonli2nli")
  assert "sick" in setting.source and "sick" in setting.target
  assert setting.overlap == ("sick",)


def test_settings_without_overlap_do_not_warn():
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    for name in settings.STUDY_SETTINGS:
      if name != "nonli2nli":
        assert settings.get_setting(name).overlap == ()


def test_unknown_task_names_are_all_rejected_with_close_names():
  with pytest.raises(SettingError) as info:
    settings.load_setting(
      {"source": ["glue-mrcp", "glue-sst2", "superglue-rtee"], "target": ["ag_new", "totally_made_up"]}
    )
  message = str(info.value)
  assert "4 unknown task name(s)" in message
  assert "'glue-mrcp' (did you mean 'glue-mrpc'" in message
  assert "'superglue-rtee' (did you mean 'superglue-rte'" in message
  assert "'ag_new' (did you mean 'ag_news'" in message
  assert "'totally_made_up'\n" in message  # nothing close: no suggestion
  with pytest.raises(SettingError, match="did you mean 'glue-mrpc'"):
    settings.metric_for_task("glue_mrpc")


def test_unknown_setting_name_suggests_the_closest():
  with pytest.raises(SettingError, match="unknown setting 'cls2cl' \\(did you mean 'cls2cls'"):
    settings.load_setting("cls2cl")


def test_user_settings_from_json_files_and_configs(tmp_path):
  single = tmp_path / "mine.json"
  single.write_text(json.dumps({"source": ["glue-sst2", "imdb"], "target": ["glue-rte"]}))
  setting = settings.load_setting(single)
  assert (setting.name, setting.source, setting.target) == ("mine", ("glue-sst2", "imdb"), ("glue-rte",))

  several = tmp_path / "several.json"
  several.write_text(
    json.dumps(
      {
        "a": {"source": ["imdb"], "target": ["glue-rte"]},
        "b": {"source": ["ag_news"], "target": ["glue-cola"]},
      }
    )
  )
  assert settings.load_setting(str(several), name="b").source == ("ag_news",)
  with pytest.raises(SettingError, match="pick one with name="):
    settings.load_setting(several)

  config = ml_collections.ConfigDict({"source": ["imdb"], "target": ["glue-cola", "synth-qa_owns"]})
  assert settings.load_setting(config, name="cfg").target == ("glue-cola", "synth-qa_owns")


@pytest.mark.parametrize(
  "spec, match",
  [
    ({"source": ["imdb"]}, "'source' and 'target'"),
    ({"source": "imdb", "target": ["glue-rte"]}, "must be a list"),
    ({"source": ["imdb"], "target": []}, "is empty"),  # (empty sources are allowed: PT needs none)
    ({"source": ["imdb", "imdb"], "target": ["glue-rte"]}, "more than once"),
  ],
)
def test_malformed_settings_fail_early(spec, match):
  with pytest.raises(SettingError, match=match):
    settings.load_setting(spec)


def test_a_leaking_user_setting_warns():
  with pytest.warns(UserWarning, match=r"\['imdb'\] are both source and target"):
    settings.load_setting({"source": ["imdb"], "target": ["imdb"]})


def test_the_synthetic_gym_is_registered_like_crossfit():
  assert settings.metric_for_task("synth-qa_owns") == "QA-F1"
  assert settings.is_classification("synth-sentiment_a") is True
  assert settings.is_classification("synth-transform_copy") is False
  assert settings.is_classification("glue-mrpc") is None  # CrossFit: k is read from the files
  setting = settings.get_setting("synth_cls2cls")
  assert setting.gym == "synthetic" and setting.overlap == ()


def test_registered_gyms_serve_metric_lookups_and_can_be_removed(tmp_path):
  metrics = tmp_path / "metrics.json"
  metrics.write_text(json.dumps({"toy-copy": "EM", "toy-label": "ACC"}))
  setting_file = tmp_path / "settings.json"
  setting_file.write_text(json.dumps({"toy_setting": {"source": ["toy-copy"], "target": ["toy-label"]}}))
  try:
    settings.register_gym_files("toy", metrics, setting_file)
    assert settings.metric_for_task("toy-label") == "ACC"
    assert settings.get_setting("toy_setting").gym == "toy"
    # A user setting may mix the gyms' tasks.
    assert settings.load_setting({"source": ["toy-copy", "imdb"], "target": ["toy-label"]}).source == (
      "toy-copy",
      "imdb",
    )
  finally:
    settings.unregister_gym("toy")
  with pytest.raises(SettingError, match="unknown task"):
    settings.metric_for_task("toy-label")


def test_gym_registration_rejects_bad_tables():
  with pytest.raises(SettingError, match="unknown metric"):
    settings.register_gym("bad", {"x": "BLEU"})
  with pytest.raises(SettingError, match="without a metric"):
    settings.register_gym("bad", {"x": "EM"}, {"s": {"source": ["x"], "target": ["y"]}})
  with pytest.raises(SettingError, match="already known to gym 'crossfit' with another metric"):
    settings.register_gym("bad", {"glue-mrpc": "EM"})
  with pytest.raises(SettingError, match="already defined by gym 'crossfit'"):
    settings.register_gym("bad", {"x": "EM"}, {"cls2cls": {"source": ["x"], "target": ["x"]}})
  assert "bad" not in settings.gyms()
