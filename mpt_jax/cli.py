"""The `mpt-jax` command (pyproject's console script): launch.sh's Python entry points, for an installed package.

  mpt-jax demo [--workdir=runs/demo] [...]     the offline demo: five methods on wn_cls2cls, preset demo
  mpt-jax run --config=maml_cls2cls --workdir=runs/maml_cls2cls [--config.x=y ...]   (python -m mpt_jax.main)
  mpt-jax study --setting=cls2cls --workdir=runs/cls2cls [--config.x=y ...]         (mpt_jax/run_setting.py)
  mpt-jax analysis --out=DIR SETTING_DIR [...]   task similarity vs gain over PT     (python -m mpt_jax.analysis)
  mpt-jax analysis --out=DIR --compare A B      two runs example by example, from their predictions
  mpt-jax configs                              the shipped configs, by name
  mpt-jax config [NAME[:preset]] [--full]      every config key, its value there and its meaning
  mpt-jax export-prompt PROMPT.npy --to=peft OUT_DIR [--base_model=...]   a PEFT adapter (mpt_jax.peft_export)

Each command takes the same flags as launch.sh passes to its entry point. `--config` takes a path or a
shipped config's name (`maml_cls2cls:tiny`; `configs/maml_cls2cls.py` finds it too, from any directory).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

COMMANDS = ("demo", "run", "study", "analysis", "configs", "config", "export-prompt")


def _usage() -> str:
  return __doc__.split("\n\n")[1] + "\n"


def _demo_env() -> None:
  # As launch.sh demo: offline, and on CPU the non-partitionable threefry compiles dropout's random bits
  # ~3x faster (measured). Set before anything imports JAX.
  os.environ["HF_HUB_OFFLINE"] = "1"
  os.environ["HF_DATASETS_OFFLINE"] = "1"
  os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")


def main(argv: Sequence[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  if not argv:
    sys.stderr.write(_usage())
    return 2
  if argv[0] in ("-h", "--help", "help"):
    sys.stdout.write(_usage())
    return 0
  command, args = argv[0], argv[1:]
  if command not in COMMANDS:
    sys.stderr.write(f"mpt-jax: unknown command {command!r}; expected one of {', '.join(COMMANDS)}\n\n")
    sys.stderr.write(_usage())
    return 2
  prog = f"mpt-jax {command}"
  if command == "configs":
    from mpt_jax import resources

    print(f"# shipped in {resources.CONFIGS_DIR} (--config=NAME[:preset])")
    print("\n".join(resources.shipped_configs()))
    return 0
  if command == "config":
    from mpt_jax import config_docs

    return config_docs.main(args)
  if command == "export-prompt":
    from mpt_jax import peft_export

    sys.argv[0] = prog
    peft_export.main(args)
    return 0
  if command == "analysis":
    from mpt_jax import analysis

    sys.argv[0] = prog  # argparse's usage line
    analysis.main(args)
    return 0
  from absl import app, flags

  if command == "run":
    from mpt_jax import main as entry

    flags.mark_flags_as_required(["config", "workdir"])
    app.run(entry.main, argv=[prog, *args], flags_parser=entry.parse_flags)
  else:
    if command == "demo":
      _demo_env()
      workdir = os.environ.get("MPT_DEMO_WORKDIR", "runs/demo")
      args = ["--setting=wn_cls2cls", "--preset=demo", f"--workdir={workdir}", *args]  # later flags win
    from mpt_jax import run_setting as entry

    flags.mark_flags_as_required(["setting", "workdir"])
    app.run(entry.main, argv=[prog, *args], flags_parser=entry.parse_flags)
  return 0  # app.run exits by itself


if __name__ == "__main__":
  sys.exit(main())
