"""Our compiled steps against the reference algorithm in PyTorch (transformers T5 + `higher`).

    python -m benchmarks.bench_steps               # the full table: tiny and T5-small-shaped models
    python -m benchmarks.bench_steps --quick       # the tiny model only, 3 repeats (a smoke run)
    python -m benchmarks.bench_steps --check-only  # only the faithfulness check of the baseline
    python -m benchmarks.bench_steps --gpu         # issue 13's GPU table at T5-large shape (<= 8 min;
                                                   # benchmarks/gpu_table.py; --scale tiny: CPU dry run)

One process, both sides on the same T5 weights, the same batches and the same number of threads. In
order, for each model configuration:
1. Faithfulness: with dropout off, the baseline's gradients (MAML, first-order MAML, Reptile, PT on
   the tiny model; MAML on T5-small, whose check costs minutes) and its Adafactor update must equal
   ours (relative L2 error under `--tolerance`); it aborts otherwise. The check's inner learning rate
   is raised until second- and first-order MAML differ by >= 5%, so the check can tell them apart.
   The MAML meta-gradient is also timed there without dropout, on both sides.
2. Timing, dropout 0.1 on both sides (the study's): median wall time of the timed calls after
   compilation and a warm-up call, ours and the baseline interleaved so that load from other
   processes hits both alike. Compile time (trace + lower + compile) is reported apart. Then one call
   per side under its profiler (jax.profiler / torch.profiler): time per category of op.
3. (T5-small only) achieved FLOP/s of our MAML step against a large float32 matmul on the same cores,
   and the compiled memory of the MAML step with and without rematerialization.
Results go to benchmarks/results/steps.{json,md}; the Markdown is what benchmarks/README.md shows.

Threads: `--threads N` (default 1) pins the process to N cores before JAX or torch start. XLA's CPU
runtime sizes its thread pool from the process's CPU affinity and `torch.set_num_threads(N)` sizes
torch's; both are recorded. Why 1 by default: on this shared 2-core machine other processes keep the
cores busy, and torch's OpenMP pool then waits at every op's barrier for a descheduled thread (a tiny
PT step measured 1.5-7.6 s with 2 threads against 0.11 s with 1). That would flatter us unfairly; use
`--threads 2` on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

from mpt_jax import host_memory

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
METHODS_ORDER = ("maml", "fomaml", "reptile", "pt", "grid")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(
    description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument(
    "--quick", action="store_true", help="the tiny configuration only, 3 repeats (a smoke run)"
  )
  parser.add_argument(
    "--configs", default=None, help="comma-separated subset of: tiny,small (default: both; tiny with --quick)"
  )
  parser.add_argument(
    "--repeats",
    type=int,
    default=None,
    help="timed calls per step and side (default: per configuration and step; 3 with --quick)",
  )
  parser.add_argument(
    "--threads",
    type=int,
    default=1,
    help="cores (= threads of XLA and of torch) to run on; default 1 (see above)",
  )
  parser.add_argument(
    "--tolerance",
    type=float,
    default=1e-3,
    help="max relative L2 error of the baseline's gradients and update vs ours",
  )
  parser.add_argument(
    "--check-only",
    action="store_true",
    help="only check that the baseline computes what ours does (no timing)",
  )
  parser.add_argument(
    "--only",
    default=None,
    help=f"comma-separated subset of the steps {','.join(METHODS_ORDER)} (a "
    f"diagnostic run: no memory/FLOP section)",
  )
  parser.add_argument(
    "--profile", action="store_true", help="profile every timed step (default: per configuration)"
  )
  parser.add_argument(
    "--render",
    action="store_true",
    help="only rewrite OUT/steps.md from OUT/steps.json (after changing the tables)",
  )
  parser.add_argument("--out", type=Path, default=RESULTS, help="where steps.json / steps.md go")
  parser.add_argument(
    "--gpu",
    action="store_true",
    help="the GPU table instead (benchmarks/gpu_table.py): T5-large shape, padded and "
    "bucketed lengths, scanned layers, the grid in chunks, dev decoding; writes "
    "OUT/gpu_<date>.{json,md}",
  )
  parser.add_argument(
    "--scale",
    choices=("large", "tiny"),
    default="large",
    help="--gpu: the study's T5-large shape, or a tiny model (a CPU dry run of the code)",
  )
  parser.add_argument(
    "--budget_s",
    type=float,
    default=450.0,
    help="--gpu: sections that would end after this many seconds are skipped",
  )
  parser.add_argument(
    "--sections",
    default=None,
    help="--gpu: comma-separated subset of the GPU table's sections (default: all)",
  )
  return parser.parse_args(argv)


def pin_threads(threads: int | None) -> list[int]:
  """Restricts this process to `threads` cores (before JAX starts: XLA reads the affinity once)."""
  cores = sorted(os.sched_getaffinity(0))
  if threads is not None:
    if not 1 <= threads <= len(cores):
      raise SystemExit(f"--threads {threads}: this process may use {len(cores)} cores ({cores})")
    cores = cores[:threads]
    os.sched_setaffinity(0, cores)
  return cores


ARGS = parse_args() if __name__ == "__main__" else None
# As our entry points do, before JAX starts (mpt_jax/host_memory.py); the baseline shares the process
# and so the policy.
HOST_MALLOC = host_memory.reuse_freed_memory() if ARGS is not None else None
if ARGS is not None and ARGS.gpu:
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # the reference (torch) runs first
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
elif ARGS is not None:
  CORES = pin_threads(ARGS.threads)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
  if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
    raise SystemExit(
      "unset XLA_FLAGS=--xla_force_host_platform_device_count: the benchmark times one "
      "CPU device using all its cores"
    )

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from mpt_jax import algorithms, methods, optim  # noqa: E402
from mpt_jax.algorithms import common  # noqa: E402
from mpt_jax.model.t5 import T5, T5Config, init_params  # noqa: E402

STUDY_INNER_LR = 3e-5  # the study's inner SGD learning rate (timing; any value costs the same)
GRID_LEARNING_RATES = (0.5, 0.4, 0.3, 0.2)  # x 5 seeds = the 20 downstream runs of a target task
TIMING_DROPOUT = 0.1

METHODS = METHODS_ORDER
CHECK_INNER_LRS = (1.0, 10.0, 100.0, 1000.0)  # tried in order (see choose_check_inner_lr)
MIN_FIRST_ORDER_GAP = 0.05

# The models. "small" is T5-small-shaped in the v1.1 / LM-adapted flavour of the study's T5-large
# (gated-GELU, untied head, no output scaling). Lengths: the study used input 512 / output 64; on these
# 2 shared CPU cores we use 128 / 16 (costs are ~linear in length). Per configuration: timed calls per
# step (after one warm-up call), the downstream grid's number of runs, the steps checked for
# faithfulness. T5-small's grid has 4 runs (one seed's 4 learning rates), not 20: 20 runs cost ~200
# CPU-seconds per call and side here; the grid's point, 20 runs in one vmapped step against 20 steps
# one after another, is shown in full on the tiny model.
CONFIGS = {
  "tiny": dict(
    model=dict(
      vocab_size=256,
      d_model=64,
      d_kv=16,
      num_heads=4,
      d_ff=128,
      num_layers=2,
      num_decoder_layers=2,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=16,
    ),
    prompt_length=20,
    input_length=32,
    output_length=8,
    grid_runs=20,
    repeats=dict(maml=5, fomaml=5, reptile=5, pt=5, grid=5),
    warmup=dict(maml=1, fomaml=1, reptile=1, pt=1, grid=1),
    check=("maml", "fomaml", "reptile", "pt"),
    profile=METHODS,
  ),
  "small": dict(
    model=dict(
      vocab_size=32128, d_model=512, d_kv=64, num_heads=6, d_ff=1024, num_layers=8, num_decoder_layers=8
    ),
    prompt_length=100,
    input_length=128,
    output_length=16,
    grid_runs=4,
    # A warm-up call and three timed calls for every step: the grid's second call after compiling read
    # 22.4-22.8 s in three runs (2026-12-08), its others 18.0-19.1 s; a median of two calls is their mean,
    # the median of three skips it.
    repeats=dict(maml=3, fomaml=3, reptile=3, pt=3, grid=3),
    warmup=dict(maml=1, fomaml=1, reptile=1, pt=1, grid=1),
    check=("maml",),
    profile=("maml", "pt"),
  ),
}
MODEL_FLAVOUR = dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, scale_decoder_outputs=False)

# What one step of each method processes (reference/PROTOCOL.md): tasks T, inner steps K, support
# examples per inner step b, query examples q; PT batch B; the grid: R runs (per configuration) of B.
STEPS = {
  "maml": dict(tasks=2, inner_steps=1, support=2, query=2),
  "fomaml": dict(tasks=2, inner_steps=1, support=4, query=4),
  "reptile": dict(tasks=2, inner_steps=10, support=4),
  "pt": dict(batch=16),
  "grid": dict(batch=16),
}


def step_title(name: str, method: str) -> str:
  runs = CONFIGS[name]["grid_runs"]
  return {
    "maml": "MAML outer step (2 tasks x 2+2 ex.)",
    "fomaml": "first-order MAML step (2 tasks x 4+4 ex.)",
    "reptile": "Reptile step (2 tasks x 10 inner steps of 4 ex.)",
    "pt": "PT step (batch 16)",
    "grid": f"downstream grid: {runs} runs x batch 16, one step each",
  }[method]


def log(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# --------------------------------------------------------------------------------------------------
# Model, weights, batches
# --------------------------------------------------------------------------------------------------
def build_model(name: str, *, dropout_rate: float, remat: bool = False) -> T5:
  return T5(T5Config(**CONFIGS[name]["model"], **MODEL_FLAVOUR, dropout_rate=dropout_rate, remat=remat))


def random_params(model: T5, seed: int = 0):
  """HF-initialized random weights, the untied head scaled by d_model**-0.5 so that the logits (and
  the loss, ~log V) have a realistic size, as after pre-training."""
  params = init_params(model, seed)
  scale = model.config.d_model**-0.5
  return {**params, "lm_head": {"kernel": params["lm_head"]["kernel"] * scale}}


def random_batch(
  rng: np.random.Generator, lead: tuple[int, ...], *, vocab_size: int, input_length: int, output_length: int
) -> dict[str, np.ndarray]:
  """A right-padded batch (pad 0, EOS 1 last) with random lengths and leading dims `lead`."""

  def padded(length, min_length):
    lengths = rng.integers(min_length, length + 1, size=lead)
    positions = np.arange(length)
    mask = (positions < lengths[..., None]).astype(np.int32)
    ids = rng.integers(3, vocab_size, size=(*lead, length)).astype(np.int32)
    ids = np.where(positions == lengths[..., None] - 1, 1, ids) * mask
    return ids.astype(np.int32), mask

  input_ids, input_mask = padded(input_length, max(2, input_length // 2))
  target_ids, target_mask = padded(output_length, 2)
  return {
    "input_ids": input_ids,
    "input_mask": input_mask,
    "target_ids": target_ids,
    "target_mask": target_mask,
  }


def make_batches(name: str, seed: int = 0) -> dict:
  """One batch (or episode) per step kind, in the docs/CONTRACTS.md layout."""
  cfg = CONFIGS[name]
  rng = np.random.default_rng(seed)
  kw = dict(
    vocab_size=cfg["model"]["vocab_size"],
    input_length=cfg["input_length"],
    output_length=cfg["output_length"],
  )
  batches = {}
  for method in ("maml", "fomaml", "reptile"):
    s = STEPS[method]
    episode = {"support": random_batch(rng, (s["tasks"], s["inner_steps"], s["support"]), **kw)}
    if "query" in s:
      episode["query"] = random_batch(rng, (s["tasks"], s["query"]), **kw)
    batches[method] = episode
  batches["pt"] = random_batch(rng, (STEPS["pt"]["batch"],), **kw)
  batches["grid"] = random_batch(rng, (cfg["grid_runs"], STEPS["grid"]["batch"]), **kw)
  return batches


def initial_prompt(params, prompt_length: int, seed: int = 1) -> np.ndarray:
  """Embeddings of random vocabulary tokens, like the study's sampled-vocabulary prompt init."""
  table = np.asarray(params["shared"]["embedding"])
  ids = np.random.default_rng(seed).integers(3, min(5000, table.shape[0]), prompt_length)
  return table[ids].astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Our steps
# --------------------------------------------------------------------------------------------------
def our_grad_fn(method: str, loss_fn, inner_lr: float):
  if method in ("maml", "fomaml"):
    return algorithms.make_maml_grad_fn(loss_fn, inner_lr=inner_lr, first_order=(method == "fomaml"))
  if method == "reptile":
    return algorithms.make_reptile_grad_fn(loss_fn, inner_lr=inner_lr)
  return algorithms.make_pt_grad_fn(loss_fn)


def our_timed_step(
  method: str,
  model: T5,
  *,
  inner_lr: float = STUDY_INNER_LR,
  remat: bool = False,
  deterministic: bool = False,
):
  """The jitted step users run (state donated), dropout on unless `deterministic`; the grid: PT runs as
  the pipeline groups them on this backend (`algorithms.grid_runs_at_once`: one at a time on a CPU)."""
  loss_fn = algorithms.make_loss_fn(model, deterministic=deterministic)
  optimizer = optim.make_optimizer("adafactor", 0.5)
  if method == "grid":
    step = methods.make_step("pt", loss_fn, optimizer)
    return jax.jit(
      algorithms.make_grid_step(step, algorithms.grid_runs_at_once(0)), donate_argnums=(0,)
    ), optimizer
  kwargs = {} if method == "pt" else dict(inner_lr=inner_lr)
  if method in ("maml", "fomaml"):
    kwargs["remat"] = remat
  return algorithms.jit_step(methods.make_step(method, loss_fn, optimizer, **kwargs)), optimizer


def grid_learning_rates(num_runs: int) -> np.ndarray:
  return np.resize(np.asarray(GRID_LEARNING_RATES, np.float32), num_runs)


def our_initial_state(method: str, prompt, optimizer, grid_runs: int = 0):
  if method == "grid":
    return algorithms.init_grid_state(jnp.asarray(prompt), optimizer, grid_learning_rates(grid_runs))
  return algorithms.init_state(jnp.asarray(prompt), optimizer)


def step_rng(method: str, grid_runs: int = 0):
  key = jax.random.key(0)
  return jax.random.split(key, grid_runs) if method == "grid" else key


def compile_step(jitted, *args):
  """(compiled executable, seconds to trace + lower + compile)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start


def timed(fn) -> tuple[float, float]:
  """(wall seconds, process CPU seconds) of one call."""
  wall, cpu = time.perf_counter(), time.process_time()
  fn()
  return time.perf_counter() - wall, time.process_time() - cpu


# --------------------------------------------------------------------------------------------------
# 1. Faithfulness of the baseline
# --------------------------------------------------------------------------------------------------
def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.linalg.norm(theirs - ours) / max(np.linalg.norm(ours), 1e-30))


def choose_check_inner_lr(torch_model, prompt, episode) -> tuple[float, float]:
  """The first of CHECK_INNER_LRS at which the baseline's MAML and first-order MAML gradients differ
  by >= MIN_FIRST_ORDER_GAP (at the study's 3e-5 they agree to ~1e-5, and a check there could not
  tell a first-order implementation from a second-order one). Returns (inner lr, gap)."""
  from benchmarks import torch_reference as reference

  episode = reference.to_torch(episode)
  gap = float("nan")
  for inner_lr in CHECK_INNER_LRS:
    second, first = (reference.ReferenceRun(torch_model, prompt, inner_lr=inner_lr) for _ in range(2))
    loss = second.meta_gradient("maml", episode)
    first.meta_gradient("fomaml", episode)
    gap = relative_error(second.grad, first.grad)
    log(f"  check inner lr {inner_lr:g}: MAML vs first-order gap {gap:.3f} (query loss {loss:.3f})")
    if np.isfinite(loss) and gap >= MIN_FIRST_ORDER_GAP:
      return inner_lr, gap
  raise SystemExit(
    f"ABORT: MAML and first-order MAML differ by < {MIN_FIRST_ORDER_GAP} at every "
    f"inner lr in {CHECK_INNER_LRS} (last gap {gap:.2e}): the faithfulness check could "
    f"not tell them apart"
  )


def check_faithfulness(
  name: str, params, prompt, batches, torch_model, *, tolerance: float, timing_calls: int = 2
) -> list[dict]:
  """Dropout off: the baseline's gradient (summed over tasks, so divided by T) and its Adafactor
  update must equal ours. Aborts (SystemExit) otherwise. Also times the MAML step without dropout
  (`timing_calls` calls per side after the checked one)."""
  from benchmarks import torch_reference as reference

  model = build_model(name, dropout_rate=0.0)
  loss_fn = algorithms.make_loss_fn(model, deterministic=True)
  optimizer = optim.make_optimizer("adafactor", 0.5)
  apply = jax.jit(lambda state, grad, metrics: common.apply_gradient(state, grad, metrics, optimizer))
  torch_model.eval()  # dropout off
  inner_lr, gap = choose_check_inner_lr(torch_model, prompt, batches["maml"])
  rows = []
  for method in CONFIGS[name]["check"]:
    batch = jax.device_put(batches[method])
    grad_fn = jax.jit(our_grad_fn(method, loss_fn, inner_lr))
    args = (jnp.asarray(prompt), params, batch, jax.random.key(0), 0)
    compiled, compile_s = compile_step(grad_fn, *args)
    grad, metrics = compiled(*args)
    state, _ = apply(algorithms.init_state(jnp.asarray(prompt), optimizer), grad, metrics)
    run = reference.ReferenceRun(torch_model, prompt, inner_lr=inner_lr)
    batch_torch = reference.to_torch(batches[method])
    torch_loss = run.step(method, batch_torch)
    num_tasks = STEPS[method].get("tasks", 1)  # the reference sums over tasks, we average
    row = dict(
      config=name,
      method=method,
      inner_lr=inner_lr,
      loss_ours=float(metrics["loss"]),
      loss_baseline=torch_loss,
      grad_rel_error=relative_error(grad, run.grad / num_tasks),
      update_rel_error=relative_error(np.asarray(state.prompt) - prompt, run.prompt - prompt),
      ours_compile_s=compile_s,
    )
    if method == "maml":
      row["first_order_gap"] = gap
      ours_times = [timed(lambda: jax.block_until_ready(compiled(*args)))[0] for _ in range(timing_calls)]
      baseline_times = [timed(lambda: run.meta_gradient(method, batch_torch))[0] for _ in range(timing_calls)]
      row["ours_no_dropout_grad_s"] = float(np.median(ours_times))
      row["baseline_no_dropout_grad_s"] = float(np.median(baseline_times))
    rows.append(row)
    log(
      f"  check {name}/{method}: loss ours {row['loss_ours']:.6f} baseline {torch_loss:.6f}; "
      f"gradient rel. error {row['grad_rel_error']:.2e}, update rel. error "
      f"{row['update_rel_error']:.2e}"
    )

  def matches(row):
    loss_error = abs(row["loss_ours"] - row["loss_baseline"]) / max(1.0, abs(row["loss_ours"]))
    return max(row["grad_rel_error"], row["update_rel_error"], loss_error) <= tolerance

  failed = [row for row in rows if not matches(row)]
  if failed:
    raise SystemExit(
      f"ABORT: the PyTorch baseline does not match ours on {name} (tolerance {tolerance}): {failed}"
    )
  return rows


# --------------------------------------------------------------------------------------------------
# 2. Timing
# --------------------------------------------------------------------------------------------------
def time_method(
  name: str,
  method: str,
  model: T5,
  params,
  prompt,
  batch,
  torch_model,
  repeats: int,
  warmup: int,
  profile: bool,
) -> tuple[dict, object]:
  """Ours and the baseline on one step kind: compile, warm up, then `repeats` interleaved calls;
  then, with `profile`, one more call of each under its profiler (not part of the timing)."""
  from benchmarks import torch_reference as reference

  grid_runs = CONFIGS[name]["grid_runs"]
  jitted, optimizer = our_timed_step(method, model)
  state = our_initial_state(method, prompt, optimizer, grid_runs)
  batch_ours = jax.device_put(batch)
  rng = step_rng(method, grid_runs)
  compiled, compile_s = compile_step(jitted, state, params, batch_ours, rng)
  holder = {"state": state}

  def ours():
    holder["state"], metrics = compiled(holder["state"], params, batch_ours, rng)
    jax.block_until_ready((holder["state"], metrics))

  batch_torch = reference.to_torch(batch)
  torch_model.train()  # dropout on, as in ours
  if method == "grid":
    runs = [
      reference.ReferenceRun(torch_model, prompt, learning_rate=float(lr))
      for lr in grid_learning_rates(grid_runs)
    ]
    baseline = lambda: reference.grid_step(runs, batch_torch)
  else:
    run = reference.ReferenceRun(torch_model, prompt, inner_lr=STUDY_INNER_LR)
    baseline = lambda: run.step(method, batch_torch)

  ours_first = baseline_first = None
  if warmup:
    ours_first, _ = timed(ours)
    baseline_first, _ = timed(baseline)
  ours_times, baseline_times = [], []
  for _ in range(repeats):
    ours_times.append(timed(ours))
    baseline_times.append(timed(baseline))
  ours_wall = float(np.median([t[0] for t in ours_times]))
  baseline_wall = float(np.median([t[0] for t in baseline_times]))
  row = dict(
    config=name,
    method=method,
    title=step_title(name, method),
    repeats=repeats,
    warmup=warmup,
    ours_s=ours_wall,
    baseline_s=baseline_wall,
    ratio=ours_wall / baseline_wall,
    ours_cpu_s=float(np.median([t[1] for t in ours_times])),
    baseline_cpu_s=float(np.median([t[1] for t in baseline_times])),
    ours_all_s=[t[0] for t in ours_times],
    baseline_all_s=[t[0] for t in baseline_times],
    ours_compile_s=compile_s,
    ours_first_call_s=ours_first,
    baseline_first_call_s=baseline_first,
  )
  log(
    f"  time {name}/{method}: ours {ours_wall:.4f} s, baseline {baseline_wall:.4f} s, "
    f"ratio {row['ratio']:.3f} (compile {compile_s:.1f} s)"
  )
  if profile:
    row["profile"] = dict(ours=profile_ours(compiled, ours), baseline=profile_baseline(baseline))
    log(
      "  profile (s): "
      + "; ".join(
        f"{side} " + ", ".join(f"{c} {t:.3f}" for c, t in row["profile"][side]["seconds"].items())
        for side in ("ours", "baseline")
      )
    )
  return row, compiled


# --------------------------------------------------------------------------------------------------
# Profiles: where each side's time goes
# --------------------------------------------------------------------------------------------------
# JAX's own random ops, and mpt_jax/model/dropout.py's draws (its named scope)
_RNG_MARKERS = (
  "threefry",
  "_bernoulli",
  "_uniform",
  "random_bits",
  "fold_in",
  "random_split",
  "random_draws",
)


def _draws_random_bits(op_name: str) -> bool:
  return any(marker in op_name for marker in _RNG_MARKERS)


_CONTAINERS = ("while", "conditional", "call")  # their events enclose their bodies' events
PROFILE_CATEGORIES = ("matmul", "dropout RNG", "other ops", "copies/broadcasts", "outside ops")


class HloOps:
  """What the profile needs from a compiled module's HLO text: each instruction's JAX op path
  (metadata op_name), and the matmul FLOPs each executed op performs (its own dot, or the dots inside
  the fusion it calls: XLA's CPU runtime runs most dots as `ynn_fusion`s, a dot with fused elementwise
  ops), and whether it computes random bits (itself, or inside the fusion it calls)."""

  _HEADER = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
  _INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*)$")
  _ARRAY = re.compile(r"^\w+\[([\d,]*)\]\S*\s+([\w\-]+)\((.*)$")

  def __init__(self, hlo_text: str):
    self.op_name, self.dims, self.calls, self.dot_flops = {}, {}, {}, {}
    self.computation_dots: dict[str, list[str]] = {}
    self.computation_calls: dict[str, list[str]] = {}
    self.computation_draws: dict[str, bool] = {}
    computation = None
    for line in hlo_text.splitlines():
      header = self._HEADER.match(line)
      if header:
        computation = header.group(1)
        self.computation_dots[computation], self.computation_calls[computation] = [], []
        self.computation_draws[computation] = False
        continue
      match = self._INSTRUCTION.match(line)
      if not match or computation is None:
        continue
      name, rest = match.groups()
      op_name = re.search(r'op_name="([^"]*)"', rest)
      self.op_name[name] = op_name.group(1) if op_name else ""
      if _draws_random_bits(self.op_name[name]):
        self.computation_draws[computation] = True
      array = self._ARRAY.match(rest)
      if not array:
        continue  # a tuple-shaped op (while, call, ...)
      dims, opcode, tail = array.groups()
      self.dims[name] = tuple(int(d) for d in dims.split(",") if d)
      called = re.findall(r"calls=%?([\w.\-]+)", tail)
      if called:
        self.calls[name] = called
        self.computation_calls[computation] += called
      if opcode == "dot":
        lhs = re.match(r"\s*%?([\w.\-]+)", tail).group(1)
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", tail)
        size = (
          int(np.prod([self.dims.get(lhs, ())[int(i)] for i in contracting.group(1).split(",") if i]))
          if contracting and lhs in self.dims
          else 0
        )
        self.dot_flops[name] = 2.0 * float(np.prod(self.dims[name])) * size
        self.computation_dots[computation].append(name)

  def _dots_in(self, computation: str) -> list[str]:
    dots = list(self.computation_dots.get(computation, []))
    for called in self.computation_calls.get(computation, []):
      dots += self._dots_in(called)
    return dots

  def dots(self, name: str) -> list[str]:
    """The dot instructions an executed op runs: itself, or those inside the computations it calls."""
    if name in self.dot_flops:
      return [name]
    return [dot for called in self.calls.get(name, []) for dot in self._dots_in(called)]

  def _draws_in(self, computation: str) -> bool:
    return self.computation_draws.get(computation, False) or any(
      self._draws_in(called) for called in self.computation_calls.get(computation, [])
    )

  def draws_random_bits(self, name: str) -> bool:
    """Whether an executed op computes random bits: its own op, or one inside the computations it
    calls (a fusion's root, whose metadata names the op, is often the select that applies the mask)."""
    if _draws_random_bits(self.op_name.get(name, "")):
      return True
    return any(self._draws_in(called) for called in self.calls.get(name, []))


def hlo_category(name: str, op_name: str, has_dots: bool, draws: bool) -> str | None:
  """What an executed HLO op (a thunk of XLA's CPU runtime) spends its time on."""
  if name.startswith(_CONTAINERS):
    return None
  if has_dots:
    return "matmul"
  if draws:
    return "dropout RNG"  # threefry random bits for the dropout masks, and what XLA fused with them
  if not op_name and name.startswith(("copy", "wrapped_broadcast", "transpose", "bitcast")):
    return "copies/broadcasts"
  return "other ops"


_PATH_NOISE = (
  "while",
  "body",
  "cond",
  "closed_call",
  "checkpoint",
  "remat",
  "rematted_computation",
  "pjit",
  "branch",
)


def op_label(name: str, op_name: str) -> str:
  """A readable label aggregated over layers: the module path (block index wildcarded) and the op, e.g.
  "encoder/block_*/layer_1/DenseReluDense/wi_0: dot_general"."""
  parts = [
    p
    for p in op_name.split("/")[1:]  # [0] is jit(step)
    if p and not p.startswith(("vmap(", "jvp(", "transpose(", "jit(step", "checkpoint"))
  ]
  module, op = [], parts[-1] if parts else re.sub(r"\.\d+$", "", name)
  for part in parts[:-1]:
    if part.startswith("jit(_"):
      break  # a jax.random / library helper: the module path ends here
    if part in _PATH_NOISE or part.startswith(("T5.", "jit(", "vmap(")):
      continue
    module.append(re.sub(r"^block_\d+$", "block_*", part))
  return f"{'/'.join(module)}: {op}" if module else op


def profile_ours(compiled, call) -> dict:
  """One call of our compiled step under jax.profiler: seconds per category, matmul FLOP/s, top ops.

  XLA's CPU runtime records one trace event per executed HLO op (thunk); each is classified from the
  op's metadata (the JAX op it came from), matmuls by the dots it runs (FLOPs from their shapes).
  "outside ops" = wall time minus the ops' time (dispatch, thunk scheduling, Python).
  """
  hlo = HloOps(compiled.as_text())
  with tempfile.TemporaryDirectory(prefix="mpt_trace_") as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      wall, _ = timed(call)
    (trace_file,) = Path(trace_dir).rglob("perfetto_trace.json.gz")
    with gzip.open(trace_file) as f:
      data = json.load(f)
  events = data["traceEvents"] if isinstance(data, dict) else data
  seconds = {c: 0.0 for c in PROFILE_CATEGORIES}
  per_op, matmul_groups, matmul_flops = {}, {}, 0.0
  for event in events:
    name = event.get("name")
    if event.get("ph") != "X" or name not in hlo.op_name:
      continue
    dots = hlo.dots(name)
    category = hlo_category(name, hlo.op_name[name], bool(dots), hlo.draws_random_bits(name))
    if category is None:
      continue
    duration = event["dur"] * 1e-6
    seconds[category] += duration
    if dots:
      flops = sum(hlo.dot_flops[d] for d in dots)
      matmul_flops += flops
      main_dot = max(dots, key=lambda d: hlo.dot_flops[d])
      label = op_label(main_dot, hlo.op_name.get(main_dot, ""))
      group = matmul_groups.setdefault(label, [0.0, 0.0])
      group[0] += duration
      group[1] += flops
    else:
      label = op_label(name, hlo.op_name[name])
    per_op[(category, label)] = per_op.get((category, label), 0.0) + duration
  seconds["outside ops"] = max(0.0, wall - sum(seconds.values()))
  top = sorted(per_op.items(), key=lambda item: -item[1])[:8]
  groups = sorted(matmul_groups.items(), key=lambda item: -item[1][0])[:8]
  return dict(
    wall_s=wall,
    seconds=seconds,
    matmul_flops=matmul_flops,
    matmul_flops_per_s=matmul_flops / max(seconds["matmul"], 1e-12),
    top=[dict(category=c, op=op, seconds=t) for (c, op), t in top],
    matmul_groups=[dict(op=op, seconds=t, flops=f, flops_per_s=f / max(t, 1e-12)) for op, (t, f) in groups],
  )


_TORCH_MATMULS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::matmul", "aten::linear")
_TORCH_RNG = ("bernoulli", "dropout", "uniform")


def profile_baseline(call) -> dict:
  """One call of the baseline under torch.profiler: self CPU seconds of its ops by category."""
  import torch

  with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], with_flops=True) as prof:
    wall, _ = timed(call)
  seconds = {c: 0.0 for c in PROFILE_CATEGORIES}
  per_op, matmul_flops = {}, 0.0
  for average in prof.key_averages():
    t = average.self_cpu_time_total * 1e-6
    if average.key in _TORCH_MATMULS:
      category = "matmul"
      matmul_flops += float(average.flops or 0)
    elif any(marker in average.key for marker in _TORCH_RNG):
      category = "dropout RNG"
    elif average.key in (
      "aten::copy_",
      "aten::clone",
      "aten::contiguous",
      "aten::expand",
      "aten::cat",
      "aten::transpose",
      "aten::view",
      "aten::reshape",
    ):
      category = "copies/broadcasts"
    else:
      category = "other ops"
    seconds[category] += t
    per_op[(category, average.key)] = t
  seconds["outside ops"] = max(0.0, wall - sum(seconds.values()))
  top = sorted(per_op.items(), key=lambda item: -item[1])[:8]
  return dict(
    wall_s=wall,
    seconds=seconds,
    matmul_flops=matmul_flops,
    matmul_flops_per_s=matmul_flops / max(seconds["matmul"], 1e-12),
    top=[dict(category=c, op=op, seconds=t) for (c, op), t in top],
  )


# --------------------------------------------------------------------------------------------------
# 3. Memory and FLOP/s (T5-small)
# --------------------------------------------------------------------------------------------------
MEMORY_FIELDS = (
  "temp_size_in_bytes",
  "argument_size_in_bytes",
  "output_size_in_bytes",
  "alias_size_in_bytes",
  "generated_code_size_in_bytes",
)


def memory_row(label: str, compiled, compile_s: float) -> dict:
  stats = compiled.memory_analysis()
  row = {"variant": label, "compile_s": compile_s}
  row.update({field: int(getattr(stats, field)) for field in MEMORY_FIELDS})
  row["flops"] = float(compiled.cost_analysis().get("flops", float("nan")))
  return row


def memory_variants(name: str, params, prompt, batches, maml_compiled, maml_compile_s) -> list[dict]:
  """Compiled memory of our second-order MAML step: no remat (the timed one), inner-step remat,
  per-layer remat; and first-order MAML on the same 2+2 episode. Compiled only, never run."""
  rows = [memory_row("MAML (as timed)", maml_compiled, maml_compile_s)]
  variants = [
    ("MAML, make_step(remat=True): each inner step", "maml", False, True),
    ("MAML, T5Config(remat=True): each layer", "maml", True, False),
    ("first-order MAML, same 2+2 episode", "fomaml", False, False),
  ]
  batch = jax.device_put(batches["maml"])
  for label, method, layer_remat, step_remat in variants:
    model = build_model(name, dropout_rate=TIMING_DROPOUT, remat=layer_remat)
    jitted, optimizer = our_timed_step(method, model, remat=step_remat)
    state = our_initial_state(method, prompt, optimizer)
    compiled, compile_s = compile_step(jitted, state, params, batch, step_rng(method))
    rows.append(memory_row(label, compiled, compile_s))
    log(
      f"  memory {label}: temp {rows[-1]['temp_size_in_bytes'] / 2**20:.0f} MiB (compile {compile_s:.1f} s)"
    )
  return rows


def matmul_flops_per_second(size: int = 2048, repeats: int = 5) -> dict:
  """Achieved FLOP/s of a [size, size] @ [size, size] float32 matmul (XLA's, on the same cores)."""
  a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
  matmul = jax.jit(jnp.matmul)
  jax.block_until_ready(matmul(a, b))
  times = [timed(lambda: jax.block_until_ready(matmul(a, b))) for _ in range(repeats)]
  seconds = float(np.median([t[0] for t in times]))
  cpu_seconds = float(np.median([t[1] for t in times]))
  return dict(
    size=size,
    seconds=seconds,
    cpu_seconds=cpu_seconds,
    flops=2.0 * size**3,
    flops_per_s=2.0 * size**3 / seconds,
  )


def forward_flops(config: T5Config, encoder_length: int, decoder_length: int) -> dict:
  """Matmul FLOPs of one example's forward pass (2 per multiply-add), by part.

  Per encoder token and layer: q, k, v, o projections (4 d*inner) and the gated feed-forward
  (3 d*d_ff), attention scores and weighted sum (2 L_enc*inner). Per decoder token and layer the same
  with causal self-attention over L_dec, cross-attention q/o (2 d*inner) and scores over L_enc, while
  the cross-attention k/v (2 d*inner) run per encoder token; the head (d*V) per decoder token.
  """
  d, inner, d_ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  ff = (3 if config.is_gated else 2) * d * d_ff
  encoder = encoder_length * config.num_layers * (4 * d * inner + ff + 2 * encoder_length * inner)
  decoder = config.num_decoder_layers * (
    decoder_length
    * (4 * d * inner + 2 * decoder_length * inner + 2 * d * inner + 2 * encoder_length * inner + ff)
    + encoder_length * 2 * d * inner
  )
  head = decoder_length * d * config.vocab_size
  parts = dict(encoder=2 * encoder, decoder=2 * decoder, head=2 * head)
  parts["total"] = sum(parts.values())
  return parts


def maml_flop_estimate(config: T5Config, encoder_length: int, decoder_length: int) -> dict:
  """Analytic FLOPs of one second-order MAML step (2 tasks x 2 support + 2 query examples).

  F = one example's forward. The weights are frozen, so a backward pass only propagates activation
  gradients (dy @ W^T per matmul, no dW = x^T @ dy): B ~ F, and a gradient w.r.t. the prompt costs
  F + B ~ 2F (not the ~3F of training, where weight gradients double the backward). The meta-gradient
  differentiates the support gradient once more: the reverse pass over the support's forward and
  backward costs another ~2F (each matmul of the backward, dy @ W^T, reverses into one matmul with the
  constant W). So a support example costs ~4F and a query example (forward + backward) ~2F. Attention
  (both operands are activations) and elementwise ops add a little that this count leaves out.
  """
  s = STEPS["maml"]
  f = forward_flops(config, encoder_length, decoder_length)["total"]
  support = s["tasks"] * s["inner_steps"] * s["support"]
  query = s["tasks"] * s["query"]
  return dict(
    forward_per_example=f,
    support_examples=support,
    query_examples=query,
    estimate=f * (4 * support + 2 * query),
  )


def two_params_tokens(config: T5Config, encoder_length: int, decoder_length: int) -> int:
  """The 2 x params x tokens rule per stack: encoder matmul weights x encoder tokens, decoder and head
  weights x decoder tokens (the embedding lookup is not a matmul; attention scores are left out)."""
  d, inner, d_ff = config.d_model, config.num_heads * config.d_kv, config.d_ff
  ff = (3 if config.is_gated else 2) * d * d_ff
  encoder = config.num_layers * (4 * d * inner + ff)
  decoder = config.num_decoder_layers * (8 * d * inner + ff) + d * config.vocab_size
  return 2 * (encoder * encoder_length + decoder * decoder_length)


def flop_rates(name: str, model: T5, maml_compiled, maml_row: dict) -> dict:
  cfg = CONFIGS[name]
  matmul = matmul_flops_per_second()
  encoder_length = cfg["prompt_length"] + cfg["input_length"]
  estimate = maml_flop_estimate(model.config, encoder_length, cfg["output_length"])
  cost = float(maml_compiled.cost_analysis()["flops"])
  examples = estimate["support_examples"] + estimate["query_examples"]
  result = dict(
    cost_analysis_flops=cost,
    analytic_flops=estimate["estimate"],
    forward_per_example=estimate["forward_per_example"],
    examples=examples,
    two_params_tokens=two_params_tokens(model.config, encoder_length, cfg["output_length"]),
    step_s=maml_row["ours_s"],
    step_cpu_s=maml_row["ours_cpu_s"],
    achieved_flops_per_s=cost / maml_row["ours_s"],
    achieved_flops_per_cpu_s=cost / maml_row["ours_cpu_s"],
    matmul=matmul,
    fraction_of_matmul=(cost / maml_row["ours_s"]) / matmul["flops_per_s"],
  )
  log(
    f"  FLOPs: cost analysis {cost / 1e9:.1f} G, analytic {estimate['estimate'] / 1e9:.1f} G; "
    f"achieved {result['achieved_flops_per_s'] / 1e9:.1f} GFLOP/s vs matmul "
    f"{matmul['flops_per_s'] / 1e9:.1f} GFLOP/s"
  )
  return result


# --------------------------------------------------------------------------------------------------
# Machine record and tables
# --------------------------------------------------------------------------------------------------
def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo ("unknown" where there is none)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return "unknown"


def machine_record(cores: list[int]) -> dict:
  import flax
  import optax
  import torch
  import transformers

  num_cores = len(os.sched_getaffinity(0))
  return dict(
    cpu_model=cpu_model(),
    logical_cpus_on_machine=os.cpu_count(),
    cores_used=cores,
    torch_threads=torch.get_num_threads(),
    torch_interop_threads=torch.get_num_interop_threads(),
    xla_threads=f"XLA's CPU thread pool sized from the process affinity ({num_cores} "
    f"core{'s' if num_cores > 1 else ''})",
    load_average_at_start=os.getloadavg(),
    xla_flags=os.environ.get("XLA_FLAGS", ""),
    host_malloc=HOST_MALLOC,
    python=platform.python_version(),
    platform=platform.platform(),
    jax=jax.__version__,
    jaxlib=importlib.metadata.version("jaxlib"),
    flax=flax.__version__,
    optax=optax.__version__,
    torch=torch.__version__,
    transformers=transformers.__version__,
    higher=importlib.metadata.version("higher"),
    numpy=np.__version__,
    date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
  )


def mib(num_bytes) -> str:
  return f"{num_bytes / 2**20:,.1f}"


def grid_against_pt(timing: list[dict]) -> list[str]:
  """Per configuration timed with both: our grid step against our PT step times its R runs (issue 31 asks
  that the grid be no slower than its runs one by one), from the medians and from the fastest calls."""
  pt_rows = {r["config"]: r for r in timing if r["method"] == "pt"}
  lines = []
  for grid in (r for r in timing if r["method"] == "grid" and r["config"] in pt_rows):
    name, pt = grid["config"], pt_rows[grid["config"]]
    runs = CONFIGS[name]["grid_runs"]
    median = grid["ours_s"] / (runs * pt["ours_s"])
    fastest = min(grid["ours_all_s"]) / (runs * min(pt["ours_all_s"]))
    lines.append(
      f"Our grid against our PT step x {runs} runs, `{name}`: medians {grid['ours_s']:.4f} s / "
      f"({runs} x {pt['ours_s']:.4f} s) = **{median:.2f}**; fastest calls {fastest:.2f}."
    )
  return lines


def markdown(results: dict) -> str:
  m = results["machine"]
  lines = [
    f"`{results['command']}`: {m['cpu_model']}, {len(m['cores_used'])} core(s) used of "
    f"{m['logical_cpus_on_machine']} logical CPUs; torch threads {m['torch_threads']}, "
    f"{m['xla_threads']}; host malloc {m.get('host_malloc') or 'system'} (mpt_jax/host_memory.py). Python {m['python']}, jax {m['jax']}, flax {m['flax']}, torch "
    f"{m['torch']}, transformers {m['transformers']}, higher {m['higher']}. Load average at "
    f"start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'])}. {m['date']}"
    + (f"; total {results['total_s'] / 60:.0f} min." if results.get("total_s") else "."),
    "",
  ]
  for name, shape in results["shapes"].items():
    lines.append(f"- `{name}`: {shape}")
  lines += [
    "",
    "### Faithfulness of the baseline (dropout off; relative L2 errors vs ours)",
    "",
    "| config | step | inner lr | loss ours | loss baseline | gradient error | update error |",
    "|---|---|---|---|---|---|---|",
  ]
  for r in results["faithfulness"]:
    lines.append(
      f"| {r['config']} | {r['method']} | {r['inner_lr']:g} | {r['loss_ours']:.6f} | "
      f"{r['loss_baseline']:.6f} | {r['grad_rel_error']:.1e} | {r['update_rel_error']:.1e} |"
    )
  gaps = [
    f"{r['config']} {r['first_order_gap']:.2f}" for r in results["faithfulness"] if "first_order_gap" in r
  ]
  lines += [
    "",
    f"Tolerance {results['tolerance']:g} (abort above). Relative difference between "
    f"second- and first-order MAML gradients on the checked episode, i.e. what the check "
    f"must be able to see: {', '.join(gaps)}.",
    "",
    "### Step time (median wall seconds; dropout 0.1 on both sides)",
    "",
    "| config | step | ours (s) | baseline (s) | ours / baseline | ours compile (s) | "
    "ours CPU (s) | baseline CPU (s) | timed (+warm-up) calls |",
    "|---|---|---|---|---|---|---|---|---|",
  ]
  for r in results["timing"]:
    lines.append(
      f"| {r['config']} | {r['title']} | {r['ours_s']:.4f} | {r['baseline_s']:.4f} | "
      f"**{r['ratio']:.2f}** | {r['ours_compile_s']:.1f} | {r['ours_cpu_s']:.3f} | "
      f"{r['baseline_cpu_s']:.3f} | {r['repeats']} (+{r['warmup']}) |"
    )
  grid_lines = grid_against_pt(results["timing"])
  if grid_lines:
    lines += ["", *grid_lines]
  profiled = [r for r in results["timing"] if "profile" in r]
  if profiled:
    lines += [
      "",
      "### Where the time goes (one profiled call per side; seconds)",
      "",
      "ours: jax.profiler trace, one event per executed HLO op, classified by the JAX op it "
      'came from; baseline: torch.profiler self CPU time per aten op. "outside ops" = wall '
      "time minus the ops' time (dispatch, Python, framework).",
      "",
      "| config | step | side | wall | " + " | ".join(PROFILE_CATEGORIES) + " | matmul GFLOP/s |",
      "|---|---|---|---|" + "---|" * len(PROFILE_CATEGORIES) + "---|",
    ]
    for r in profiled:
      for side in ("ours", "baseline"):
        p = r["profile"][side]
        lines.append(
          f"| {r['config']} | {r['method']} | {side} | {p['wall_s']:.3f} | "
          + " | ".join(f"{p['seconds'][c]:.3f}" for c in PROFILE_CATEGORIES)
          + f" | {p['matmul_flops_per_s'] / 1e9:.1f} |"
        )
    for r in profiled:
      if r["config"] == "tiny":
        continue
      groups = ", ".join(
        f"{g['op']} {g['seconds']:.2f} s at {g['flops_per_s'] / 1e9:.1f} GFLOP/s"
        for g in r["profile"]["ours"]["matmul_groups"][:6]
      )
      lines.append(f"\nSlowest matmuls (summed over layers), {r['config']} {r['method']}, ours: {groups}.")
      for side in ("ours", "baseline"):
        top = ", ".join(
          f"{t['op']} ({t['category']}) {t['seconds']:.2f} s" for t in r["profile"][side]["top"][:6]
        )
        lines.append(f"\nTop ops, {r['config']} {r['method']}, {side}: {top}.")
  no_dropout = [r for r in results["faithfulness"] if "ours_no_dropout_grad_s" in r]
  if no_dropout:
    timings = "; ".join(
      f"{r['config']}: ours {r['ours_no_dropout_grad_s']:.4f} s, baseline "
      f"{r['baseline_no_dropout_grad_s']:.4f} s, ratio "
      f"{r['ours_no_dropout_grad_s'] / r['baseline_no_dropout_grad_s']:.2f}"
      for r in no_dropout
    )
    lines += ["", f"MAML meta-gradient without dropout (from the check; no optimizer update): {timings}."]
  if results.get("memory"):
    lines += [
      "",
      "### Compiled memory of our MAML step (T5-small shape; XLA buffer assignment)",
      "",
      "| variant | temp (MiB) | arguments (MiB) | outputs (MiB) | aliased (MiB) | "
      "GFLOP (cost analysis) | compile (s) |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in results["memory"]:
      lines.append(
        f"| {r['variant']} | {mib(r['temp_size_in_bytes'])} | "
        f"{mib(r['argument_size_in_bytes'])} | {mib(r['output_size_in_bytes'])} | "
        f"{mib(r['alias_size_in_bytes'])} | {r['flops'] / 1e9:,.1f} | "
        f"{r['compile_s']:.1f} |"
      )
  if results.get("flops"):
    f = results["flops"]
    matmul_per_cpu_s = f["matmul"]["flops"] / f["matmul"]["cpu_seconds"]
    lines += [
      "",
      "### FLOP/s of our MAML step vs a float32 matmul (T5-small shape)",
      "",
      "| quantity | value |",
      "|---|---|",
      f"| MAML step FLOPs, XLA cost analysis | {f['cost_analysis_flops'] / 1e9:,.1f} G |",
      f"| MAML step FLOPs, analytic (matmuls; 4 F per support, 2 F per query example) | "
      f"{f['analytic_flops'] / 1e9:,.1f} G |",
      f"| F = forward FLOPs per example: analytic / 2 x params x tokens (per stack) | "
      f"{f['forward_per_example'] / 1e9:,.2f} G / {f['two_params_tokens'] / 1e9:,.2f} G |",
      f"| MAML step: median wall / CPU time | {f['step_s']:.3f} s / {f['step_cpu_s']:.3f} s |",
      f"| float32 matmul {f['matmul']['size']}^2 x {f['matmul']['size']} (XLA), same cores: "
      f"median wall / CPU time | {f['matmul']['seconds']:.3f} s / "
      f"{f['matmul']['cpu_seconds']:.3f} s |",
      f"| achieved per wall second: MAML step / matmul | "
      f"{f['achieved_flops_per_s'] / 1e9:,.1f} / {f['matmul']['flops_per_s'] / 1e9:,.1f} "
      f"GFLOP/s = **{f['fraction_of_matmul']:.0%}** |",
      f"| achieved per CPU second (less exposed to other processes): MAML step / matmul | "
      f"{f['achieved_flops_per_cpu_s'] / 1e9:,.1f} / {matmul_per_cpu_s / 1e9:,.1f} GFLOP/s = "
      f"**{f['achieved_flops_per_cpu_s'] / matmul_per_cpu_s:.0%}** |",
    ]
  return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def shapes_line(name: str) -> str:
  cfg = CONFIGS[name]
  c = cfg["model"]
  return (
    f"d_model {c['d_model']}, {c['num_layers']}+{c['num_decoder_layers']} layers, "
    f"{c['num_heads']} heads x d_kv {c['d_kv']}, d_ff {c['d_ff']} gated-GELU, vocab "
    f"{c['vocab_size']}, untied head; prompt {cfg['prompt_length']}, input "
    f"{cfg['input_length']}, output {cfg['output_length']} tokens; grid of "
    f"{cfg['grid_runs']} runs"
  )


def run_config(name: str, args, results: dict) -> None:
  import torch

  from benchmarks import torch_reference as reference

  cfg = CONFIGS[name]
  log(f"== {name}: {shapes_line(name)}")
  results["shapes"][name] = shapes_line(name)
  model = build_model(name, dropout_rate=TIMING_DROPOUT)
  params = jax.device_put(random_params(model))
  prompt = initial_prompt(params, cfg["prompt_length"])
  batches = make_batches(name)
  torch_model = reference.build_torch_t5(model.config, params, dropout_rate=TIMING_DROPOUT)
  torch.manual_seed(0)

  results["faithfulness"] += check_faithfulness(
    name, params, prompt, batches, torch_model, tolerance=args.tolerance
  )
  write_results(results, args.out)
  if args.check_only:
    return
  compiled_steps = {}
  methods = args.only.split(",") if args.only else METHODS
  for method in methods:
    repeats = args.repeats or (3 if args.quick else cfg["repeats"][method])
    row, compiled_steps[method] = time_method(
      name,
      method,
      model,
      params,
      prompt,
      batches[method],
      torch_model,
      repeats,
      cfg["warmup"][method],
      profile=args.profile or method in cfg["profile"],
    )
    results["timing"].append(row)
    write_results(results, args.out)

  if name == "small" and not args.only:
    maml_row = next(r for r in results["timing"] if r["config"] == name and r["method"] == "maml")
    results["flops"] = flop_rates(name, model, compiled_steps["maml"], maml_row)
    results["memory"] = memory_variants(
      name, params, prompt, batches, compiled_steps["maml"], maml_row["ours_compile_s"]
    )
    write_results(results, args.out)


def write_results(results: dict, out: Path) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "steps.json").write_text(json.dumps(results, indent=2) + "\n")
  (out / "steps.md").write_text(markdown(results))


def main():
  import torch

  args = ARGS
  if args.gpu:
    from benchmarks import gpu_table

    gpu_table.main(args)
    return
  if args.render:
    results = json.loads((args.out / "steps.json").read_text())
    write_results(results, args.out)
    print(markdown(results))
    return
  torch.set_num_threads(len(CORES))
  configs = args.configs.split(",") if args.configs else (["tiny"] if args.quick else ["tiny", "small"])
  unknown = [c for c in configs if c not in CONFIGS]
  unknown += [m for m in (args.only.split(",") if args.only else []) if m not in METHODS]
  if unknown:
    raise SystemExit(
      f"--configs / --only: unknown {unknown}; choose from {sorted(CONFIGS)} / {list(METHODS)}"
    )
  results = dict(
    command=" ".join(["python -m benchmarks.bench_steps", *sys.argv[1:]]),
    machine=machine_record(CORES),
    tolerance=args.tolerance,
    shapes={},
    steps=STEPS,
    faithfulness=[],
    timing=[],
    memory=[],
    flops=None,
  )
  log(f"machine: {json.dumps(results['machine'])}")
  start = time.perf_counter()
  for name in configs:
    run_config(name, args, results)
  results["total_s"] = time.perf_counter() - start
  write_results(results, args.out)
  print(markdown(results))
  log(f"done in {results['total_s']:.0f} s; wrote {args.out / 'steps.md'} and steps.json")


if __name__ == "__main__":
  main()
