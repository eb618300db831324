"""Token lengths of a gym's (or CrossFit's) tasks, and what length bucketing makes of the study's batches.

    python -m benchmarks.length_stats                       # the WordNet and synthetic gyms (~2 min)
    python -m benchmarks.length_stats --gyms wordnet --settings wn_cls2cls --quick
    # real CrossFit data and the study's tokenizer, where they are available:
    python -m benchmarks.length_stats --data_dir /data/crossfit --model google/t5-large-lm-adapt \
        --settings cls2cls,qa2qa --out /tmp/crossfit_lengths

For each gym: the distribution of input and target lengths in tokens (every task, seed and split, inputs
with the study's " [task] " prefix and EOS). For each setting: the study's batches drawn by the real
samplers (MAML episodes of 2 tasks x (2 + 2) for the upstream steps; the downstream grid of 5 seeds x 4
learning rates x batch 16 for each target task; its dev evaluation batches), cut to length buckets, and
- the distinct (input, target) shapes a run meets, i.e. how many times each step compiles;
- the encoder and decoder positions computed, bucketed against padded to the maximum (512 / 64 or 128),
  the prompt's 100 positions included in the encoder's: the share of the work that bucketing removes.
Writes OUT/length_stats.{json,md} (default benchmarks/results/).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

from mpt_jax import gyms  # noqa: E402
from mpt_jax.config import SEEDS  # noqa: E402
from mpt_jax.data import batching, crossfit, settings as settings_lib  # noqa: E402
from mpt_jax.model.tokenizer import load_tokenizer  # noqa: E402

PROMPT_LENGTH = 100
MAX_INPUT = batching.MAX_INPUT_LENGTH
STUDY_GRID_LRS = 4  # x 5 seeds = 20 runs
PERCENTILES = (50, 90, 99, 100)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gyms", default="wordnet,synthetic", help="offline gyms to measure")
  parser.add_argument("--data_dir", default="", help="a CrossFit data directory instead of the gyms")
  parser.add_argument("--settings", default="", help="settings to simulate (default: all of the gym's)")
  parser.add_argument(
    "--model",
    default=str(REPO / "assets" / "small_t5"),
    help="checkpoint directory or hub id whose tokenizer counts the tokens",
  )
  parser.add_argument("--input_multiple", type=int, default=64)
  parser.add_argument("--target_multiple", type=int, default=16)
  parser.add_argument("--upstream_steps", type=int, default=5000, help="MAML episodes simulated")
  parser.add_argument("--downstream_steps", type=int, default=3000, help="grid steps per target task")
  parser.add_argument("--quick", action="store_true", help="500 upstream and 300 downstream steps")
  parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
  return parser.parse_args(argv)


def percentiles(values) -> dict[str, int]:
  values = np.asarray(values)
  return {f"p{p}": int(np.percentile(values, p, method="higher")) for p in PERCENTILES}


def gym_data(name: str, workdir: str):
  gyms.ensure(name)
  data_dir = gyms.data_dir(name, workdir)
  gym = settings_lib.gyms()[name]
  return data_dir, gym.settings, sorted(gym.metrics)


def tokenize_all(data_dir, tasks, tokenizer, target_length: int):
  spec = batching.TextSpec(MAX_INPUT, target_length)
  data = crossfit.read_crossfit(data_dir, tasks, SEEDS)
  return batching.tokenize_tasks(data, tokenizer, spec)


def length_table(tokenized) -> dict:
  inputs = np.concatenate([s.input_lengths for s in tokenized.values()])
  targets = np.concatenate([s.target_lengths for s in tokenized.values()])
  per_task = collections.defaultdict(list)
  for (task, _, _), split in tokenized.items():
    per_task[task].append(split.input_lengths)
  task_medians = {task: int(np.median(np.concatenate(v))) for task, v in per_task.items()}
  return dict(
    examples=int(inputs.size),
    input=percentiles(inputs),
    target=percentiles(targets),
    truncated_at_512=int(sum(s.num_truncated for s in tokenized.values())),
    task_median_input=dict(sorted(task_medians.items(), key=lambda kv: kv[1])),
  )


class ShapeTally:
  """Shapes met and positions computed by a stream of batches, bucketed against fully padded."""

  def __init__(self, prompt_length: int = PROMPT_LENGTH):
    self.prompt_length = prompt_length
    self.shapes = collections.Counter()
    self.encoder = [0, 0]  # bucketed, padded positions
    self.decoder = [0, 0]

  def add(self, batches, padded_lengths: tuple[int, int]) -> None:
    for batch in batches:
      rows = int(np.prod(batch["input_ids"].shape[:-1]))
      length_in, length_out = batch["input_ids"].shape[-1], batch["target_ids"].shape[-1]
      self.shapes[(length_in, length_out)] += 1
      self.encoder[0] += rows * (self.prompt_length + length_in)
      self.encoder[1] += rows * (self.prompt_length + padded_lengths[0])
      self.decoder[0] += rows * length_out
      self.decoder[1] += rows * padded_lengths[1]

  def summary(self) -> dict:
    return dict(
      shapes={f"{a}x{b}": n for (a, b), n in sorted(self.shapes.items())},
      distinct_shapes=len(self.shapes),
      encoder_fraction=self.encoder[0] / max(self.encoder[1], 1),
      decoder_fraction=self.decoder[0] / max(self.decoder[1], 1),
    )


def simulate_setting(setting, tokenized_up, tokenized_down, buckets, args) -> dict:
  up_steps = 500 if args.quick else args.upstream_steps
  down_steps = 300 if args.quick else args.downstream_steps
  out = dict(source=list(setting.source), target=list(setting.target))
  if all((t, s, n) in tokenized_up for t in setting.source for s in SEEDS for n in ("train", "dev")):
    tasks = batching.meta_tasks(tokenized_up, list(setting.source), SEEDS)
    sampler = batching.EpisodeSampler(tasks, 2, 1, 2, 2, seed=0, buckets=buckets)
    tally = ShapeTally()
    for step in range(up_steps):
      episode = sampler(step)
      tally.add(episode.values(), (MAX_INPUT, batching.UPSTREAM_TARGET_LENGTH))
    out["maml_upstream"] = dict(steps=up_steps, **tally.summary())
  grid, dev = ShapeTally(), ShapeTally()
  grid_shapes_per_task = {}
  for task in setting.target:
    runs = [s for s in SEEDS for _ in range(STUDY_GRID_LRS)]
    sampler = batching.GridSampler.create(
      {s: tokenized_down[(task, s, "train")] for s in SEEDS}, runs, 16, buckets=buckets
    )
    task_tally = ShapeTally()
    for step in range(down_steps):
      batch = sampler(step)
      task_tally.add([batch], (MAX_INPUT, batching.DOWNSTREAM_TARGET_LENGTH))
      grid.add([batch], (MAX_INPUT, batching.DOWNSTREAM_TARGET_LENGTH))
    grid_shapes_per_task[task] = sorted(f"{a}x{b}" for a, b in task_tally.shapes)
    dev_splits = [tokenized_down[(task, s, "dev")] for s in runs]
    dev.add(
      [eb.batch for eb in batching.grid_eval_batches(dev_splits, 32, buckets)],
      (MAX_INPUT, batching.DOWNSTREAM_TARGET_LENGTH),
    )
  out["downstream_grid"] = dict(
    steps_per_task=down_steps, shapes_per_task=grid_shapes_per_task, **grid.summary()
  )
  dev_summary = dev.summary()
  # Generation does not read the targets: only the encoder side matters for dev decoding.
  out["dev_eval"] = {k: dev_summary[k] for k in ("shapes", "distinct_shapes", "encoder_fraction")}
  return out


def markdown(results: dict) -> str:
  lines = [
    f"`{results['command']}` ({results['seconds']:.0f} s). Tokenizer: {results['tokenizer']}. "
    f"Buckets: inputs to multiples of {results['input_multiple']}, targets to multiples of "
    f"{results['target_multiple']}; prompt {PROMPT_LENGTH} positions in the encoder.",
    "",
  ]
  for gym, g in results["gyms"].items():
    t = g["lengths"]
    lines += [
      f"### {gym}: {t['examples']:,} examples (every task, seed and split)",
      "",
      "| tokens | p50 | p90 | p99 | max |",
      "|---|---|---|---|---|",
      "| input | " + " | ".join(str(t["input"][f"p{p}"]) for p in PERCENTILES) + " |",
      "| target | " + " | ".join(str(t["target"][f"p{p}"]) for p in PERCENTILES) + " |",
      "",
      f"Inputs cut at {MAX_INPUT}: {t['truncated_at_512']}. Median input per task: "
      + ", ".join(f"{k} {v}" for k, v in t["task_median_input"].items())
      + ".",
      "",
      "| setting | step | shapes met (input x target: batches) | encoder positions | decoder positions |",
      "|---|---|---|---|---|",
    ]
    for name, s in g["settings"].items():
      for step, label in (
        ("maml_upstream", "MAML episodes"),
        ("downstream_grid", "grid 20 x 16"),
        ("dev_eval", "dev eval 20 x 32"),
      ):
        if step not in s:
          continue
        r = s[step]
        shapes = ", ".join(f"{k}: {v}" for k, v in r["shapes"].items())
        decoder = f"{r['decoder_fraction']:.1%}" if "decoder_fraction" in r else "(not used)"
        lines.append(
          f"| {name} | {label} | {r['distinct_shapes']} ({shapes}) | "
          f"{r['encoder_fraction']:.1%} | {decoder} |"
        )
    lines += [
      "",
      "Positions are the bucketed batches' share of the padded batches' (512 inputs + 100 "
      "prompt; 64 upstream / 128 downstream targets).",
      "",
    ]
  return "\n".join(lines) + "\n"


def main():
  args = parse_args()
  start = time.perf_counter()
  tokenizer = load_tokenizer(args.model) if Path(args.model).is_dir() else None
  if tokenizer is None:
    from mpt_jax.model import hf

    tokenizer = load_tokenizer(hf.resolve_checkpoint(args.model))
  buckets = batching.LengthBuckets(args.input_multiple, args.target_multiple)
  results = dict(
    command=" ".join(["python -m benchmarks.length_stats", *sys.argv[1:]]),
    tokenizer=args.model,
    input_multiple=args.input_multiple,
    target_multiple=args.target_multiple,
    gyms={},
  )
  wanted = [s for s in args.settings.split(",") if s]
  with tempfile.TemporaryDirectory(prefix="gyms_") as workdir:
    sources = (
      [("crossfit", args.data_dir)]
      if args.data_dir
      else [(name, None) for name in args.gyms.split(",") if name]
    )
    for name, data_dir in sources:
      if data_dir is None:
        data_dir, settings, tasks = gym_data(name, workdir)
      else:
        settings = {s: settings_lib.get_setting(s) for s in wanted}
        tasks = sorted({t for s in settings.values() for t in (*s.source, *s.target)})
      chosen = {k: v for k, v in settings.items() if not wanted or k in wanted}
      print(f"{name}: tokenizing {len(tasks)} tasks", flush=True)
      tokenized_up = tokenize_all(data_dir, tasks, tokenizer, batching.UPSTREAM_TARGET_LENGTH)
      tokenized_down = tokenize_all(data_dir, tasks, tokenizer, batching.DOWNSTREAM_TARGET_LENGTH)
      entry = dict(lengths=length_table(tokenized_down), settings={})
      for setting_name, setting in chosen.items():
        print(f"  simulating {setting_name}", flush=True)
        entry["settings"][setting_name] = simulate_setting(
          setting, tokenized_up, tokenized_down, buckets, args
        )
      results["gyms"][name] = entry
  results["seconds"] = time.perf_counter() - start
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "length_stats.json").write_text(json.dumps(results, indent=1) + "\n")
  (args.out / "length_stats.md").write_text(markdown(results))
  print(markdown(results))


if __name__ == "__main__":
  main()
