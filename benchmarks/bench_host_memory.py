"""What mpt_jax/host_memory.py's allocator policy is worth: our CPU steps with freed memory kept for reuse
("reuse", what the entry points set) against glibc's defaults ("system"), at T5-small shape on one core.

    python -m benchmarks.bench_host_memory                 # PT step, T5-small shape, 2 rounds
    python -m benchmarks.bench_host_memory --steps pt,maml --rounds 3
    python -m benchmarks.bench_host_memory --config tiny   # a smoke run

The policy is fixed per process (it must be set before JAX starts), so each (round, policy) is a fresh
child process: the same weights, batches and compiled step (bench_steps.py's), a warm-up call, then
`--calls` timed calls, each with its minor page faults (getrusage). Rounds alternate the two policies
so that load from other processes hits both alike. Results: benchmarks/results/host_memory.{json,md}:
median wall time per policy and step, the ratio reuse / system, and the faults per call.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
POLICIES = ("reuse", "system")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", default="small", choices=("tiny", "small"))
  parser.add_argument("--steps", default="pt", help="comma-separated of: maml,fomaml,reptile,pt,grid")
  parser.add_argument("--rounds", type=int, default=2, help="child processes per policy (alternating)")
  parser.add_argument("--calls", type=int, default=4, help="timed calls per step in each child")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  return parser.parse_args(argv)


def child(args) -> None:
  """One policy (from MPT_HOST_MALLOC) in this fresh process: prints one JSON line of timings."""
  os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mpt_jax import host_memory

  policy = host_memory.reuse_freed_memory()  # before JAX starts, as the entry points do
  import jax

  from benchmarks import bench_steps as bs

  cfg = bs.CONFIGS[args.config]
  model = bs.build_model(args.config, dropout_rate=bs.TIMING_DROPOUT)
  params = bs.random_params(model)
  prompt = bs.initial_prompt(params, cfg["prompt_length"])
  batches = bs.make_batches(args.config)
  steps = {}
  for method in args.steps.split(","):
    jitted, optimizer = bs.our_timed_step(method, model)
    state = bs.our_initial_state(method, prompt, optimizer, cfg["grid_runs"])
    batch = jax.device_put(batches[method])
    rng = bs.step_rng(method, cfg["grid_runs"])
    compiled, _ = bs.compile_step(jitted, state, params, batch, rng)
    holder = {"state": state}

    def call():
      holder["state"], metrics = compiled(holder["state"], params, batch, rng)
      jax.block_until_ready((holder["state"], metrics))

    call()  # warm-up: the first call faults its pages in under either policy
    walls, faults = [], []
    for _ in range(args.calls):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      start = time.perf_counter()
      call()
      walls.append(time.perf_counter() - start)
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    steps[method] = dict(wall_s=walls, minor_faults=faults)
  print(json.dumps(dict(policy=policy, steps=steps)))


def run_child(args, policy: str) -> dict:
  command = [sys.executable, "-m", "benchmarks.bench_host_memory", "--child", "--config", args.config]
  command += ["--steps", args.steps, "--calls", str(args.calls), "--threads", str(args.threads)]
  env = {**os.environ, "MPT_HOST_MALLOC": policy}
  done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise SystemExit(f"child ({policy}) failed:\n{done.stderr[-3000:]}")
  return json.loads(done.stdout.strip().splitlines()[-1])


def machine_record() -> dict:
  def read(path):
    try:
      return Path(path).read_text().strip()
    except OSError:
      return "unknown"

  from benchmarks.bench_steps import cpu_model  # (imports JAX; starts nothing)

  return dict(
    cpu_model=cpu_model(),
    glibc=" ".join(platform.libc_ver()),
    transparent_hugepages=read("/sys/kernel/mm/transparent_hugepage/enabled"),
    python=platform.python_version(),
    load_average_at_start=os.getloadavg(),
    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  )


def summarize(args, children: list[dict], machine: dict, total_s: float) -> dict:
  rows = []
  for method in args.steps.split(","):
    per = {}
    for policy in POLICIES:
      runs = [c["steps"][method] for c in children if c["requested"] == policy]
      walls = [w for r in runs for w in r["wall_s"]]
      faults = [f for r in runs for f in r["minor_faults"]]
      per[policy] = dict(
        median_s=statistics.median(walls), all_s=walls, median_faults=statistics.median(faults)
      )
    rows.append(dict(step=method, ratio=per["reuse"]["median_s"] / per["system"]["median_s"], **per))
  return dict(
    command="python -m benchmarks.bench_host_memory " + " ".join(sys.argv[1:]),
    config=args.config,
    calls=args.calls,
    rounds=args.rounds,
    applied={c["requested"]: c["policy"] for c in children},
    machine=machine,
    rows=rows,
    total_s=total_s,
  )


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [
    f"`{result['command'].strip()}`: {m['cpu_model']}, one core; {m['glibc']}; transparent hugepages "
    f"`{m['transparent_hugepages']}`; load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}; "
    f"{m['date']}; total {result['total_s'] / 60:.0f} min. Shape `{result['config']}` (benchmarks/bench_steps.py), "
    f"{result['rounds']} child processes per policy x {result['calls']} timed calls (after a warm-up call).",
    "",
    "| step | reuse (s) | system (s) | reuse / system | minor faults per call, reuse | system |",
    "|---|---|---|---|---|---|",
  ]
  for r in result["rows"]:
    lines.append(
      f"| {r['step']} | {r['reuse']['median_s']:.3f} | {r['system']['median_s']:.3f} | **{r['ratio']:.2f}** | "
      f"{r['reuse']['median_faults']:,.0f} | {r['system']['median_faults']:,.0f} |"
    )
  return "\n".join(lines) + "\n"


def main() -> None:
  args = parse_args()
  if args.child:
    child(args)
    return
  start, machine, children = time.perf_counter(), machine_record(), []
  for round_index in range(args.rounds):
    order = POLICIES if round_index % 2 == 0 else POLICIES[::-1]
    for policy in order:
      result = run_child(args, policy)
      result["requested"] = policy
      children.append(result)
      print(
        f"round {round_index} {policy} ({result['policy']}): "
        + ", ".join(
          f"{m} {statistics.median(s['wall_s']):.3f} s, {statistics.median(s['minor_faults']):,.0f} faults"
          for m, s in result["steps"].items()
        ),
        flush=True,
      )
  result = summarize(args, children, machine, time.perf_counter() - start)
  args.out.mkdir(parents=True, exist_ok=True)
  (args.out / "host_memory.json").write_text(json.dumps(result, indent=1) + "\n")
  (args.out / "host_memory.md").write_text(markdown(result))
  print(markdown(result))


if __name__ == "__main__":
  main()
