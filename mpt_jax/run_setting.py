r"""All five methods on one setting, then the study's comparison table (PT first).

  mpt-jax study --setting=cls2cls --workdir=runs/cls2cls \
      --set data_dir=/data/crossfit --set model=google/t5-large-lm-adapt
  (the same: python -m mpt_jax.run_setting ..., python experiments/run_setting.py ..., bash launch.sh study ...)

Each method is `python -m mpt_jax.main` with `configs/<method>_<setting>.py` (run in this process, one
after another): PT first, so that the others report their relative gain over it. `--preset` picks a
config preset (e.g. `demo`), `--set key=value` overrides any config field for every method, and
`--methods` picks a subset. Run it again with the same workdir to resume: finished stages are kept.
Output: <workdir>/<method>/ per method and <workdir>/comparison_<setting>.{md,csv,json,png}; the
methods share <workdir>/cache (tokenized tasks, compiled steps).
"""

from __future__ import annotations

import ast
import os

from absl import app, flags, logging

from mpt_jax import config as config_lib, paths as paths_lib

_SETTING = flags.DEFINE_string("setting", None, "Setting name (e.g. cls2cls, wn_cls2cls, synth_mini).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory (one subdirectory per method).")
_PRESET = flags.DEFINE_string("preset", None, "Config preset for every method (e.g. tiny, demo).")
_METHODS = flags.DEFINE_list("methods", list(config_lib.METHODS), "Methods to run, PT first.")
_SET = flags.DEFINE_multi_string(
  "set",
  [],
  "key=value config override for every method (e.g. --set downstream.num_steps=100); "
  "--config.downstream.num_steps=100, as for a run, is the same.",
)


CONFIG_PREFIX = "--config."


def as_set_flags(argv: list[str]) -> list[str]:
  """`--config.KEY=VALUE` (a run's override syntax) as `--set=KEY=VALUE`: one syntax for a run and a study."""
  out = []
  for arg in argv:
    if arg.startswith(CONFIG_PREFIX):
      key, sep, value = arg[len(CONFIG_PREFIX) :].partition("=")
      if not sep:
        raise app.UsageError(f"{arg}: expected --config.key=value (every method of the study gets it)")
      arg = f"--set={key}={value}"
    out.append(arg)
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with `--config.KEY=VALUE` accepted as an alias of `--set KEY=VALUE`."""
  return app.parse_flags_with_usage(as_set_flags(argv))


def method_config(method: str, setting: str, preset: str | None, overrides: list[str]):
  config = config_lib.base_config(method, setting, preset)
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep:
      raise app.UsageError(f"--set {item!r}: expected key=value")
    try:
      value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
      value = text  # a plain string (a path, a model id)
    unknown = config_lib.unknown_keys(config, [key])
    if unknown:
      raise app.UsageError(f"--set {item!r}: {unknown[0]}")
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    node[leaf] = type(node[leaf])(value) if isinstance(node[leaf], tuple) else value
  return config


def main(argv) -> None:
  del argv
  from mpt_jax import host_memory  # before JAX starts: the CPU steps then reuse their memory

  logging.info("host malloc: %s", host_memory.reuse_freed_memory())
  os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)
  from mpt_jax import methods as methods_lib, pipeline, results

  setting, workdir = _SETTING.value, _WORKDIR.value
  methods = sorted(_METHODS.value, key=lambda m: m != "pt")  # PT first: the others compare to it
  unknown = [m for m in methods if m not in methods_lib.names()]
  if unknown:
    raise app.UsageError(f"--methods: unknown {unknown}; choose from {methods_lib.names()}")
  configs = {m: method_config(m, setting, _PRESET.value, _SET.value) for m in methods}
  for config in configs.values():
    # One cache for all methods: the tokenized tasks and the compiled steps (the downstream grid, the
    # same for every method) are made by the first method and loaded by the others.
    config.cache_dir = config.cache_dir or os.path.join(workdir, "cache")
  summaries = []
  pt_results = paths_lib.join(workdir, "pt", "results.json")  # workdir: a local path or a URL
  for method, config in configs.items():
    if method != "pt" and paths_lib.exists(pt_results) and not config.pt_results:
      config.pt_results = pt_results
    logging.info("=== %s on %s ===", method, setting)
    summary = pipeline.run(config, paths_lib.join(workdir, method))
    if summary is not None:
      summaries.append(summary)
  first = next(iter(configs))
  chance = pipeline.target_baselines(configs[first], paths_lib.join(workdir, first))
  comparison = results.compare_methods(summaries, baselines=chance)
  # each method's runs are in <workdir>/<method>: the table's cells link there
  paths = results.write_comparison(
    comparison, workdir, run_dirs={s["method"]: s["method"] for s in summaries}
  )
  print(paths_lib.read_text(paths["md"]))
  print(f"written: {', '.join(paths.values())}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["setting", "workdir"])
  app.run(main)
