"""What compiling our steps costs, and dropout's share of it: the tiny model's steps (the ones the tests and
every pipeline run compile) traced, lowered and compiled with dropout on (as trained) and off (the in-run
baseline), one after another in one process, the persistent compilation cache off.

    python -m benchmarks.bench_compile                     # tiny model, all steps, 2 rounds
    python -m benchmarks.bench_compile --threefry=original # the kind of random bits the tests use
    # another commit's code: this file copied into that checkout's benchmarks/, run there with --out DIR

Compile time depends on the host and its load more than step time does, so compare commits by their
"dropout on / off" ratios from runs on the same machine, or by the compiled HLO's size (for given code and
JAX version equal with dropout off; with it on, within ~1% by what the process compiled before: PT 14,721
lines compiled first, 14,807 after the other steps). Results: OUT/compile.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
METHODS = ("maml", "fomaml", "reptile", "pt", "grid")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="tiny", choices=("tiny", "small"))
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--rounds", type=int, default=2, help="compilations of each variant (interleaved)")
  parser.add_argument(
    "--threefry",
    default="partitionable",
    choices=("partitionable", "original"),
    help="jax_threefry_partitionable on (JAX's default) or off (what tests/conftest.py sets)",
  )
  parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])  # as bench_steps: one core
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"

import jax  # noqa: E402

import mpt_jax  # noqa: E402
from benchmarks import bench_steps as bs  # noqa: E402


def code_commit() -> str:
  """The commit of the mpt_jax this process imported (it may come from another checkout)."""
  where = Path(mpt_jax.__file__).resolve().parent
  done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=where, capture_output=True, text=True)
  return f"{done.stdout.strip() or 'unknown'} ({where})"


def measure(config: str, method: str, dropout: bool) -> dict:
  """Trace + lower and compile seconds, and the compiled HLO's size, of bench_steps' step of `method`."""
  model = bs.build_model(config, dropout_rate=bs.TIMING_DROPOUT)
  params = bs.random_params(model)
  prompt = bs.initial_prompt(params, bs.CONFIGS[config]["prompt_length"])
  runs = bs.CONFIGS[config]["grid_runs"]
  step, optimizer = bs.our_timed_step(method, model, deterministic=not dropout)
  args = (
    bs.our_initial_state(method, prompt, optimizer, runs),
    params,
    bs.make_batches(config)[method],
    bs.step_rng(method, runs),
  )
  start = time.perf_counter()
  lowered = step.lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  done = time.perf_counter()
  return dict(
    lower_s=lowered_at - start, compile_s=done - lowered_at, hlo_lines=len(compiled.as_text().splitlines())
  )


def markdown(results: dict) -> str:
  lines = [
    f"`python -m benchmarks.bench_compile --config={results['config']} --threefry={results['threefry']}` "
    f"({results['date']}, code {results['code']}, jax {results['jax']}, 1 core, load average "
    f"{', '.join(f'{x:.1f}' for x in results['load_average'])}; median of {results['rounds']} rounds)",
    "",
    "| step | trace + lower (s), dropout on / off | compile (s), dropout on / off | compile on / off "
    "| compiled HLO lines, on / off |",
    "|---|---|---|---|---|",
  ]
  for method, row in results["steps"].items():
    on, off = row["on"], row["off"]
    lines.append(
      f"| {method} | {on['lower_s']:.1f} / {off['lower_s']:.1f} | {on['compile_s']:.1f} / "
      f"{off['compile_s']:.1f} | **{on['compile_s'] / off['compile_s']:.2f}** | "
      f"{on['hlo_lines']:,.0f} / {off['hlo_lines']:,.0f} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  args = ARGS
  jax.config.update("jax_threefry_partitionable", args.threefry == "partitionable")
  rows = {m: {"on": [], "off": []} for m in args.methods.split(",")}
  for _ in range(args.rounds):
    for method, row in rows.items():
      for side in ("on", "off"):
        row[side].append(measure(args.config, method, dropout=side == "on"))
        print(method, side, row[side][-1], flush=True)
  median = lambda runs: {k: statistics.median(r[k] for r in runs) for k in runs[0]}  # noqa: E731
  results = dict(
    config=args.config,
    threefry=args.threefry,
    rounds=args.rounds,
    date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    code=code_commit(),
    jax=jax.__version__,
    load_average=list(os.getloadavg()),
    steps={m: {side: median(runs) for side, runs in row.items()} for m, row in rows.items()},
    all=rows,
  )
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "compile.json").write_text(json.dumps(results, indent=1) + "\n")
  (args.out / "compile.md").write_text(markdown(results))
  print(markdown(results))


if __name__ == "__main__":
  sys.exit(main())
