"""Offline gyms: task collections in the CrossFit layout that need no download.

- "synthetic": artificial tasks from `mpt_jax.data.synthetic`, generated on first use (seconds).
- "wordnet": real-language tasks built from WordNet, shipped in mpt_jax/assets/wordnet_gym (the generator,
  experiments/wordnet_gym.py in the repository, reproduces them from Debian's wordnet-base).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mpt_jax import paths, resources
from mpt_jax.data import settings as settings_lib

WORDNET_GYM_DIR = resources.WORDNET_GYM_DIR
GYMS = ("synthetic", "wordnet")


def ensure(name: str) -> None:
  """Registers the gym's tasks and settings (the synthetic gym is built in)."""
  if name not in GYMS:
    raise ValueError(f"config.gym={name!r}: expected one of {GYMS} (or leave it empty for CrossFit data)")
  if name == "wordnet" and "wordnet" not in settings_lib.gyms():
    settings_lib.register_gym_files(
      "wordnet", WORDNET_GYM_DIR / "wordnet_task_metrics.json", WORDNET_GYM_DIR / "wordnet_settings.json"
    )


def resolve_setting(config) -> settings_lib.Setting:
  """The setting a config names: `config.setting_file` if given, else `config.setting` (of CrossFit, a
  built-in gym, or `config.gym`'s, registered here first)."""
  if config.gym:
    ensure(config.gym)
  register_data_dir_tasks(config.data_dir)
  if config.setting_file:
    return settings_lib.load_setting(config.setting_file)
  return settings_lib.get_setting(config.setting)


def register_data_dir_tasks(data_dir: str) -> None:
  """Makes the tasks listed in `data_dir`'s tasks.json (their metric and kind) known, if it has one."""
  if not data_dir:
    return
  path = paths.join(data_dir, settings_lib.TASK_TABLE_FILE)
  try:
    if not paths.isfile(path):
      return
    text = paths.read_text(path)
  except ImportError:  # a URL whose filesystem is not installed here (a laptop checking a gs:// job first):
    return  # the job reads it where it runs
  try:
    table = json.loads(text)
  except json.JSONDecodeError as error:
    raise settings_lib.SettingError(f"{path}: not valid JSON ({error})") from None
  settings_lib.register_task_table(table, where=str(path))


def data_dir(name: str, default_dir: str | os.PathLike) -> str:
  """Where the gym's files are: the shipped directory, or `default_dir` generated on first use."""
  ensure(name)
  if name == "wordnet":
    if not WORDNET_GYM_DIR.is_dir():
      raise FileNotFoundError(
        f"{WORDNET_GYM_DIR} is missing: it ships with the package; regenerate it "
        f"from a clone of the repository with `python -m experiments.wordnet_gym --out_dir={WORDNET_GYM_DIR}` (needs apt-get install "
        f"wordnet-base)"
      )
    return str(WORDNET_GYM_DIR)
  from mpt_jax.data import synthetic

  out = Path(default_dir).resolve() / "synthetic"
  marker = out / ".complete"
  if not marker.exists():
    synthetic.write_synthetic_gym(out)
    marker.write_text("ok\n")
  return str(out)
