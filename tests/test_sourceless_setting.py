"""A setting file may have no sources: PT (and a method started from a given init_prompt) needs none; a
method that learns its initialization is refused early, naming the file."""

from __future__ import annotations

import json

import numpy as np
import pytest

import helpers_t5
from mpt_jax import config as config_lib, pipeline
from mpt_jax.data import settings as settings_lib


def sourceless_setting(tmp_path, **extra) -> str:
  path = tmp_path / "my_setting.json"
  path.write_text(json.dumps({"target": ["synth-sentiment_d"], **extra}))
  return str(path)


def tiny(method: str, setting_file: str, tmp_path):
  config = config_lib.base_config(method, "synth_mini", "tiny")
  config.gym, config.setting_file, config.dropout_rate = "synthetic", setting_file, 0.0
  config.model = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  return config


def test_a_user_setting_may_have_no_or_empty_sources(tmp_path):
  from mpt_jax import gyms

  gyms.ensure("synthetic")  # its task names are known
  for extra in ({}, {"source": []}):
    path = sourceless_setting(tmp_path, **extra)
    setting = settings_lib.load_setting(path)
    assert (setting.name, setting.source, setting.target) == ("my_setting", (), ("synth-sentiment_d",))
  assert settings_lib.load_setting({"target": ["synth-sentiment_d"]}).source == ()
  with pytest.raises(settings_lib.SettingError, match="my_setting.json.*'source' and 'target' lists"):
    (tmp_path / "my_setting.json").write_text(json.dumps({"source": ["synth-sentiment_a"]}))
    settings_lib.load_setting(path)


def test_pt_runs_on_a_setting_without_sources_and_maml_is_refused_naming_the_file(tmp_path):
  path = sourceless_setting(tmp_path)
  maml = tiny("maml", path, tmp_path)
  with pytest.raises(config_lib.ConfigError, match=r"setting_file='.*my_setting.json' has no source tasks"):
    config_lib.validate(maml)
  maml.init_prompt = str(tmp_path / "given.npy")  # from a given prompt, no upstream: no sources needed
  np.save(maml.init_prompt, np.zeros((maml.prompt.length, 16), np.float32))
  config_lib.validate(maml)

  pt = tiny("pt", path, tmp_path)
  summary = pipeline.run(pt, str(tmp_path / "run"))
  assert list(summary["tasks"]) == ["synth-sentiment_d"]
  assert len(summary["tasks"]["synth-sentiment_d"]["test_scores"]) == len(pt.seeds)
