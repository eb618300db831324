r"""Two methods compared example by example, from the predictions their grids saved (results.PREDICTIONS_FILE:
the dev and test predictions of each seed's tested prompt).

Per target task present in both: over the (seed, example) pairs of a split, the examples method A scores
higher than B on (wins), lower (losses) and the same (ties), each example scored alone by the task's metric
(`metrics.example_scores`); for a classification task (a fixed label set: rank classification's label
scores, or a classification metric), each method's label confusion (gold x prediction counts) and the
labels it predicts most, the way to see a method collapse to one label.

  python -m mpt_jax.analysis --compare runs/demo/pt runs/demo/maml --out=runs/demo/pt_vs_maml

A and B are run directories (their <dir>/downstream/<task>/predictions.jsonl) or task directories.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from mpt_jax import metrics
from mpt_jax.results import DOWNSTREAM_DIR, PREDICTIONS_FILE, RESULTS_FILE

SHOWN_EXAMPLES = 5  # wins and losses listed in the markdown, per task (the JSON has them all)


def load_predictions(directory: str) -> dict[str, tuple[list[dict], str | None]]:
  """{task: (its prediction records, its metric)} of a task directory, or of every task of a run's
  downstream/; the metric is the one its results.json names (None without one: the task's own)."""
  own = os.path.join(directory, PREDICTIONS_FILE)
  if os.path.exists(own):
    found = {os.path.basename(os.path.normpath(directory)): own}
  else:
    parent = os.path.join(directory, DOWNSTREAM_DIR)
    found = {
      task: os.path.join(parent, task, PREDICTIONS_FILE)
      for task in (sorted(os.listdir(parent)) if os.path.isdir(parent) else [])
      if os.path.exists(os.path.join(parent, task, PREDICTIONS_FILE))
    }
  if not found:
    raise FileNotFoundError(
      f"{directory}: no {PREDICTIONS_FILE} (neither here nor under downstream/<task>/); a finished "
      f"downstream grid writes one per target task (runs of before they were saved have none: rerun them)"
    )
  out = {}
  for task, path in found.items():
    with open(path, encoding="utf-8") as f:
      records = [json.loads(line) for line in f if line.strip()]
    results_path = os.path.join(os.path.dirname(path), RESULTS_FILE)
    metric = None
    if os.path.exists(results_path):
      with open(results_path, encoding="utf-8") as f:
        metric = json.load(f).get("metric")
    out[task] = (records, metric)
  return out


def _by_example(records: Sequence[dict], split: str) -> dict[tuple[int, int], dict]:
  return {(int(r["seed"]), int(r["index"])): r for r in records if r["split"] == split}


def _is_classification(records: Sequence[dict], metric: str) -> bool:
  return any("label_scores" in r for r in records) or metric in metrics.CLASSIFICATION_METRICS


def _confusion(records: Sequence[dict]) -> dict[str, dict[str, int]]:
  table: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
  for r in records:
    table[r["gold"][0] if r["gold"] else ""][r["prediction"].strip()] += 1
  return {gold: dict(sorted(row.items())) for gold, row in sorted(table.items())}


def compare_task(
  task: str, a: Sequence[dict], b: Sequence[dict], split: str = "test", metric: str | None = None
) -> dict[str, Any]:
  """The example-by-example comparison of A's and B's records of one task on `split`, scored by
  `metric` (None: the task's, from the known gyms)."""
  if metric is None:
    from mpt_jax.data.settings import metric_for_task

    metric = metric_for_task(task)
  a_examples, b_examples = _by_example(a, split), _by_example(b, split)
  if not a_examples or not b_examples:
    raise ValueError(f"{task}: no {split} predictions in {'A' if not a_examples else 'B'}")
  if set(a_examples) != set(b_examples):
    raise ValueError(
      f"{task}: A and B predicted different {split} examples ((seed, index) pairs: "
      f"{len(a_examples)} vs {len(b_examples)}); compare runs of the same seeds and data"
    )
  keys = sorted(a_examples)
  for key in keys:
    if a_examples[key]["gold"] != b_examples[key]["gold"]:
      raise ValueError(
        f"{task}: seed {key[0]} example {key[1]} has gold {a_examples[key]['gold']} in A, "
        f"{b_examples[key]['gold']} in B; these are not the same {split} files"
      )
  golds = [a_examples[k]["gold"] for k in keys]
  a_scores = metrics.example_scores(task, [a_examples[k]["prediction"] for k in keys], golds, metric)
  b_scores = metrics.example_scores(task, [b_examples[k]["prediction"] for k in keys], golds, metric)
  outcome = {"wins": [], "losses": [], "ties": []}
  for key, sa, sb in zip(keys, a_scores, b_scores):
    outcome["wins" if sa > sb else "losses" if sa < sb else "ties"].append(key)

  def shown(key) -> dict:
    ra, rb = a_examples[key], b_examples[key]
    return {
      "seed": key[0],
      "index": key[1],
      "input": ra["input"],
      "gold": ra["gold"],
      "a": ra["prediction"],
      "b": rb["prediction"],
    }

  report = {
    "task": task,
    "split": split,
    "metric": metric,
    "n": len(keys),
    "seeds": sorted({k[0] for k in keys}),
    "a_mean_example_score": sum(a_scores) / len(keys),
    "b_mean_example_score": sum(b_scores) / len(keys),
    **{name: len(found) for name, found in outcome.items()},
    "win_examples": [shown(k) for k in outcome["wins"]],
    "loss_examples": [shown(k) for k in outcome["losses"]],
  }
  if _is_classification(list(a) + list(b), metric):
    for side, examples in (("a", a_examples), ("b", b_examples)):
      records = [examples[k] for k in keys]
      report[f"{side}_confusion"] = _confusion(records)
      report[f"{side}_predicted"] = dict(
        collections.Counter(r["prediction"].strip() for r in records).most_common()
      )
  return report


def compare(a_dir: str, b_dir: str, split: str = "test") -> dict[str, Any]:
  """Every target task that both A and B have predictions of, compared (`compare_task`)."""
  a, b = load_predictions(a_dir), load_predictions(b_dir)
  tasks = [t for t in a if t in b]
  if not tasks:
    raise ValueError(f"{a_dir} and {b_dir} have no target task in common (A: {sorted(a)}, B: {sorted(b)})")
  return {
    "a": a_dir,
    "b": b_dir,
    "split": split,
    "only_in_a": sorted(set(a) - set(b)),
    "only_in_b": sorted(set(b) - set(a)),
    "tasks": {t: compare_task(t, a[t][0], b[t][0], split, _one_metric(t, a[t][1], b[t][1])) for t in tasks},
  }


def _one_metric(task: str, a: str | None, b: str | None) -> str | None:
  if a is not None and b is not None and a != b:
    raise ValueError(f"{task}: A's results are scored by {a}, B's by {b}; compare runs of one metric")
  return a if a is not None else b


def markdown(report: Mapping[str, Any]) -> str:
  lines = [
    f"# Per-example comparison on {report['split']}: A = {report['a']}, B = {report['b']}",
    "",
    "Each (seed, example) scored alone by the task's metric (for a corpus-level metric, Classification-F1, "
    "Matthew-Correlation or Pearson-Correlation, whether it is its first gold: the means are then "
    "accuracies, not the metric); wins: A higher than B.",
    "",
    "| task | metric | examples | A mean | B mean | A wins | B wins | ties |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for task, t in report["tasks"].items():
    lines.append(
      f"| {task} | {t['metric']} | {t['n']} | {100 * t['a_mean_example_score']:.1f} | "
      f"{100 * t['b_mean_example_score']:.1f} | {t['wins']} | {t['losses']} | {t['ties']} |"
    )
  for task, t in report["tasks"].items():
    lines += ["", f"## {task}"]
    for side in ("a", "b"):
      if f"{side}_confusion" in t:
        labels = sorted(
          {p for row in t[f"{side}_confusion"].values() for p in row} | set(t[f"{side}_confusion"])
        )
        lines += [
          "",
          f"{side.upper()}'s label confusion (rows: gold, columns: prediction); predicted most: "
          + ", ".join(f"{label!r} x{n}" for label, n in list(t[f"{side}_predicted"].items())[:3]),
          "",
          "| gold | " + " | ".join(labels) + " |",
          "|---|" + "---|" * len(labels),
        ]
        for gold, row in t[f"{side}_confusion"].items():
          lines.append(f"| {gold} | " + " | ".join(str(row.get(label, 0)) for label in labels) + " |")
    for name, examples in (("A wins", t["win_examples"]), ("B wins", t["loss_examples"])):
      if examples:
        lines += ["", f"{name} (first {min(len(examples), SHOWN_EXAMPLES)} of {len(examples)}):", ""]
        lines += [
          f"- seed {e['seed']} #{e['index']}: {e['input']!r} gold {e['gold']} A {e['a']!r} B {e['b']!r}"
          for e in examples[:SHOWN_EXAMPLES]
        ]
  return "\n".join(lines) + "\n"


def write_report(report: Mapping[str, Any], out_dir: str) -> dict[str, str]:
  os.makedirs(out_dir, exist_ok=True)
  files = {ext: os.path.join(out_dir, f"prediction_comparison.{ext}") for ext in ("json", "md")}
  with open(files["json"], "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1)
  with open(files["md"], "w", encoding="utf-8") as f:
    f.write(markdown(report))
  return files
