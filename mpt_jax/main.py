r"""Entry point: one method on one adaptation setting, upstream then downstream, with results.

  python -m mpt_jax.main --config=configs/maml_cls2cls.py --workdir=runs/maml_cls2cls \
      --config.data_dir=/data/crossfit --config.model=google/t5-large-lm-adapt

Stages (`--config.stages`): "upstream" learns the prompt initialization on the source tasks (not for
PT), "downstream" prompt-tunes from it on every target task with the study's grid and writes
results. `--config.init_prompt=path.npy` starts downstream from a saved prompt (skips upstream).
Running the same command again with the same workdir resumes: upstream from its latest checkpoint,
downstream from the first target task without results.
"""

from __future__ import annotations

import os

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/<method>_<setting>.py[:preset]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, prompts, logs and results.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() (TPU pods).")


def main(argv) -> None:
  del argv
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  import jax

  # orbax logs every step of every save at INFO; keep our own progress lines readable.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  if _MULTIHOST.value:
    jax.distributed.initialize()
  from mpt_jax import pipeline

  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("both --config and --workdir are required")
  logging.info("devices: %s", jax.devices())
  pipeline.run(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
