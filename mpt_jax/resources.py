"""Where the files shipped inside the package are: the configs, the small T5 and the WordNet gym.

They live under the package (`mpt_jax/configs`, `mpt_jax/assets`), so that a wheel carries them and an
installed `mpt-jax` finds them through `importlib.resources`, wherever it is installed. In a checkout the
top-level `configs` and `assets` are symlinks to them, so that `--config=configs/maml_cls2cls.py` and
`assets/small_t5` read the same files.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

PACKAGE_DIR = Path(str(resources.files("mpt_jax")))
CONFIGS_DIR = PACKAGE_DIR / "configs"
ASSETS_DIR = PACKAGE_DIR / "assets"
SMALL_T5_DIR = ASSETS_DIR / "small_t5"  # the demo's frozen model (experiments/pretrain_small_t5.py)
WORDNET_GYM_DIR = ASSETS_DIR / "wordnet_gym"  # the WordNet gym (built by experiments/wordnet_gym.py)


def shipped_configs() -> list[str]:
  """The names of the shipped configs (`maml_cls2cls`, ...), sorted."""
  return sorted(p.stem for p in CONFIGS_DIR.glob("*.py"))


def resolve_config(config_arg: str) -> str:
  """`--config`'s value (`PATH[:preset]`) with a shipped config found by name when PATH is no file: a bare
  name (`maml_cls2cls`, `maml_cls2cls.py`) or the checkout's path (`configs/maml_cls2cls.py`) from any
  directory, so that an installed package runs the documented commands. Anything else is left as it is."""
  path, sep, preset = config_arg.partition(":")
  if os.path.isfile(path):
    return config_arg
  folder, name = os.path.split(path)
  if folder not in ("", "configs"):  # another directory: the user's own file, which must exist
    return config_arg
  shipped = CONFIGS_DIR / (name if name.endswith(".py") else f"{name}.py")
  return f"{shipped}{sep}{preset}" if shipped.is_file() else config_arg
