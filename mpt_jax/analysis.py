r"""Task similarity vs the gain of an initialization over PT: the study's analysis "from the perspective
of task similarity", on any finished study (CrossFit or an offline gym).

A task's embedding is built from its prompt-tuned prompts (as in SPoT, Vu et al. 2022): per seed, the
prompt of the seed's best-dev learning rate, reduced to one vector by averaging its rows; then the mean
over seeds. Two kinds:
  "mean"   the mean prompt vector itself (SPoT's task embedding);
  "delta"  the mean of (tuned prompt - the prompt it started from): what training on the task added,
           free of the initialization (PT starts each task from its own name, which would otherwise make
           tasks with similar names look similar whatever they ask).
Target tasks get theirs from PT's downstream runs (`<study>/pt/downstream/<task>/prompts/`), source tasks
from PT runs on the sources (`<study>/pt/sources/<task>/`, made by `--config.downstream.prompt_tune_sources`
or `run_setting.py --set downstream.prompt_tune_sources=True --methods=pt`).

Per target: the cosine similarity of its embedding to each source's, summarized as the max and the
mean over the setting's sources. Per method: the relative gain over PT of each target, (m - PT) / PT of
the per-task means (the study's ARG terms), and the Spearman rank correlation (with its p-value) between
similarity and gain over the (setting, target) points of every study directory given.

  python -m mpt_jax.analysis --out=runs/mini_study/analysis runs/mini_study/wn_cls2cls runs/mini_study/wn_nocls2cls

`--compare A B` compares two runs example by example instead (mpt_jax/prediction_analysis.py).

An analysis can also pool the points of an earlier one (`--points_from=<its similarity_analysis.json>`),
for settings whose run directories are no longer at hand: their similarities and gains are read from that
JSON as it was written, and the correlations are computed over every point. A (setting, target) point
present twice is refused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

EMBEDDINGS = ("mean", "delta")
SUMMARIES = ("max", "mean")  # of a target's similarities to the setting's sources


# --- task embeddings -------------------------------------------------------------------------------------


def _load_npy(path: str) -> np.ndarray:
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path}: missing; the analysis needs each run's saved prompts (a finished "
      f"downstream grid writes them under <task>/prompts/)"
    )
  return np.load(path)


def task_embedding(task_dir: str, kind: str = "mean") -> np.ndarray:
  """The task's embedding [d_model] from the best-dev prompt of each seed in task_dir/results.json."""
  if kind not in EMBEDDINGS:
    raise ValueError(f"embedding kind {kind!r}: expected one of {EMBEDDINGS}")
  results_path = os.path.join(task_dir, "results.json")
  if not os.path.exists(results_path):
    raise FileNotFoundError(f"{results_path}: missing; prompt-tune this task first")
  with open(results_path, encoding="utf-8") as f:
    runs = json.load(f)["runs"]
  vectors = []
  for run in runs:
    name = f"seed{int(run['seed'])}_lr{float(run['best_lr']):g}"  # adapt.Run.name
    prompt = _load_npy(os.path.join(task_dir, "prompts", f"{name}.npy")).astype(np.float64)
    if kind == "delta":
      prompt = prompt - _load_npy(os.path.join(task_dir, "prompts", f"init_seed{int(run['seed'])}.npy"))
    vectors.append(prompt.mean(axis=0))
  return np.mean(vectors, axis=0)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
  norm = float(np.linalg.norm(a) * np.linalg.norm(b))
  return float(np.dot(a, b) / norm) if norm > 0 else float("nan")


def _task_dirs(parent: str) -> list[str]:
  if not os.path.isdir(parent):
    return []
  return sorted(t for t in os.listdir(parent) if os.path.exists(os.path.join(parent, t, "results.json")))


# --- one study directory (one setting) -------------------------------------------------------------------


def load_comparison(study_dir: str) -> dict[str, Any]:
  files = sorted(f for f in os.listdir(study_dir) if f.startswith("comparison_") and f.endswith(".json"))
  if len(files) != 1:
    raise FileNotFoundError(
      f"{study_dir}: expected one comparison_<setting>.json (written by "
      f"experiments/run_setting.py), found {files}"
    )
  with open(os.path.join(study_dir, files[0]), encoding="utf-8") as f:
    return json.load(f)


def relative_gains(comparison: Mapping[str, Any]) -> dict[str, dict[str, float]]:
  """{method: {target: (method mean - PT mean) / PT mean}} for every method but PT."""
  cells = comparison["cells"]
  if "pt" not in cells:
    raise ValueError(f"setting {comparison.get('setting')!r}: no PT column to compute gains against")
  gains = {}
  for method, by_task in cells.items():
    if method == "pt":
      continue
    gains[method] = {}
    for task, cell in by_task.items():
      pt = cells["pt"].get(task, {}).get("mean")
      m = cell.get("mean")
      ok = pt is not None and m is not None and math.isfinite(pt) and math.isfinite(m) and pt != 0
      gains[method][task] = (m - pt) / pt if ok else float("nan")
  return gains


def setting_similarities(study_dir: str, kind: str = "mean") -> dict[str, dict[str, Any]]:
  """{target: {"max", "mean", "sources": {source: cosine}}} of one study directory."""
  pt_dir = os.path.join(study_dir, "pt")
  sources = _task_dirs(os.path.join(pt_dir, "sources"))
  if not sources:
    raise FileNotFoundError(
      f"{pt_dir}/sources: no prompt-tuned source tasks; rerun PT with "
      f"--config.downstream.prompt_tune_sources=True"
    )
  source_emb = {s: task_embedding(os.path.join(pt_dir, "sources", s), kind) for s in sources}
  out = {}
  for target in _task_dirs(os.path.join(pt_dir, "downstream")):
    emb = task_embedding(os.path.join(pt_dir, "downstream", target), kind)
    sims = {s: cosine(emb, e) for s, e in source_emb.items()}
    out[target] = {"max": max(sims.values()), "mean": float(np.mean(list(sims.values()))), "sources": sims}
  return out


# --- the analysis over several settings ------------------------------------------------------------------


def spearman(x: Sequence[float], y: Sequence[float]) -> dict[str, Any]:
  """Spearman's rho and its two-sided p-value over the pairs where both are finite."""
  pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
  if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
    return {"rho": float("nan"), "p": float("nan"), "n": len(pairs)}
  from scipy import stats

  result = stats.spearmanr([a for a, _ in pairs], [b for _, b in pairs])
  return {"rho": float(result.statistic), "p": float(result.pvalue), "n": len(pairs)}


def load_points(analysis_json: str) -> tuple[list[str], list[dict[str, Any]]]:
  """(study_dirs, points) of an analysis written earlier by `write_report`."""
  with open(analysis_json, encoding="utf-8") as f:
    earlier = json.load(f)
  if not isinstance(earlier, dict) or not isinstance(earlier.get("points"), list):
    raise ValueError(
      f"{analysis_json}: not a similarity analysis (expected the similarity_analysis.json that "
      f"`python -m mpt_jax.analysis --out=DIR` writes, with a 'points' list)"
    )
  for point in earlier["points"]:
    missing = [key for key in ("setting", "target", "similarity", "gain") if key not in point]
    if missing:
      raise ValueError(f"{analysis_json}: a point lacks {missing}: {str(point)[:120]}")
  return list(earlier.get("study_dirs", [])), earlier["points"]


def analyze(study_dirs: Sequence[str], points_from: Sequence[str] = ()) -> dict[str, Any]:
  """Points (setting, target, similarity of each kind and summary, gain of each method) of every study
  directory, plus those of the earlier analyses `points_from` (their similarity_analysis.json), and the
  Spearman correlation of each (method, embedding kind, summary) over all points."""
  points, sources = [], []
  for analysis_json in points_from:
    dirs, earlier = load_points(analysis_json)
    points += earlier
    sources += [f"{d} (points from {analysis_json})" for d in dirs] or [analysis_json]
  for study_dir in study_dirs:
    comparison = load_comparison(study_dir)
    gains = relative_gains(comparison)
    sims = {kind: setting_similarities(study_dir, kind) for kind in EMBEDDINGS}
    for target in comparison["tasks"]:
      if target not in sims["mean"]:
        continue
      points.append(
        {
          "setting": comparison["setting"],
          "target": target,
          "similarity": {kind: {s: sims[kind][target][s] for s in SUMMARIES} for kind in EMBEDDINGS},
          "per_source": {kind: sims[kind][target]["sources"] for kind in EMBEDDINGS},
          "gain": {method: by_task.get(target, float("nan")) for method, by_task in gains.items()},
        }
      )
  seen = set()
  for p in points:
    key = (p["setting"], p["target"])
    if key in seen:
      raise ValueError(
        f"setting {key[0]!r}, target {key[1]!r} appears twice (a study directory and an earlier analysis, "
        f"or two earlier analyses): give each setting once"
      )
    seen.add(key)
  methods = sorted({m for p in points for m in p["gain"]})
  correlations = {
    method: {
      kind: {
        summary: spearman(
          [p["similarity"][kind][summary] for p in points],
          [p["gain"].get(method, float("nan")) for p in points],
        )
        for summary in SUMMARIES
      }
      for kind in EMBEDDINGS
    }
    for method in methods
  }
  return {
    "study_dirs": sources + list(study_dirs),
    "points": points,
    "methods": methods,
    "correlations": correlations,
  }


def markdown(analysis: Mapping[str, Any]) -> str:
  methods = analysis["methods"]
  lines = [
    "# Task similarity vs relative gain over PT",
    "",
    "Similarity: cosine between a target's task embedding and the sources' (max / mean over the "
    "setting's sources); embedding `mean` = mean prompt vector (SPoT), `delta` = mean change of the "
    "prompt during prompt tuning. Gain: (method - PT) / PT of the per-task means.",
    "",
    "| setting | target | sim max (mean) | sim mean (mean) | sim max (delta) | sim mean (delta) | "
    + " | ".join(f"gain {m}" for m in methods)
    + " |",
    "|---|---|---|---|---|---|" + "---|" * len(methods),
  ]
  for p in analysis["points"]:
    sim = p["similarity"]
    cells = [f"{sim[k][s]:.3f}" for k in EMBEDDINGS for s in SUMMARIES]
    gains = [
      f"{100 * p['gain'][m]:+.1f}%" if math.isfinite(p["gain"].get(m, float("nan"))) else "NaN"
      for m in methods
    ]
    lines.append(f"| {p['setting']} | {p['target']} | " + " | ".join(cells + gains) + " |")
  lines += [
    "",
    "Spearman rank correlation between similarity and gain (rho, two-sided p, points):",
    "",
    "| method | " + " | ".join(f"{k} / {s}" for k in EMBEDDINGS for s in SUMMARIES) + " |",
    "|---|" + "---|" * (len(EMBEDDINGS) * len(SUMMARIES)),
  ]
  for m in methods:
    cells = []
    for k in EMBEDDINGS:
      for s in SUMMARIES:
        c = analysis["correlations"][m][k][s]
        cells.append(
          "n/a" if not math.isfinite(c["rho"]) else f"{c['rho']:+.2f} (p={c['p']:.2g}, n={c['n']})"
        )
    lines.append(f"| {m} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(analysis: Mapping[str, Any], path: str, kind: str = "mean", summary: str = "max") -> None:
  """One scatter panel per method: the targets' similarity (x) against their gain over PT (y)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  methods = analysis["methods"]
  settings = sorted({p["setting"] for p in analysis["points"]})
  fig, axes = plt.subplots(
    1, max(len(methods), 1), figsize=(3.6 * max(len(methods), 1), 3.4), dpi=120, squeeze=False, sharey=True
  )
  for ax, method in zip(axes[0], methods):
    for i, setting in enumerate(settings):
      pts = [p for p in analysis["points"] if p["setting"] == setting]
      ax.scatter(
        [p["similarity"][kind][summary] for p in pts],
        [100 * p["gain"].get(method, float("nan")) for p in pts],
        color=f"C{i}",
        label=setting,
        s=22,
      )
    c = analysis["correlations"][method][kind][summary]
    rho = "n/a" if not math.isfinite(c["rho"]) else f"{c['rho']:+.2f}, p={c['p']:.2g}"
    ax.set_title(f"{method}: Spearman {rho}", fontsize=9)
    ax.axhline(0, color="gray", linewidth=0.8)
    ax.set_xlabel(f"similarity to sources ({kind}, {summary})", fontsize=8)
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel("gain over PT (%)")
  axes[0][-1].legend(fontsize=7, loc="best")
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def write_report(analysis: Mapping[str, Any], out_dir: str) -> dict[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  paths = {
    "json": os.path.join(out_dir, "similarity_analysis.json"),
    "md": os.path.join(out_dir, "similarity_analysis.md"),
    "png": os.path.join(out_dir, "similarity_analysis.png"),
  }
  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump(analysis, f, indent=1, allow_nan=True)
  with open(paths["md"], "w", encoding="utf-8") as f:
    f.write(markdown(analysis))
  plot(analysis, paths["png"])
  return paths


def as_options(argv: Sequence[str]) -> list[str]:
  """The run's override syntax, `--config.out=DIR`, read as the option `--out=DIR` (both are accepted)."""
  return ["--" + a[len("--config.") :] if a.startswith("--config.") else a for a in argv]


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  import sys

  parser = argparse.ArgumentParser(
    description=__doc__ + "\nOptions may be given as a run's overrides too: --config.out=DIR.",
    formatter_class=argparse.RawDescriptionHelpFormatter,
  )
  parser.add_argument("study_dirs", nargs="*", help="setting directories of experiments/run_setting.py")
  parser.add_argument("--out", required=True, help="where the report's .json, .md (and .png) go")
  parser.add_argument(
    "--points_from",
    action="append",
    default=[],
    help="similarity_analysis.json of an earlier analysis whose points to pool with these (repeatable)",
  )
  parser.add_argument(
    "--compare",
    nargs=2,
    metavar=("A", "B"),
    help="instead: compare two runs (or task directories) example by example from their saved "
    "predictions (mpt_jax/prediction_analysis.py): prediction_comparison.{json,md}",
  )
  parser.add_argument("--split", default="test", choices=("dev", "test"), help="--compare's split")
  args = parser.parse_args(as_options(sys.argv[1:] if argv is None else argv))
  if args.compare:
    if args.study_dirs or args.points_from:
      parser.error("--compare takes its two directories alone (no study directories, no --points_from)")
    from mpt_jax import prediction_analysis

    report = prediction_analysis.compare(*args.compare, split=args.split)
    paths = prediction_analysis.write_report(report, args.out)
  else:
    if not args.study_dirs and not args.points_from:
      parser.error("give at least one study directory or --points_from (or --compare A B)")
    paths = write_report(analyze(args.study_dirs, args.points_from), args.out)
  print(open(paths["md"], encoding="utf-8").read())
  return paths


if __name__ == "__main__":
  main()
