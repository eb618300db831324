r"""Entry point: one method on one adaptation setting, upstream then downstream, with results.

  python -m mpt_jax.main --config=configs/maml_cls2cls.py --workdir=runs/maml_cls2cls \
      --config.data_dir=/data/crossfit --config.model=google/t5-large-lm-adapt

Stages (`--config.stages`): "upstream" learns the prompt initialization on the source tasks (not for
PT), "downstream" prompt-tunes from it on every target task with the study's grid and writes
results. `--config.init_prompt=path.npy` starts downstream from a saved prompt (skips upstream).
Running the same command again with the same workdir resumes: upstream from its latest checkpoint,
downstream from each target task's latest grid checkpoint; a different config in the same workdir is
refused (docs/BAD_INPUTS.md lists what each mistake gives).

Exit codes: 0 done; 1 a mistake to fix (one `FATAL <kind>: <message>` line, no traceback: a config, data,
workdir or model error, a divergence); 75 (EX_TEMPFAIL, "try again later") the workdir is another job's:
its lease is held by a live job (`WorkdirBusy`), or was taken over by another job while this one ran
(`LeaseLost`), also one FATAL line. Launchers retry on 75 (launch.sh tpu watch, scripts/slurm/mpt_jax.sbatch)
and stop on 1.
"""

from __future__ import annotations

import importlib.util
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from mpt_jax import resources

EXIT_MISTAKE = 1  # the user's to fix: rerunning the same command fails the same way
EXIT_BUSY = 75  # EX_TEMPFAIL (sysexits.h): another job holds the workdir; the same command later may run

_CONFIG = config_flags.DEFINE_config_file(
  "config", None, "Config file (configs/<method>_<setting>.py[:preset]).", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, prompts, logs and results.")
_MULTIHOST = flags.DEFINE_bool(
  "multihost",
  False,
  "Join the other processes of a multi-process run with jax.distributed.initialize() (every host of a "
  "TPU pod slice runs the same command; the cluster is detected there, elsewhere pass the three flags "
  "below).",
)
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", None, "--multihost without cluster detection: process 0's host:port."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "--multihost: how many processes there are.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "--multihost: this process's index, from 0.")


def config_mistakes(argv: list[str]) -> list[str]:
  """What is wrong with the command line's config before absl parses it: a config file that does not load,
  `--config.x` keys the config lacks (with "did you mean"). ml_collections would raise a bare
  AttributeError for the latter, and load a missing file only when the config is first used."""
  from mpt_jax import config as config_lib

  args = argv[1:]
  config_arg, keys = None, []
  for i, arg in enumerate(args):
    if arg == "--config" and i + 1 < len(args):
      config_arg = args[i + 1]
    elif arg.startswith("--config="):
      config_arg = arg.split("=", 1)[1]
    elif arg.startswith(("--config.", "--noconfig.")):
      keys.append(arg.split(".", 1)[1].split("=", 1)[0])
  if config_arg is None:
    return []
  try:
    config = load_config(config_arg)
  except ValueError as error:
    return [str(error)]
  return config_lib.unknown_keys(config, keys)


def load_config(config_arg: str):
  """The config of `--config`'s value (a path or a shipped config's name, `[:preset]`), loaded as
  ml_collections loads it (the file's get_config(preset)); a ValueError saying what is wrong if not."""
  config_arg = resources.resolve_config(config_arg)
  path, _, preset = config_arg.partition(":")
  if not os.path.isfile(path):
    raise ValueError(
      f"--config={config_arg}: no config file {path!r} (from {os.getcwd()}); the configs are "
      f"configs/<method>_<setting>.py[:preset], or by name: <method>_<setting>[:preset] (shipped in "
      f"{resources.CONFIGS_DIR})"
    )
  try:
    spec = importlib.util.spec_from_file_location("mpt_jax_checked_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*([preset] if preset else []))
  except Exception as error:  # noqa: BLE001 (a config file can raise anything)
    raise ValueError(
      f"--config={config_arg}: the config does not load: {type(error).__name__}: {error}"
    ) from None


def with_shipped_configs(argv: list[str]) -> list[str]:
  """`argv` with a `--config` given by name (`maml_cls2cls:tiny`), or as the checkout's
  `configs/maml_cls2cls.py` where there is no such file, replaced by the shipped config's path."""
  out = list(argv)
  for i, arg in enumerate(out):
    if arg == "--config" and i + 1 < len(out):
      out[i + 1] = resources.resolve_config(out[i + 1])
    elif arg.startswith("--config="):
      out[i] = "--config=" + resources.resolve_config(arg.split("=", 1)[1])
  return out


def parse_flags(argv: list[str]) -> list[str]:
  argv = with_shipped_configs(argv)
  mistakes = config_mistakes(argv)
  if mistakes:
    sys.stderr.write("FATAL Flags parsing error:\n" + "".join(f"  {m}\n" for m in mistakes))
    sys.exit(1)
  return app.parse_flags_with_usage(argv)


def main(argv) -> None:
  del argv
  from mpt_jax import host_memory  # before JAX starts: the CPU steps then reuse their memory

  logging.info("host malloc: %s", host_memory.reuse_freed_memory())
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  import jax

  # orbax logs every step of every save at INFO; keep our own progress lines readable.
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  if _MULTIHOST.value:
    jax.distributed.initialize(
      coordinator_address=_COORDINATOR.value,
      num_processes=_NUM_PROCESSES.value,
      process_id=_PROCESS_ID.value,
    )
    logging.info("process %d of %d", jax.process_index(), jax.process_count())
  from mpt_jax import config as config_lib, fingerprint, lease, pipeline
  from mpt_jax.data import crossfit
  from mpt_jax.model import hf

  config, workdir = _CONFIG.value, _WORKDIR.value
  if config is None or not workdir:
    raise app.UsageError("both --config and --workdir are required")
  logging.info("devices: %s", jax.devices())
  try:
    pipeline.run(config, workdir)
  except lease.WorkdirBusy as error:  # (LeaseLost too) another job's workdir: not a mistake, try later
    sys.stderr.write(f"FATAL {type(error).__name__}: {error}\n")
    sys.exit(EXIT_BUSY)
  except (
    config_lib.ConfigError,
    crossfit.CrossFitError,
    fingerprint.WorkdirConflict,
    hf.CheckpointNotFound,
    pipeline.UpstreamDiverged,
  ) as error:  # the user's to fix, and said in full: no traceback
    sys.stderr.write(f"FATAL {type(error).__name__}: {error}\n")
    sys.exit(EXIT_MISTAKE)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=parse_flags)
