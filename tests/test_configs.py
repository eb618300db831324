"""Every config under configs/ loads, its setting resolves to known tasks of that setting, and its prompt
initializes."""

from __future__ import annotations

import glob
import os

import pytest
import importlib.util


from mpt_jax import config as config_lib
from mpt_jax.data import settings as settings_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path: str, preset: str | None = None):
  """What `--config=path[:preset]` gives: the file's get_config(preset)."""
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(preset)


def test_there_is_a_config_for_every_method_and_study_setting():
  names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
  for method in config_lib.METHODS:
    for setting in settings_lib.STUDY_SETTINGS:
      assert f"{method}_{setting}" in names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_config_loads_and_resolves(path):
  config = _load(path)
  assert config.method in config_lib.METHODS
  if config.gym:
    from mpt_jax import gyms

    gyms.ensure(config.gym)
  setting = (
    settings_lib.get_setting(config.setting)
    if not config.setting_file
    else settings_lib.load_setting(config.setting_file)
  )
  assert setting.source and setting.target
  settings_lib.check_task_names(setting.source + setting.target, where=path)
  for task in config.downstream.tasks:
    assert task in setting.target
  if config.method != "pt" and not config.gym:
    # The study's defaults (PROTOCOL.md).
    assert config.upstream.lr == 0.5 and config.upstream.optimizer == "adafactor"
    assert config.prompt.length == 100
    assert tuple(config.downstream.lrs) == (0.5, 0.4, 0.3, 0.2)
    assert config.downstream.num_steps == 3000 and config.downstream.batch_size == 16
  if not config.gym:
    # The study's decoding, epoch cap and best-dev candidates (docs/PROTOCOL.md).
    d = config.downstream
    assert (d.decoding, d.num_beams, d.repetition_penalty, d.early_stopping) == ("beam", 4, 2.5, True)
    assert d.max_decode_len == 127  # its generate(max_length=128) counted the decoder start token
    assert d.max_epochs == 1000 and d.step0_candidate is False


def _flat(config) -> dict:
  out = {}

  def walk(node, prefix):
    for key, value in node.items():
      if isinstance(value, dict):
        walk(value, f"{prefix}{key}.")
      else:
        out[prefix + key] = value

  walk(config.to_dict(), "")
  return out


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: os.path.basename(p))
def test_reference_preset_sets_the_references_behaviour_and_nothing_else(path):
  default, reference = _flat(_load(path)), _flat(_load(path, "reference"))
  # Where our defaults deviate from the reference implementation:
  assert reference["prompt.placement"] == "after_padding"  # trimmed batch, then the prompt
  assert reference["downstream.test_prompt"] == "last"  # it tested the live (last) prompt
  assert reference["downstream.eval_batch_size"] == 16  # its predict_batch_size
  changed = {key for key in default if default[key] != reference[key]}
  assert changed == {"prompt.placement", "downstream.test_prompt", "downstream.eval_batch_size"}
  # Where they already agree, the preset says so too.
  assert reference["downstream.step0_candidate"] is False and reference["downstream.max_epochs"] == 1000
  assert (
    reference["downstream.decoding"],
    reference["downstream.num_beams"],
    reference["downstream.repetition_penalty"],
    reference["downstream.early_stopping"],
    reference["downstream.max_decode_len"],
  ) == ("beam", 4, 2.5, True, 127)
  assert reference["dtype"] == "float32"  # fp16 autocast is not available (docs/PROTOCOL.md)


def test_protocol_doc_names_every_key_of_the_reference_preset():
  text = open(os.path.join(REPO, "docs", "PROTOCOL.md"), encoding="utf-8").read()
  for key in config_lib.REFERENCE_BEHAVIOUR:
    assert f"`{key}`" in text, key
  assert "`:reference`" in text


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if "maml_cls2cls" in p])
def test_tiny_preset_shrinks_the_run(path):
  config = _load(path, "tiny")
  assert config.upstream.num_steps <= 4 and config.downstream.num_steps <= 4


@pytest.mark.parametrize("method", ["pt", "maml", "mtl"])
def test_mini_final_preset_is_mini_in_the_final_form_and_nothing_else(method):
  """The final mini-study's preset differs from `mini` in exactly the five keys experiments/README.md
  chose on dev, and is a valid config (channel and calibration need rank decoding)."""
  from experiments import presets  # the mini-study's presets live beside it

  presets.register()
  mini = config_lib.flatten(config_lib.base_config(method, "wn_cls2cls", "mini"))
  final_config = config_lib.base_config(method, "wn_cls2cls", "mini_final")
  final = config_lib.flatten(final_config)
  changed = {key: final[key] for key in final if final[key] != mini.get(key)}
  assert changed == {
    "data.direction": "channel",
    "data.input_template": "{input}",
    "downstream.calibration": "train_mean",
    "prompt.init": "token",
    "downstream.lrs": (0.5, 0.3, 0.1, 0.03),
  }
  config_lib.validate(final_config)


def test_unknown_method_and_preset_are_rejected():
  with pytest.raises(ValueError, match="unknown method"):
    config_lib.base_config("mamll", "cls2cls")
  with pytest.raises(ValueError, match="unknown preset"):
    config_lib.base_config("maml", "cls2cls", "tinyy")


def test_all_55_configs_resolve_their_setting_and_initialize_their_prompt(tiny_tokenizer_dir):
  # On a tiny model with the tiny tokenizer: the configs' own prompt length (100) and init (task names),
  # so the 114 names of `random` must fit its 100 rows as in the reference.
  import warnings

  import numpy as np

  import helpers_t5
  from mpt_jax import gyms, pipeline
  from mpt_jax.model.tokenizer import load_tokenizer

  tokenizer = load_tokenizer(tiny_tokenizer_dir)
  model, params = helpers_t5.tiny_t5("1.1", vocab_size=len(tokenizer))
  assert len(CONFIG_FILES) == 55
  for path in CONFIG_FILES:
    config = _load(path)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")  # nonli2nli's sick leak has its own test
      setting = gyms.resolve_setting(config)
    # Upstream methods start from the source tasks' names; PT from each target task's own name.
    name_lists = [list(setting.source)] if config.method != "pt" else [[t] for t in setting.target]
    for names in name_lists:
      prompt = pipeline.initial_prompt(config, params, tokenizer, names, config.seed)
      assert prompt.shape == (config.prompt.length, model.config.d_model), path
      assert np.all(np.isfinite(prompt)), path
