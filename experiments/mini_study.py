r"""The offline mini-study: all five methods on the WordNet gym's settings, with the small T5 pretrained
here (assets/small_t5), 5 seeds per target task. The default preset is `mini_final` (experiments/presets.py:
`mini`, the study's direct form, changed to the noisy-channel form with calibrated rank classification,
EOS-row initial prompts and a downstream grid reaching down to lr 0.03; experiments/README.md says why);
`--preset=mini` runs the study's direct form.

  python experiments/mini_study.py [--workdir=runs/mini_final] \
      [--settings=wn_cls2cls,wn_nocls2cls,wn_both2cls,wn_nocls2nocls] [--preset=mini_final] [--set key=value ...]

Each setting is `experiments/run_setting.py --preset=<preset>`; the study's tables land in
<workdir>/<setting>/comparison_<setting>.{md,csv,json,png} and the wall time of each setting in
<workdir>/timings.json. Resumable: run it again to continue (finished stages and tasks are kept).

PT does not depend on the source tasks: its config differs between settings only in the setting's name.
So a task already prompt-tuned by an earlier setting of this study (as a target, or as a source for the
similarity analysis) reuses those PT runs (copied, and said so in the log) instead of computing the same
numbers again. With the preset's `downstream.prompt_tune_sources`, PT also prompt-tunes every source task,
and the study ends with the task-similarity analysis (mpt_jax/analysis.py) over all its settings, in
<workdir>/analysis/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

from absl import app, flags

# Run by path (python experiments/mini_study.py): the repository root makes `experiments` a package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mpt_jax import host_memory, study

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags: defined when this runs as a script, not when it is imported (its tests
  import it beside mpt_jax.main, which defines --workdir too)."""
  flags.DEFINE_string("workdir", "runs/mini_final", "Output directory.")
  flags.DEFINE_list(
    "settings", ["wn_cls2cls", "wn_nocls2cls", "wn_both2cls", "wn_nocls2nocls"], "WordNet gym settings."
  )
  flags.DEFINE_string(
    "preset",
    "mini_final",
    "Config preset (mini_final; mini: the study's direct form; demo for a quick look).",
  )
  flags.DEFINE_multi_string("set", [], "key=value config override for every method and setting.")
  flags.DEFINE_bool("report_only", False, "Only (re)write the downstream loss tables.")


HERE = os.path.dirname(os.path.abspath(__file__))


def finished_pt_runs(workdir: str, settings: list[str], kind: str) -> dict[str, str]:
  """{task: directory} of every finished PT grid of `kind` ("downstream": a target task's, "sources": a
  source task's) of the given settings."""
  found = {}
  for other in settings:
    parent = os.path.join(workdir, other, "pt", kind)
    for task in sorted(os.listdir(parent)) if os.path.isdir(parent) else ():
      if os.path.exists(os.path.join(parent, task, "results.json")):
        found.setdefault(task, os.path.join(parent, task))
  return found


def share_pt_runs(workdir: str, setting: str, earlier: list[str], targets, sources=()) -> list[str]:
  """Copies finished PT grids of earlier settings to where this setting's PT run needs them: a target
  task's from an earlier setting's targets into pt/downstream/, a source task's from earlier sources into
  pt/sources/. Never across the two: a source task is prompt-tuned with `downstream.source_seeds` (fewer
  seeds), a target with every seed, so the grids differ (and the run's fingerprint check refuses one
  copied across)."""
  copied = []
  for kind, tasks in (("downstream", targets), ("sources", sources)):
    found = finished_pt_runs(workdir, earlier, kind)
    for task in tasks:
      destination = os.path.join(workdir, setting, "pt", kind, task)
      if task in found and not os.path.exists(os.path.join(destination, "results.json")):
        shutil.copytree(found[task], destination, dirs_exist_ok=True)
        copied.append(f"{task} (from {os.path.relpath(found[task], workdir)})")
  return copied


METHOD_ORDER = study.METHODS


def downstream_loss_table(setting_dir: str) -> str:
  """Markdown: each method's downstream training loss (mean over the grid's runs of the batch loss, at
  every logged step) per target task. Where the test scores are all near chance, this still shows
  whether an initialization helps prompt tuning fit the target task."""
  rows, steps = {}, set()
  for method in METHOD_ORDER:
    downstream = os.path.join(setting_dir, method, "downstream")
    for task in sorted(os.listdir(downstream)) if os.path.isdir(downstream) else ():
      path = os.path.join(downstream, task, "logs", "metrics.jsonl")
      if os.path.exists(path):
        with open(path) as f:
          losses = {r["step"]: r[f"{task}/loss"] for r in map(json.loads, f) if f"{task}/loss" in r}
        rows.setdefault(task, {})[method] = losses
        steps.update(losses)
  methods = [m for m in METHOD_ORDER if any(m in by_method for by_method in rows.values())]
  steps_text = "/".join(str(s) for s in sorted(steps))
  lines = [
    f"Downstream training loss (nats/target token, mean over the grid's runs) at steps {steps_text}:",
    "",
    "| task | " + " | ".join(methods) + " |",
    "|---|" + "---|" * len(methods),
  ]
  for task, by_method in sorted(rows.items()):
    cells = [
      "/".join(f"{by_method[m][s]:.2f}" for s in sorted(by_method[m])) if m in by_method else ""
      for m in methods
    ]
    lines.append(f"| {task} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_loss_table(workdir: str, setting: str) -> None:
  setting_dir = os.path.join(workdir, setting)
  table = downstream_loss_table(setting_dir)
  with open(os.path.join(setting_dir, f"downstream_losses_{setting}.md"), "w") as f:
    f.write(f"# {setting}\n\n{table}")
  print(table, flush=True)


def main(argv) -> None:
  del argv
  host_memory.reuse_freed_memory()  # before JAX runs anything (mpt_jax/host_memory.py)
  if FLAGS.report_only:
    for setting in FLAGS.settings:
      write_loss_table(FLAGS.workdir, setting)
    return
  from mpt_jax.data import settings as settings_lib
  from experiments import wordnet_gym

  wordnet_gym.register()
  timings_path = os.path.join(FLAGS.workdir, "timings.json")
  os.makedirs(FLAGS.workdir, exist_ok=True)
  timings = json.load(open(timings_path)) if os.path.exists(timings_path) else {}
  done = []
  for setting in FLAGS.settings:
    resolved = settings_lib.get_setting(setting)  # an unknown name fails here, before any compute
    copied = share_pt_runs(FLAGS.workdir, setting, done, resolved.target, resolved.source)
    if copied:
      print(f"{setting}: PT reuses the runs of {', '.join(copied)}", flush=True)
    start = time.time()
    subprocess.run(
      [
        sys.executable,
        os.path.join(HERE, "run_setting.py"),
        f"--setting={setting}",
        f"--preset={FLAGS.preset}",
        f"--workdir={os.path.join(FLAGS.workdir, setting)}",
        *[f"--set={item}" for item in FLAGS.set],
      ],
      check=True,
    )
    minutes = (time.time() - start) / 60
    timings.setdefault(setting, []).append({"minutes": round(minutes, 2), "pt_reused": copied})
    with open(timings_path, "w") as f:
      json.dump(timings, f, indent=1)
    print(f"{setting}: {minutes:.1f} min", flush=True)
    write_loss_table(FLAGS.workdir, setting)
    done.append(setting)
  similarity_analysis(FLAGS.workdir, done)


def similarity_analysis(workdir: str, settings: list[str]) -> None:
  """Task similarity vs gain over PT (mpt_jax.analysis), when the PT runs prompt-tuned the sources."""
  from mpt_jax import analysis

  dirs = [os.path.join(workdir, s) for s in settings]
  if not all(os.path.isdir(os.path.join(d, "pt", "sources")) for d in dirs):
    print("no source-task PT runs (downstream.prompt_tune_sources off): similarity analysis skipped")
    return
  paths = analysis.write_report(analysis.analyze(dirs), os.path.join(workdir, "analysis"))
  print(open(paths["md"], encoding="utf-8").read(), flush=True)


if __name__ == "__main__":
  define_flags()
  app.run(main)
