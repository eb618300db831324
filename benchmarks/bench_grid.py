"""Where the downstream grid loses (issue 31): the grid step of R runs against R single-run PT steps, at
T5-small shape on one CPU core, in one process, calls interleaved so that load from other processes hits
every variant alike.

    python -m benchmarks.bench_grid                  # T5-small shape, 4 runs, 3 rounds
    python -m benchmarks.bench_grid --config=tiny    # a smoke run

Variants (same weights, same batches, dropout 0.1 as the study):
  pt_b16       one PT step of batch 16 (x R: what the runs cost one by one)
  pt_b4        one PT step of batch 4 (x 4R: the same examples in smaller matmuls)
  grid_vmap    the grid step as the pipeline builds it (`algorithms.make_grid_step`: the runs vmapped)
  grid_map     the same runs one after another inside one step (`lax.map` over the runs)
Results: benchmarks/results/grid.{json,md}, time per run relative to pt_b16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="small", choices=("tiny", "small"))
  parser.add_argument("--runs", type=int, default=4)
  parser.add_argument("--rounds", type=int, default=3, help="timed calls of each variant (interleaved)")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--variants", default="pt_b16,pt_b4,grid_vmap,grid_map")
  parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
  return parser.parse_args(argv)


ARGS = parse_args() if __name__ == "__main__" else None
if ARGS is not None:
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mpt_jax import host_memory

  host_memory.reuse_freed_memory()  # as the entry points do, before JAX starts

import jax  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_steps as bs  # noqa: E402
from mpt_jax import algorithms, methods, optim  # noqa: E402


def build(config: str, runs: int):
  model = bs.build_model(config, dropout_rate=bs.TIMING_DROPOUT)
  params = bs.random_params(model)
  cfg = bs.CONFIGS[config]
  prompt = bs.initial_prompt(params, cfg["prompt_length"])
  loss_fn = algorithms.make_loss_fn(model, deterministic=False)
  optimizer = optim.make_optimizer("adafactor", 0.5)
  pt_step = methods.make_step("pt", loss_fn, optimizer)
  rng = np.random.default_rng(0)
  kw = dict(
    vocab_size=cfg["model"]["vocab_size"],
    input_length=cfg["input_length"],
    output_length=cfg["output_length"],
  )
  grid_batch = bs.random_batch(rng, (runs, 16), **kw)
  lrs = bs.grid_learning_rates(runs)

  def single(batch_size: int):
    batch = {k: v[0, :batch_size] for k, v in grid_batch.items()}
    step = algorithms.jit_step(pt_step)
    return step, lambda: algorithms.init_state(jax.numpy.asarray(prompt), optimizer), batch, jax.random.key(0)

  def grid(over_runs):
    step = jax.jit(over_runs(pt_step), donate_argnums=(0,))
    state0 = lambda: algorithms.init_grid_state(jax.numpy.asarray(prompt), optimizer, lrs)  # noqa: E731
    return step, state0, grid_batch, jax.random.split(jax.random.key(0), runs)

  def mapped(step):
    def grid_step(states, frozen, batches, rngs):
      return jax.lax.map(lambda xs: step(xs[0], frozen, xs[1], xs[2]), (states, batches, rngs))

    return grid_step

  return params, {
    "pt_b16": (single(16), runs),
    "pt_b4": (single(4), 4 * runs),
    "grid_vmap": (grid(algorithms.make_grid_step), 1),
    "grid_map": (grid(mapped), 1),
  }


def main() -> None:
  args = ARGS
  params, variants = build(args.config, args.runs)
  names = args.variants.split(",")
  compiled, states, compile_s = {}, {}, {}
  for name in names:
    (step, state0, batch, rng), _ = variants[name]
    start = time.perf_counter()
    compiled[name] = step.lower(state0(), params, batch, rng).compile()
    compile_s[name] = time.perf_counter() - start
    states[name] = state0()
    jax.block_until_ready(compiled[name](state0(), params, batch, rng))  # warm-up
    bs.log(f"{name}: compiled in {compile_s[name]:.1f} s")
  times = {name: [] for name in names}
  for round_ in range(args.rounds):
    for name in names:
      (step, state0, batch, rng), _ = variants[name]
      state = state0()
      start = time.perf_counter()
      jax.block_until_ready(compiled[name](state, params, batch, rng))
      times[name].append(time.perf_counter() - start)
      bs.log(f"round {round_}: {name} {times[name][-1]:.3f} s")
  per_run = {
    name: statistics.median(times[name]) * variants[name][1] / args.runs for name in names
  }  # seconds per run of 16 examples
  base = per_run.get("pt_b16")
  result = {
    "config": args.config,
    "runs": args.runs,
    "threads": args.threads,
    "machine": platform.processor() or platform.machine(),
    "jax": jax.__version__,
    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    "load_average": os.getloadavg(),
    "times_s": times,
    "compile_s": compile_s,
    "seconds_per_run": per_run,
    "relative_to_pt_b16": {n: (per_run[n] / base if base else None) for n in names},
  }
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / f"grid_{args.config}.json").write_text(json.dumps(result, indent=1))
  lines = [
    f"`python -m benchmarks.bench_grid --config={args.config} --runs={args.runs}` ({result['date']}, "
    f"{args.threads} core(s), jax {jax.__version__}, load average {', '.join(f'{x:.1f}' for x in result['load_average'])})",
    "",
    "| variant | median call (s) | seconds per run of 16 examples | per run / PT step of batch 16 | compile (s) |",
    "|---|---|---|---|---|",
  ]
  for n in names:
    rel = result["relative_to_pt_b16"][n]
    lines.append(
      f"| {n} | {statistics.median(times[n]):.3f} | {per_run[n]:.3f} | "
      f"{'' if rel is None else f'**{rel:.2f}**'} | {compile_s[n]:.1f} |"
    )
  (args.out / f"grid_{args.config}.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


if __name__ == "__main__":
  main()
