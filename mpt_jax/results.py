"""Result tables of the study: per-seed test scores -> per task mean and std, per setting average and
relative gain over PT (ARG), as JSON, markdown, CSV and a bar plot; plus a record of each run.

Numbers follow the study (reference/PROTOCOL.md, "Downstream"):
- per task: mean and std of the test scores over the seeds; std is `np.std` with its default ddof=0,
  i.e. the POPULATION std over the 5 seeds (what the study's tables used), recorded as "std_ddof".
- per setting: "average" = mean over target tasks of the per-task means.
- ARG = mean over tasks of (m - PT) / PT with m and PT per-task means (not the gain of the averages).
  The formula is kept as the study wrote it, even where a negative PT score (Matthew-Correlation)
  makes its sign misleading; a task whose PT mean is 0 has no relative gain (NaN, excluded).
- NaN (a Pearson score of unparsable predictions, a failed run) is not silently averaged away nor
  allowed to poison a whole table: with nan_policy="omit" (default) means and stds are over the finite
  values only, and the count of excluded values is stored ("n_nan", "tasks_without_score", ...) and
  flagged in the tables; nan_policy="propagate" gives NaN wherever a NaN enters (plain np.mean).

Data model: plain JSON-serializable dicts (a run is a dict with "task", "seed", "test_score" and
optional "dev_score", "best_lr", "best_step", "metric", ...; `RunResult` builds one). In memory a
missing score is float('nan'); in the JSON files it is null. Scores are stored as the metrics return
them (0..1 for most); the markdown tables and plots show them x100 like the study.

  summary = summarize_runs(runs, setting="cls2cls", method="maml", pt="runs/pt_cls2cls/results.json")
  write_setting_results(summary, "runs/maml_cls2cls")        # results.{json,md,csv,png}
  write_comparison(compare_methods([pt, mtl, maml]), "runs/tables", name="cls2cls")

Command line, the study's table for one setting from the methods' results.json files:
  python -m mpt_jax.results --out=runs/tables runs/*_cls2cls/results.json
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import math
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from mpt_jax import lease, paths

STD_DDOF = 0  # np.std's default, as in the study's tables: population std over seeds.
NAN_POLICIES = ("omit", "propagate")
RECORDED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy")
RESULTS_FILE = "results.json"
# Beside a target task's results (mpt_jax/adapt.py writes the curve): every evaluation's dev score of
# every run of its grid, and their plot with the chosen runs marked.
DEV_CURVE_FILE = "dev_curve.json"
DEV_CURVES_PLOT = "dev_curves.png"
# ... and the dev and test predictions of each seed's tested prompt, one JSON object an example
# (`adapt.Scorer.prediction_records`): what `mpt_jax.analysis --compare` reads.
PREDICTIONS_FILE = "predictions.jsonl"
# Where a run's target tasks are, under its workdir: <workdir>/downstream/<task>/.
DOWNSTREAM_DIR = "downstream"
RUN_RECORD_FILE = "run_record.json"


@dataclasses.dataclass
class RunResult:
  """One downstream run: the test score of the best dev checkpoint of the best lr, for one seed."""

  task: str
  seed: int
  test_score: float
  dev_score: float | None = None
  best_lr: float | None = None
  best_step: int | None = None
  metric: str | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------------
# Small numeric helpers: every score read goes through _num, so a JSON null reads as NaN.
# ---------------------------------------------------------------------------------------------------
def _num(value: Any) -> float:
  return float("nan") if value is None else float(value)


def _finite(values: Iterable[float]) -> list[float]:
  return [v for v in values if math.isfinite(v)]


def _mean(values: Sequence[float], nan_policy: str) -> float:
  values = _finite(values) if nan_policy == "omit" else list(values)
  return float(np.mean(values)) if values else float("nan")


def _std(values: Sequence[float], nan_policy: str) -> float:
  values = _finite(values) if nan_policy == "omit" else list(values)
  return float(np.std(values, ddof=STD_DDOF)) if values else float("nan")


def _check_nan_policy(nan_policy: str) -> None:
  if nan_policy not in NAN_POLICIES:
    raise ValueError(f"nan_policy={nan_policy!r}; expected one of {NAN_POLICIES}")


def _method_key(method: str) -> str:
  return method.lower()


def method_display_name(method: str) -> str:
  from mpt_jax import methods  # the table of methods (it imports JAX: only when a table is made)

  entry = methods.REGISTRY.get(_method_key(method))
  return method if entry is None else entry.display_name


def _method_sort_key(method: str) -> tuple[int, str]:
  """The registry's order (the study's column order, PT first, then added methods), unknown ones last."""
  from mpt_jax import methods

  order, key = methods.names(), _method_key(method)
  return (order.index(key) if key in order else len(order), key)


# ---------------------------------------------------------------------------------------------------
# Summaries.
# ---------------------------------------------------------------------------------------------------
def _as_run_dict(run: RunResult | Mapping[str, Any], index: int) -> dict[str, Any]:
  run = run.to_dict() if isinstance(run, RunResult) else dict(run)
  missing = [key for key in ("task", "seed", "test_score") if key not in run]
  if missing:
    raise ValueError(
      f"run {index} lacks {missing}: each run needs 'task', 'seed' and 'test_score' (got keys {sorted(run)})"
    )
  run["test_score"] = _num(run["test_score"])
  return run


def summarize_task(
  task: str, runs: Iterable[RunResult | Mapping[str, Any]], nan_policy: str = "omit"
) -> dict[str, Any]:
  """Per-seed test scores of one task -> {"seeds", "test_scores", "mean", "std", "n_nan", "runs", ...}."""
  _check_nan_policy(nan_policy)
  runs = [_as_run_dict(run, i) for i, run in enumerate(runs)]
  if not runs:
    raise ValueError(f"task {task!r}: no runs to summarize")
  other_tasks = sorted({str(run["task"]) for run in runs if run["task"] != task})
  if other_tasks:
    raise ValueError(f"task {task!r}: got runs of other tasks {other_tasks}")
  seeds = [run["seed"] for run in runs]
  duplicates = sorted({s for s in seeds if seeds.count(s) > 1})
  if duplicates:
    raise ValueError(f"task {task!r}: more than one run for seeds {duplicates}; keep one per seed")
  runs.sort(key=lambda run: run["seed"])
  metrics = sorted({run["metric"] for run in runs if run.get("metric")})
  if len(metrics) > 1:
    raise ValueError(f"task {task!r}: runs disagree on the metric: {metrics}")
  scores = [run["test_score"] for run in runs]
  # Grid runs that failed the NaN/divergence guard (left out of their seed's choice of learning rate).
  failed = [{"seed": run["seed"], **failure} for run in runs for failure in run.get("failed_runs") or ()]
  return {
    "task": task,
    "metric": metrics[0] if metrics else None,
    "seeds": [run["seed"] for run in runs],
    "test_scores": scores,
    "mean": _mean(scores, nan_policy),
    "std": _std(scores, nan_policy),
    "std_ddof": STD_DDOF,
    "nan_policy": nan_policy,
    "n_seeds": len(scores),
    "n_nan": len(scores) - len(_finite(scores)),
    "failed_runs": failed,
    "runs": runs,
  }


def _pt_means(pt: str | os.PathLike | Mapping[str, Any]) -> tuple[dict[str, float], str]:
  """Per-task PT means from a PT setting summary, or from the path of its results.json."""
  source = "given summary"
  if isinstance(pt, (str, os.PathLike)):
    source = os.fspath(pt)
    pt = load_results(pt)
  if not isinstance(pt, Mapping) or not isinstance(pt.get("tasks"), Mapping):
    raise ValueError(
      f"PT results ({source}) must be a setting summary with a 'tasks' mapping "
      "(a results.json written by write_setting_results)"
    )
  return {task: _num(summary["mean"]) for task, summary in pt["tasks"].items()}, source


def relative_gains(means: Mapping[str, float], pt_means: Mapping[str, float]) -> dict[str, float]:
  """(m - PT) / PT per task present in both; NaN where PT's mean is 0 or NaN."""
  gains = {}
  for task, mean in means.items():
    if task in pt_means:
      pt_mean = _num(pt_means[task])
      gains[task] = (_num(mean) - pt_mean) / pt_mean if pt_mean != 0 else float("nan")
  return gains


def summarize_setting(
  task_summaries: Iterable[Mapping[str, Any]],
  *,
  setting: str,
  method: str,
  pt: str | os.PathLike | Mapping[str, Any] | None = None,
  nan_policy: str = "omit",
) -> dict[str, Any]:
  """Task summaries of one method on one setting -> average over tasks and, given PT, the ARG."""
  _check_nan_policy(nan_policy)
  tasks = {}
  for summary in task_summaries:
    if summary["task"] in tasks:
      raise ValueError(f"setting {setting!r}, method {method!r}: task {summary['task']!r} given twice")
    tasks[summary["task"]] = dict(summary)
  if not tasks:
    raise ValueError(f"setting {setting!r}, method {method!r}: no task results")
  means = {task: _num(summary["mean"]) for task, summary in tasks.items()}
  result = {
    "setting": setting,
    "method": method,
    "std_ddof": STD_DDOF,
    "nan_policy": nan_policy,
    "tasks": tasks,
    "average": _mean(list(means.values()), nan_policy),
    "n_tasks": len(tasks),
    "tasks_without_score": [task for task, mean in means.items() if not math.isfinite(mean)],
  }
  if pt is not None:
    pt_means, pt_source = _pt_means(pt)
    gains = relative_gains(means, pt_means)
    result.update(
      {
        "pt_source": pt_source,
        "relative_gain": gains,
        "arg": _mean(list(gains.values()), nan_policy),
        "arg_tasks_missing_in_pt": [task for task in tasks if task not in pt_means],
        "arg_tasks_without_gain": [task for task, gain in gains.items() if not math.isfinite(gain)],
      }
    )
  return result


def summarize_runs(
  runs: Iterable[RunResult | Mapping[str, Any]],
  *,
  setting: str,
  method: str,
  pt: str | os.PathLike | Mapping[str, Any] | None = None,
  nan_policy: str = "omit",
) -> dict[str, Any]:
  """All runs of one method on one setting (any order) -> the setting summary, tasks in first-seen order."""
  by_task: dict[str, list] = {}
  for i, run in enumerate(runs):
    run = _as_run_dict(run, i)
    by_task.setdefault(run["task"], []).append(run)
  return summarize_setting(
    [summarize_task(task, task_runs, nan_policy) for task, task_runs in by_task.items()],
    setting=setting,
    method=method,
    pt=pt,
    nan_policy=nan_policy,
  )


# ---------------------------------------------------------------------------------------------------
# JSON files (NaN <-> null, atomic writes: a preempted run never leaves half a file).
# ---------------------------------------------------------------------------------------------------
def _jsonable(value: Any) -> Any:
  if isinstance(value, float) or isinstance(value, np.floating):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, np.integer):
    return int(value)
  if isinstance(value, np.ndarray):
    return _jsonable(value.tolist())
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  if isinstance(value, RunResult):
    return _jsonable(value.to_dict())
  if value is None or isinstance(value, (str, int)):
    return value
  return repr(value)


def _write_atomic(path: str, text: str) -> None:
  lease.check(path)  # not beside another job that took the workdir over (mpt_jax/lease.py: LeaseLost)
  paths.write_text(path, text)  # whole or not at all; errors name the file


def _write_json(path: str, value: Any) -> None:
  _write_atomic(path, json.dumps(_jsonable(value), indent=1, allow_nan=False) + "\n")


def load_results(path: str | os.PathLike) -> dict[str, Any]:
  """A results.json (task or setting summary, or comparison); a directory means its results.json."""
  path = os.fspath(path)
  if paths.isdir(path):
    path = paths.join(path, RESULTS_FILE)
  try:
    return json.loads(paths.read_text(path))
  except FileNotFoundError:
    raise FileNotFoundError(
      f"no results file at {path}; run the downstream stage (or write_setting_results) first"
    ) from None
  except json.JSONDecodeError as e:
    raise ValueError(f"{path} is not valid JSON ({e}); delete it and rewrite the results") from None


def write_task_results(task_summary: Mapping[str, Any], task_dir: str | os.PathLike) -> str:
  """<task_dir>/results.json of one task, and the plot of its grid's dev curves (DEV_CURVES_PLOT) when
  the grid's dev_curve.json is there; returns the results' path."""
  paths.makedirs(task_dir)
  path = paths.join(task_dir, RESULTS_FILE)
  _write_json(path, task_summary)
  curve = paths.join(task_dir, DEV_CURVE_FILE)
  if paths.exists(curve):
    plot_dev_curves(json.loads(paths.read_text(curve)), task_summary, paths.join(task_dir, DEV_CURVES_PLOT))
  return path


# ---------------------------------------------------------------------------------------------------
# Tables and plots.
# ---------------------------------------------------------------------------------------------------
def _pct(value: Any, digits: int) -> str:
  value = _num(value)
  return f"{100 * value:.{digits}f}" if math.isfinite(value) else "NaN"


def _signed_pct(value: Any, digits: int) -> str:
  value = _num(value)
  return f"{100 * value:+.{digits}f}%" if math.isfinite(value) else "NaN"


def _signed_points(value: Any, digits: int) -> str:
  """A score difference x100, in points (not a relative gain)."""
  value = _num(value)
  return f"{100 * value:+.{digits}f}" if math.isfinite(value) else "NaN"


def _mean_std_cell(summary: Mapping[str, Any], digits: int) -> str:
  cell = f"{_pct(summary['mean'], digits)} ± {_pct(summary['std'], digits)}"
  n_nan = summary.get("n_nan", 0)
  if n_nan:
    cell += f" ({n_nan}/{summary['n_seeds']} NaN)"
  return cell


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def _csv(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  buffer = io.StringIO()
  writer = csv.writer(buffer, lineterminator="\n")
  writer.writerow(header)
  for row in rows:
    writer.writerow(["nan" if isinstance(v, float) and math.isnan(v) else v for v in row])
  return buffer.getvalue()


def _nan_notes(summary: Mapping[str, Any]) -> list[str]:
  omit = summary.get("nan_policy", "omit") == "omit"
  notes = []
  if summary.get("tasks_without_score"):
    notes.append(
      f"No finite score: {', '.join(summary['tasks_without_score'])}"
      + (" (left out of the average)." if omit else " (the average is NaN).")
    )
  if any(t.get("n_nan") for t in summary["tasks"].values()):
    notes.append(
      "(k/n NaN): k of the n seeds scored NaN"
      + ("; mean and std are over the other seeds." if omit else "; the mean is NaN.")
    )
  failed = [
    f"{task} (seed {f['seed']}, lr {f['learning_rate']:g}, step {f['step']})"
    for task, t in summary["tasks"].items()
    for f in t.get("failed_runs") or ()
  ]
  if failed:
    notes.append(f"Runs that diverged (left out of the choice of learning rate): {', '.join(failed)}.")
  if summary.get("arg_tasks_missing_in_pt"):
    missing = ", ".join(summary["arg_tasks_missing_in_pt"])
    notes.append(f"Not in the PT results, left out of the ARG: {missing}.")
  if summary.get("arg_tasks_without_gain"):
    notes.append(f"No relative gain (PT mean 0 or NaN): {', '.join(summary['arg_tasks_without_gain'])}.")
  return notes


def setting_table_markdown(summary: Mapping[str, Any], digits: int = 1) -> str:
  """Markdown table of one method on one setting: per-seed scores, mean ± std, gain over PT (x100)."""
  seeds = sorted({seed for t in summary["tasks"].values() for seed in t["seeds"]})
  has_pt = "relative_gain" in summary
  header = ["task", "metric"] + [f"seed {s}" for s in seeds] + ["mean ± std"] + (["vs PT"] if has_pt else [])
  rows = []
  for task, t in summary["tasks"].items():
    by_seed = dict(zip(t["seeds"], t["test_scores"]))
    row = [task, t.get("metric") or ""]
    row += [_pct(by_seed[s], digits) if s in by_seed else "" for s in seeds]
    row.append(_mean_std_cell(t, digits))
    if has_pt:
      gain = summary["relative_gain"].get(task)
      row.append("" if gain is None and task not in summary["relative_gain"] else _signed_pct(gain, digits))
    rows.append(row)
  blank = [""] * (1 + len(seeds))
  rows.append(["**Average**"] + blank + [_pct(summary["average"], digits)] + ([""] if has_pt else []))
  if has_pt:
    rows.append(["**ARG**"] + blank + [""] + [_signed_pct(summary["arg"], digits)])
  title = (
    f"# {method_display_name(summary['method'])} on {summary['setting']}\n\nTest scores x100 over "
    f"seeds; std is the population std (ddof={summary.get('std_ddof', STD_DDOF)})."
  )
  if has_pt:
    title += " vs PT: (m - PT) / PT of the task means; ARG: their mean over tasks."
  notes = _nan_notes(summary)
  return (
    title
    + "\n\n"
    + _markdown(header, rows)
    + ("\n" + "\n".join(f"- {n}" for n in notes) + "\n" if notes else "")
  )


def setting_table_csv(summary: Mapping[str, Any]) -> str:
  """CSV of one method on one setting, raw scores (not x100), full precision; 'average'/'ARG' rows last."""
  seeds = sorted({seed for t in summary["tasks"].values() for seed in t["seeds"]})
  gains = summary.get("relative_gain", {})
  header = (
    ["task", "metric"]
    + [f"seed_{s}" for s in seeds]
    + ["mean", "std", "n_seeds", "n_nan", "relative_gain_vs_pt"]
  )
  rows = []
  for task, t in summary["tasks"].items():
    by_seed = dict(zip(t["seeds"], t["test_scores"]))
    rows.append(
      [task, t.get("metric") or ""]
      + [_num(by_seed[s]) if s in by_seed else "" for s in seeds]
      + [
        _num(t["mean"]),
        _num(t["std"]),
        t["n_seeds"],
        t["n_nan"],
        _num(gains[task]) if task in gains else "",
      ]
    )
  blank = [""] * len(seeds)
  rows.append(["average", ""] + blank + [_num(summary["average"]), "", "", "", ""])
  if "arg" in summary:
    rows.append(["ARG", ""] + blank + ["", "", "", "", _num(summary["arg"])])
  return _csv(header, rows)


def plot_bars(
  tasks: Sequence[str],
  series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
  path: str | os.PathLike,
  title: str = "",
) -> str:
  """Grouped bar chart (x100): one group per task, one bar per series with a std error bar; PNG."""
  # The object-oriented API with the Agg canvas: no pyplot global state, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  n_series = max(len(series), 1)
  width = 0.8 / n_series
  figure = Figure(figsize=(max(6.0, 0.35 * len(tasks) * (n_series + 1)), 4.5))
  FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  x = np.arange(len(tasks))
  for i, (name, (means, stds)) in enumerate(series.items()):
    means = 100 * np.asarray([_num(m) for m in means], dtype=float)
    stds = 100 * np.asarray([_num(s) for s in stds], dtype=float)
    offsets = x - 0.4 + width * (i + 0.5)
    axes.bar(offsets, np.nan_to_num(means), width, yerr=np.nan_to_num(stds), capsize=2, label=name)
    for offset, mean in zip(offsets, means):
      if not math.isfinite(mean):  # Say so on the plot rather than draw a silent zero.
        axes.text(offset, 0, "NaN", rotation=90, ha="center", va="bottom", fontsize=7)
  axes.set_xticks(x)
  axes.set_xticklabels(tasks, rotation=45, ha="right", fontsize=8)
  axes.set_ylabel("test score x100 (mean ± std over seeds)")
  axes.set_title(title)
  axes.legend(fontsize=8)
  figure.tight_layout()
  path = os.fspath(path)
  paths.write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=120))
  return path


def plot_dev_curves(
  dev_curve: Mapping[str, Any], task_summary: Mapping[str, Any], path: str | os.PathLike
) -> str:
  """The dev curves of a target's grid (dev_curve.json: its runs' names, seeds and learning rates, and
  each evaluation's scores), one panel per seed, one line per learning rate, each run's best dev score
  marked (o) and the seed's chosen run's, the one tested, starred; PNG."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  names = dev_curve["runs"]
  seeds, lrs = dev_curve["seeds"], dev_curve["learning_rates"]
  steps = np.asarray([step for step, _ in dev_curve["curve"]], float)
  scores = np.asarray([[_num(x) for x in row] for _, row in dev_curve["curve"]], float).reshape(
    len(steps), len(names)
  )
  chosen = {int(r["seed"]): r for r in task_summary.get("runs", []) if r.get("best_lr") is not None}
  panels = sorted(set(seeds))
  figure = Figure(figsize=(3.2 * len(panels) + 0.8, 3.4))
  FigureCanvasAgg(figure)
  colors = {lr: f"C{i}" for i, lr in enumerate(sorted(set(lrs), reverse=True))}
  for p, seed in enumerate(panels):
    axes = figure.add_subplot(1, len(panels), p + 1)
    for r in (r for r in range(len(names)) if seeds[r] == seed):
      lr, color = lrs[r], colors[lrs[r]]
      axes.plot(steps, 100 * scores[:, r], color=color, marker=".", markersize=3, label=f"lr {lr:g}")
      if np.isfinite(scores[:, r]).any():
        best = int(np.nanargmax(scores[:, r]))  # the first of equal scores, as the selection keeps it
        axes.plot(steps[best], 100 * scores[best, r], "o", color=color, fillstyle="none", markersize=8)
    pick = chosen.get(int(seed))
    if pick is not None and pick.get("dev_score") is not None:
      axes.plot(pick["best_step"], 100 * pick["dev_score"], "*", color="black", markersize=13, label="chosen")
    axes.set_title(f"seed {seed}", fontsize=9)
    axes.set_xlabel("step", fontsize=8)
    if p == 0:
      axes.set_ylabel("dev score x100", fontsize=8)
    axes.tick_params(labelsize=7)
    axes.legend(fontsize=7)
  figure.suptitle(f"{task_summary.get('task', '')}: dev curves of the grid (o best, * chosen)", fontsize=9)
  figure.tight_layout()
  path = os.fspath(path)
  paths.write_atomic(path, lambda f: figure.savefig(f, format="png", dpi=100))
  return path


def write_setting_results(
  summary: Mapping[str, Any], out_dir: str | os.PathLike, digits: int = 1
) -> dict[str, str]:
  """results.json, results.md, results.csv and results.png of one method on one setting."""
  out_dir = os.fspath(out_dir)
  paths.makedirs(out_dir)
  files = {ext: paths.join(out_dir, f"results.{ext}") for ext in ("json", "md", "csv", "png")}
  _write_json(files["json"], summary)
  _write_atomic(files["md"], setting_table_markdown(summary, digits))
  _write_atomic(files["csv"], setting_table_csv(summary))
  tasks = list(summary["tasks"])
  plot_bars(
    tasks + ["average"],
    {
      method_display_name(summary["method"]): (
        [summary["tasks"][t]["mean"] for t in tasks] + [summary["average"]],
        [summary["tasks"][t]["std"] for t in tasks] + [0.0],
      )
    },
    files["png"],
    title=f"{method_display_name(summary['method'])} on {summary['setting']}",
  )
  return files


# ---------------------------------------------------------------------------------------------------
# The study's comparison table: one setting, methods as columns (PT, MTL, MAML, FoMAML, Reptile).
# ---------------------------------------------------------------------------------------------------
BOOTSTRAP_RESAMPLES = 10_000


def _seed_scores(task_summary: Mapping[str, Any]) -> dict[int, float]:
  return {
    int(seed): _num(score)
    for seed, score in zip(task_summary.get("seeds", ()), task_summary.get("test_scores", ()))
  }


def paired_comparison(
  method_summary: Mapping[str, Any],
  pt_summary: Mapping[str, Any],
  *,
  resamples: int = BOOTSTRAP_RESAMPLES,
  seed: int = 0,
) -> dict[str, Any]:
  """A method against PT over the (task, seed) pairs both have a finite test score for.

  -> {"n_pairs", "mean_difference" (method - PT, in score units), "wins", "ties", "losses",
  "wilcoxon_p" (two-sided signed-rank test; tied pairs dropped as Wilcoxon did, 1.0 when every pair
  ties), "bootstrap_ci95" (percentile interval of the mean difference over `resamples` resamplings of
  the pairs, fixed seed)}. Seeds pair up because a method and PT see the same few-shot files per seed.
  """
  differences = []
  for task, summary in method_summary["tasks"].items():
    pt_task = pt_summary["tasks"].get(task)
    if pt_task is None:
      continue
    pt_scores = _seed_scores(pt_task)
    for seed_, score in _seed_scores(summary).items():
      if seed_ in pt_scores and math.isfinite(score) and math.isfinite(pt_scores[seed_]):
        differences.append(score - pt_scores[seed_])
  d = np.asarray(differences, np.float64)
  result: dict[str, Any] = {
    "n_pairs": int(d.size),
    "wins": int((d > 0).sum()),
    "ties": int((d == 0).sum()),
    "losses": int((d < 0).sum()),
  }
  if d.size == 0:
    return {
      **result,
      "mean_difference": float("nan"),
      "wilcoxon_p": float("nan"),
      "bootstrap_ci95": [float("nan"), float("nan")],
    }
  from scipy import stats  # deferred: only the comparison needs it

  nonzero = d[d != 0]
  p_value = 1.0 if nonzero.size == 0 else float(stats.wilcoxon(nonzero).pvalue)
  rng = np.random.default_rng(seed)
  means = d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1)
  low, high = np.percentile(means, [2.5, 97.5])
  return {
    **result,
    "mean_difference": float(d.mean()),
    "wilcoxon_p": p_value,
    "bootstrap_ci95": [float(low), float(high)],
  }


def compare_methods(
  summaries: Iterable[Mapping[str, Any] | str | os.PathLike],
  nan_policy: str = "omit",
  baselines: Mapping[str, Mapping[str, float]] | None = None,
) -> dict[str, Any]:
  """Setting summaries (or their results.json paths) of several methods -> the comparison table.

  ARG of each method is recomputed against the PT summary among them (if any), else taken from the
  method's own summary (computed against the PT file it was given), else absent. With PT among them,
  "paired" holds each other method's `paired_comparison` against it. `baselines` ({task: {"constant":
  x, "random": y}}, see mpt_jax.baselines) are stored and shown beside the methods.
  """
  _check_nan_policy(nan_policy)
  loaded = [load_results(s) if isinstance(s, (str, os.PathLike)) else s for s in summaries]
  if not loaded:
    raise ValueError("compare_methods: no summaries given")
  by_method: dict[str, Mapping[str, Any]] = {}
  for summary in loaded:
    if "method" not in summary or "tasks" not in summary:
      raise ValueError(
        "compare_methods: each summary must be a setting summary (keys 'method', "
        f"'setting', 'tasks'), got keys {sorted(summary)}"
      )
    method = str(summary["method"])
    if any(_method_key(m) == _method_key(method) for m in by_method):
      raise ValueError(f"compare_methods: method {method!r} given twice")
    by_method[method] = summary
  settings = sorted({str(s.get("setting")) for s in by_method.values()})
  if len(settings) > 1:
    raise ValueError(
      f"compare_methods: summaries of different settings {settings}; compare one setting at a time"
    )
  methods = sorted(by_method, key=_method_sort_key)
  tasks: list[str] = []
  for method in methods:
    tasks += [task for task in by_method[method]["tasks"] if task not in tasks]
  pt = next((m for m in methods if _method_key(m) == "pt"), None)
  pt_means = {task: _num(t["mean"]) for task, t in by_method[pt]["tasks"].items()} if pt is not None else None
  cells, average, n_tasks, arg = {}, {}, {}, {}
  for method in methods:
    summary = by_method[method]
    cells[method] = {
      task: {
        "mean": _num(t["mean"]),
        "std": _num(t["std"]),
        "n_nan": t.get("n_nan", 0),
        "n_seeds": t.get("n_seeds"),
      }
      for task, t in summary["tasks"].items()
    }
    means = {task: cell["mean"] for task, cell in cells[method].items()}
    average[method] = _mean(list(means.values()), nan_policy)
    n_tasks[method] = len(means)
    if pt_means is not None and method != pt:
      arg[method] = _mean(list(relative_gains(means, pt_means).values()), nan_policy)
    elif pt_means is None and "arg" in summary:
      arg[method] = _num(summary["arg"])
  paired = (
    {m: paired_comparison(by_method[m], by_method[pt]) for m in methods if m != pt} if pt is not None else {}
  )
  comparison = {
    "setting": settings[0],
    "methods": methods,
    "tasks": tasks,
    "cells": cells,
    "average": average,
    "n_tasks": n_tasks,
    "arg": arg,
    "arg_baseline": "pt column" if pt_means is not None else "each method's own PT file",
    "paired": paired,
    "std_ddof": STD_DDOF,
    "nan_policy": nan_policy,
  }
  if baselines is not None:
    missing = [task for task in tasks if task not in baselines]
    if missing:
      raise ValueError(f"compare_methods: baselines lack tasks {missing}")
    comparison["baselines"] = {task: {k: float(v) for k, v in baselines[task].items()} for task in tasks}
    comparison["baseline_average"] = {
      k: _mean([comparison["baselines"][t][k] for t in tasks], nan_policy) for k in ("constant", "random")
    }
  return comparison


def comparison_table_markdown(
  comparison: Mapping[str, Any], digits: int = 1, run_dirs: Mapping[str, str] | None = None
) -> str:
  """The table as markdown. run_dirs: {method: its workdir, relative to where the table is written}: each
  of its cells links to the task's grid (`<dir>/downstream/<task>/`: dev curves, prompts, predictions)."""
  run_dirs = run_dirs or {}

  def cell(m: str, task: str) -> str:
    text = _mean_std_cell(comparison["cells"][m][task], digits)
    if m not in run_dirs:
      return text
    return f"[{text}]({run_dirs[m]}/{DOWNSTREAM_DIR}/{task}/{DEV_CURVES_PLOT})"

  methods = comparison["methods"]
  baselines = comparison.get("baselines")
  chance = ("constant", "random") if baselines else ()
  header = (
    ["task"]
    + [f"{kind} answer" if kind == "constant" else "random guess" for kind in chance]
    + [method_display_name(m) for m in methods]
  )
  rows = []
  for task in comparison["tasks"]:
    rows.append(
      [task]
      + [_pct(baselines[task][kind], digits) for kind in chance]
      + [cell(m, task) if task in comparison["cells"][m] else "—" for m in methods]
    )
  all_tasks = len(comparison["tasks"])
  rows.append(
    ["**Average**"]
    + [_pct(comparison["baseline_average"][kind], digits) for kind in chance]
    + [
      _pct(comparison["average"][m], digits)
      + ("" if comparison["n_tasks"][m] == all_tasks else f" ({comparison['n_tasks'][m]} tasks)")
      for m in methods
    ]
  )
  rows.append(
    ["**ARG**"]
    + [""] * len(chance)
    + [_signed_pct(comparison["arg"][m], digits) if m in comparison["arg"] else "—" for m in methods]
  )
  text = (
    f"# {comparison['setting']}: test scores x100, mean ± std over seeds (population std)\n\n"
    "ARG: mean over tasks of (m - PT) / PT.\n\n" + _markdown(header, rows)
  )
  if run_dirs:
    text += (
      "\nEach cell links to the plot of its grid's dev curves; the grid's directory holds its runs' "
      "prompts, curves (dev_curve.json, logs/runs/ for TensorBoard) and predictions (predictions.jsonl).\n"
    )
  if baselines:
    text += (
      "\nconstant answer: the train file's most frequent answer for every test example; random "
      "guess: a uniformly random train answer per example (expected score). Both per seed, "
      "averaged.\n"
    )
  paired = comparison.get("paired") or {}
  if paired:
    text += (
      "\nPaired against PT over (task, seed) pairs (difference x100; Wilcoxon signed-rank, ties "
      "dropped; bootstrap 95% CI of the mean difference):\n\n"
    )
    rows = [
      [
        method_display_name(m),
        str(p["n_pairs"]),
        f"{p['wins']}/{p['ties']}/{p['losses']}",
        _signed_points(p["mean_difference"], digits),
        f"[{_signed_points(p['bootstrap_ci95'][0], digits)}, "
        f"{_signed_points(p['bootstrap_ci95'][1], digits)}]",
        "—" if not math.isfinite(p["wilcoxon_p"]) else f"{p['wilcoxon_p']:.3g}",
      ]
      for m, p in paired.items()
    ]
    text += _markdown(
      ["method", "pairs", "wins/ties/losses", "mean difference", "95% CI", "Wilcoxon p"], rows
    )
  if any(c.get("n_nan") for m in methods for c in comparison["cells"][m].values()):
    text += "\n- (k/n NaN): k of the n seeds scored NaN" + (
      "; mean and std are over the other seeds.\n"
      if comparison["nan_policy"] == "omit"
      else "; the mean is NaN.\n"
    )
  return text


def comparison_table_csv(comparison: Mapping[str, Any]) -> str:
  methods = comparison["methods"]
  header = ["task"] + [f"{method_display_name(m)}_{stat}" for m in methods for stat in ("mean", "std")]
  rows = []
  for task in comparison["tasks"]:
    row = [task]
    for m in methods:
      cell = comparison["cells"][m].get(task)
      row += [cell["mean"], cell["std"]] if cell else ["", ""]
    rows.append(row)
  rows.append(["average"] + [v for m in methods for v in (comparison["average"][m], "")])
  rows.append(["ARG"] + [v for m in methods for v in (comparison["arg"].get(m, ""), "")])
  return _csv(header, rows)


def write_comparison(
  comparison: Mapping[str, Any],
  out_dir: str | os.PathLike,
  name: str | None = None,
  digits: int = 1,
  run_dirs: Mapping[str, str] | None = None,
) -> dict[str, str]:
  """<name>.json/.md/.csv/.png of a comparison table (name defaults to the setting); run_dirs: see
  `comparison_table_markdown`."""
  out_dir = os.fspath(out_dir)
  paths.makedirs(out_dir)
  name = name or f"comparison_{comparison['setting']}"
  files = {ext: paths.join(out_dir, f"{name}.{ext}") for ext in ("json", "md", "csv", "png")}
  _write_json(files["json"], comparison)
  _write_atomic(files["md"], comparison_table_markdown(comparison, digits, run_dirs))
  _write_atomic(files["csv"], comparison_table_csv(comparison))
  tasks = comparison["tasks"]
  nan_cell = {"mean": float("nan"), "std": float("nan")}
  series = {}
  for m in comparison["methods"]:
    cells = [comparison["cells"][m].get(t, nan_cell) for t in tasks]
    series[method_display_name(m)] = (
      [c["mean"] for c in cells] + [comparison["average"][m]],
      [c["std"] for c in cells] + [0.0],
    )
  plot_bars(tasks + ["average"], series, files["png"], title=str(comparison["setting"]))
  return files


# ---------------------------------------------------------------------------------------------------
# A reproducible record of the run, beside its results.
# ---------------------------------------------------------------------------------------------------
def _config_dict(config: Any) -> Any:
  if hasattr(config, "to_dict"):  # ml_collections.ConfigDict / FrozenConfigDict
    config = config.to_dict()
  elif dataclasses.is_dataclass(config) and not isinstance(config, type):
    config = dataclasses.asdict(config)
  return _jsonable(config)


def _package_versions() -> dict[str, str | None]:
  from importlib import metadata  # pylint: disable=g-import-not-at-top

  versions: dict[str, str | None] = {"python": platform.python_version()}
  for name in RECORDED_PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def _git(args: Sequence[str], cwd: str) -> str | None:
  try:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10, check=True)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip()


def _git_state() -> dict[str, Any]:
  """Commit of the mpt_jax source checkout, and whether tracked files differ from it."""
  source_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  commit = _git(["rev-parse", "HEAD"], source_dir)
  if not commit:
    return {"commit": "unknown", "dirty": None}
  status = _git(["status", "--porcelain", "--untracked-files=no"], source_dir)
  return {"commit": commit, "dirty": None if status is None else bool(status)}


def _devices() -> dict[str, Any]:
  try:
    import jax  # pylint: disable=g-import-not-at-top

    devices = jax.devices()
    return {
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "count": len(devices),
      "devices": [
        {
          "id": d.id,
          "platform": d.platform,
          "device_kind": d.device_kind,
          "process_index": d.process_index,
          "repr": str(d),
        }
        for d in devices
      ],
    }
  except Exception as e:  # pylint: disable=broad-except  # A record must not fail the run.
    return {"error": f"{type(e).__name__}: {e}"}


def run_record(
  config: Any, workdir: str | os.PathLike, model: dict[str, Any] | None = None
) -> dict[str, Any]:
  """Record config, versions, git commit, devices, host, time and command line in workdir; `model`: what
  the model resolved to (`pipeline.model_record`: its hub commit, or null for a directory).

  <workdir>/run_record.json holds a list with one record per invocation, oldest first: a resumed run
  appends instead of overwriting the original record. Only process 0 writes (multi-host). Returns the
  new record.
  """
  record = {
    "time_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    "hostname": socket.gethostname(),
    "command_line": list(sys.argv),
    "executable": sys.executable,
    "cwd": os.getcwd(),
    "config": _config_dict(config),
    "packages": _package_versions(),
    "git": _git_state(),
    "devices": _devices(),
  }
  if model is not None:
    record["model"] = model
  if record["devices"].get("process_index", 0) != 0:
    return record
  workdir = os.fspath(workdir)
  paths.makedirs(workdir)
  path = paths.join(workdir, RUN_RECORD_FILE)
  history = []
  if paths.exists(path):
    try:
      history = json.loads(paths.read_text(path))
    except json.JSONDecodeError:
      history = None
    if not isinstance(history, list):  # Unreadable: keep it aside rather than lose or crash.
      paths.move(path, path + ".unreadable")
      history = []
  _write_json(path, history + [record])
  return record


# ---------------------------------------------------------------------------------------------------
# Command line.
# ---------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  parser = argparse.ArgumentParser(
    prog="python -m mpt_jax.results",
    description="The study's comparison table of one setting from the methods' results.json files.",
  )
  parser.add_argument("results", nargs="+", help="setting results.json files (or their directories)")
  parser.add_argument("--out", required=True, help="output directory")
  parser.add_argument("--name", default=None, help="file name stem (default: comparison_<setting>)")
  parser.add_argument("--digits", type=int, default=1)
  parser.add_argument("--nan_policy", choices=NAN_POLICIES, default="omit")
  args = parser.parse_args(argv)
  files = write_comparison(compare_methods(args.results, args.nan_policy), args.out, args.name, args.digits)
  print(paths.read_text(files["md"]))
  return files


if __name__ == "__main__":
  main()
