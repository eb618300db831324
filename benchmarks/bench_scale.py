"""Issue 13's CPU measurements: length buckets, the compilation cache, scanned layers, dev decoding.

    python -m benchmarks.bench_scale                      # every section (~40 min on one shared core)
    python -m benchmarks.bench_scale --only buckets,scan  # a subset: buckets, cache, scan, dev_eval

Sections (each writes its rows to OUT/scale.json and the tables to OUT/scale.md, default
benchmarks/results/):
- buckets: the study's PT grid (batch 16 per run; --grid_runs, default 4 of the study's 20) and MAML
  step (2 tasks x (2 + 2)) on WordNet-gym
  batches, padded to 512 input / 128 (grid) or 64 (MAML) target tokens against the same examples cut to
  length buckets (multiples of 64 / 16), on the small T5 of assets/small_t5 with the study's 100-row
  prompt and dropout 0.1: compile and step time.
- cache: a cold and a warm process compiling the T5-small-shaped MAML step with JAX's persistent cache
  (mpt_jax/compilation.py): trace + lower, compile (or load), and the cache's hits and misses.
- scan: the T5-small-shaped (8 + 8 layers) MAML and PT steps with per-layer (unrolled) and scanned
  blocks: compile time, step time, compiled temporary memory.
- depth: compile time of the PT and MAML steps against depth (2, 8, 16 layers per stack at T5-small
  width), unrolled and scanned: what is fixed and what grows per layer (the study's T5-large has 24).
- dev_eval: one dev evaluation of the 20-run grid (greedy, beam search with the study's 4 beams and
  repetition penalty, rank classification) against a grid step, on the small T5 and a WordNet target
  task, bucketed and padded: the evaluation's share of the downstream time at one evaluation per 50 steps.
Timings are medians of interleaved calls in one process on one pinned core (`--threads`); read them as
ratios within a run (benchmarks/README.md explains the machine's noise).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ("buckets", "cache", "scan", "depth", "dev_eval")


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
  parser.add_argument("--threads", type=int, default=1, help="cores to pin the process to (default 1)")
  parser.add_argument("--repeats", type=int, default=3, help="timed calls per variant")
  # 4 runs (one seed's learning rates): a padded 20-run grid step takes minutes per call on one core;
  # step times scale with the runs, so the bucketed / padded ratio does not depend on them.
  parser.add_argument("--grid_runs", type=int, default=4, help="runs of the PT grid (the study: 20)")
  parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
  parser.add_argument("--render", action="store_true", help="only rewrite OUT/scale.md from OUT/scale.json")
  return parser.parse_args(argv)


if __name__ == "__main__":
  ARGS = parse_args()
  cores = sorted(os.sched_getaffinity(0))[: ARGS.threads]
  os.sched_setaffinity(0, cores)  # before JAX starts: XLA sizes its thread pool from the affinity
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from mpt_jax import host_memory

  host_memory.reuse_freed_memory()  # as the entry points do, before JAX starts
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from benchmarks import bench_steps  # noqa: E402
from mpt_jax import algorithms, decode, gyms, methods, optim  # noqa: E402
from mpt_jax.config import SEEDS  # noqa: E402
from mpt_jax.data import batching, crossfit, settings as settings_lib  # noqa: E402
from mpt_jax.model import hf  # noqa: E402
from mpt_jax.model.t5 import T5, stack_blocks  # noqa: E402

SMALL_T5 = REPO / "assets" / "small_t5"
SETTING = "wn_cls2cls"
TARGET_TASK = "wn-noun_category_living"
PROMPT_LENGTH = 100
BUCKETS = batching.LengthBuckets(input_multiple=64, target_multiple=16)
GRID_LRS = (0.5, 0.4, 0.3, 0.2)
EVAL_EVERY = 50


def log(message: str) -> None:
  print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def timed_calls(functions: dict, repeats: int, warmup: int = 1) -> dict[str, dict]:
  """Interleaved calls of several functions (name -> fn returning arrays): median wall and CPU s."""
  for fn in functions.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in functions}
  for _ in range(repeats):
    for name, fn in functions.items():
      wall, cpu = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn())
      times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
  return {
    name: dict(
      median_s=float(np.median([t[0] for t in ts])),
      cpu_s=float(np.median([t[1] for t in ts])),
      all_s=[t[0] for t in ts],
    )
    for name, ts in times.items()
  }


def compile_timed(jitted, *args) -> tuple[object, dict]:
  """(compiled, {lower_s, compile_s, temp_bytes}) of jitted at these arguments."""
  start = time.perf_counter()
  lowered = jitted.lower(*args)
  lower_s = time.perf_counter() - start
  start = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  temp = compiled.memory_analysis().temp_size_in_bytes
  return compiled, dict(lower_s=lower_s, compile_s=compile_s, temp_bytes=int(temp))


def study_prompt(params, seed: int = 1) -> np.ndarray:
  return bench_steps.initial_prompt(params, PROMPT_LENGTH, seed)


# --------------------------------------------------------------------------------------------------
# WordNet gym data and the small T5
# --------------------------------------------------------------------------------------------------
def wordnet_tokenized(tokenizer, target_length: int, tasks):
  data_dir = gyms.data_dir("wordnet", tempfile.gettempdir())
  spec = batching.TextSpec(batching.MAX_INPUT_LENGTH, target_length)
  return batching.tokenize_tasks(crossfit.read_crossfit(data_dir, tasks, SEEDS), tokenizer, spec)


def small_t5(dropout_rate: float):
  model, params, tokenizer = hf.load_pretrained(SMALL_T5)
  return T5(model.config.replace(dropout_rate=dropout_rate)), jax.device_put(params), tokenizer


def common_bucket_step(sampler, steps: int = 40) -> int:
  """A step whose bucketed batch has the most frequent bucketed shape (the one a run mostly meets)."""
  shapes = {}
  for step in range(steps):
    batch = sampler(step)
    first = batch["support"] if "support" in batch else batch
    shapes.setdefault((first["input_ids"].shape[-1], first["target_ids"].shape[-1]), []).append(step)
  return max(shapes.values(), key=len)[0]


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def section_buckets(args, results) -> None:
  gyms.ensure("wordnet")
  setting = settings_lib.get_setting(SETTING)
  model, params, tokenizer = small_t5(dropout_rate=0.1)
  prompt = study_prompt(params)
  rows = []
  # MAML upstream: episodes of the setting's source tasks.
  tokenized = wordnet_tokenized(tokenizer, batching.UPSTREAM_TARGET_LENGTH, setting.source)
  tasks = batching.meta_tasks(tokenized, list(setting.source), SEEDS)
  samplers = {
    name: batching.EpisodeSampler(tasks, 2, 1, 2, 2, seed=0, buckets=b)
    for name, b in (("padded", batching.NO_BUCKETS), ("bucketed", BUCKETS))
  }
  step = common_bucket_step(samplers["bucketed"])
  optimizer = optim.make_optimizer("adafactor", 0.5)
  loss_fn = algorithms.make_loss_fn(model, deterministic=False)
  maml = algorithms.jit_step(methods.make_step("maml", loss_fn, optimizer, inner_lr=3e-5))
  rows.append(
    _time_variants(
      "MAML step, 2 tasks x (2 + 2)",
      maml,
      samplers,
      step,
      params,
      lambda: algorithms.init_state(jnp.asarray(prompt), optimizer),
      jax.random.key(0),
      args.repeats,
    )
  )
  # The downstream grid: 5 seeds x 4 learning rates on the target task.
  tokenized = wordnet_tokenized(tokenizer, batching.DOWNSTREAM_TARGET_LENGTH, [TARGET_TASK])
  runs = [s for s in SEEDS for _ in GRID_LRS][: args.grid_runs]
  train = {s: tokenized[(TARGET_TASK, s, "train")] for s in SEEDS}
  samplers = {
    name: batching.GridSampler.create(train, runs, 16, buckets=b)
    for name, b in (("padded", batching.NO_BUCKETS), ("bucketed", BUCKETS))
  }
  grid_optimizer = optim.make_optimizer("adafactor", 1.0)
  grid = jax.jit(
    algorithms.make_grid_step(methods.make_step("pt", loss_fn, grid_optimizer)), donate_argnums=(0,)
  )
  lrs = np.resize(np.asarray(GRID_LRS, np.float32), len(runs))
  step = common_bucket_step(samplers["bucketed"])
  rows.append(
    _time_variants(
      f"PT grid step, {len(runs)} runs x 16",
      grid,
      samplers,
      step,
      params,
      lambda: algorithms.init_grid_state(jnp.asarray(prompt), grid_optimizer, lrs),
      jax.random.split(jax.random.key(0), len(runs)),
      args.repeats,
    )
  )
  results["buckets"] = dict(
    model=str(SMALL_T5.relative_to(REPO)),
    setting=SETTING,
    target=TARGET_TASK,
    buckets=dict(input=BUCKETS.input_multiple, target=BUCKETS.target_multiple),
    rows=rows,
  )


def _time_variants(title, jitted, samplers, step, params, make_state, rng, repeats) -> dict:
  """Compile and time `jitted` on the padded and the bucketed batch of the same step (same examples)."""
  row = dict(step=title, sample_step=step, variants={})
  functions = {}
  for name, sampler in samplers.items():
    batch = jax.device_put(sampler(step))
    first = batch["support"] if "support" in batch else batch
    state = make_state()
    compiled, info = compile_timed(jitted, state, params, batch, rng)
    holder = {"state": state}

    def call(compiled=compiled, holder=holder, batch=batch):
      holder["state"], metrics = compiled(holder["state"], params, batch, rng)
      return metrics["loss"]

    functions[name] = call
    row["variants"][name] = dict(
      shape=f"{first['input_ids'].shape[-1]} x {first['target_ids'].shape[-1]}", **info
    )
    log(f"  {title} {name}: shape {row['variants'][name]['shape']}, compile {info['compile_s']:.1f} s")
  for name, timing in timed_calls(functions, repeats).items():
    row["variants"][name].update(timing)
  row["ratio"] = row["variants"]["bucketed"]["median_s"] / row["variants"]["padded"]["median_s"]
  log(f"  {title}: bucketed / padded = {row['ratio']:.3f}")
  return row


CACHE_PROCESS = r"""
import json, sys, time
sys.path.insert(0, sys.argv[2])
import jax, jax.numpy as jnp
from benchmarks import bench_steps
from mpt_jax import algorithms, compilation, methods, optim
start = time.perf_counter()
compilation.enable_persistent_cache(sys.argv[1])
model = bench_steps.build_model("small", dropout_rate=0.1)
params = jax.device_put(bench_steps.random_params(model))
prompt = bench_steps.initial_prompt(params, 100)
optimizer = optim.make_optimizer("adafactor", 0.5)
step = algorithms.jit_step(methods.make_step(
    "maml", algorithms.make_loss_fn(model, deterministic=False), optimizer, inner_lr=3e-5))
state = algorithms.init_state(jnp.asarray(prompt), optimizer)
batch = jax.device_put(bench_steps.make_batches("small")["maml"])
ready = time.perf_counter() - start
with compilation.count_cache_events() as events:
  t = time.perf_counter(); lowered = step.lower(state, params, batch, jax.random.key(0))
  lower_s = time.perf_counter() - t
  t = time.perf_counter(); compiled = lowered.compile(); compile_s = time.perf_counter() - t
  t = time.perf_counter(); jax.block_until_ready(compiled(state, params, batch, jax.random.key(0)))
  first_call_s = time.perf_counter() - t
print(json.dumps(dict(setup_s=ready, lower_s=lower_s, compile_s=compile_s, first_call_s=first_call_s,
                      hits=events.hits, misses=events.misses, process_s=time.perf_counter() - start)))
"""


def section_cache(args, results) -> None:
  rows = []
  with tempfile.TemporaryDirectory(prefix="jax_cache_") as cache_dir:
    for label in ("cold (empty cache)", "warm (second process)"):
      start = time.perf_counter()
      out = subprocess.run(
        [sys.executable, "-c", CACHE_PROCESS, cache_dir, str(REPO)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
      )
      row = dict(
        process=label, wall_s=time.perf_counter() - start, **json.loads(out.stdout.strip().splitlines()[-1])
      )
      rows.append(row)
      log(
        f"  cache {label}: lower {row['lower_s']:.1f} s, compile {row['compile_s']:.1f} s, hits "
        f"{row['hits']}, misses {row['misses']}"
      )
    size = sum(f.stat().st_size for f in Path(cache_dir).rglob("*") if f.is_file())
  results["cache"] = dict(
    step="T5-small-shaped MAML step (8 + 8 layers, unrolled), 2 tasks x (2 + 2), "
    "input 128 / output 16, prompt 100",
    cache_bytes=size,
    rows=rows,
  )


def section_scan(args, results) -> None:
  model = bench_steps.build_model("small", dropout_rate=0.1)
  scanned = T5(model.config.replace(scan_layers=True))
  params = jax.device_put(bench_steps.random_params(model))
  stacked = jax.device_put(stack_blocks(params))
  prompt = bench_steps.initial_prompt(params, 100)
  batches = bench_steps.make_batches("small")
  rows = []
  for method in ("maml", "pt"):
    functions, row = {}, dict(step=bench_steps.step_title("small", method), variants={})
    for name, m, p in (("unrolled", model, params), ("scanned", scanned, stacked)):
      jitted, optimizer = bench_steps.our_timed_step(method, m)
      state = algorithms.init_state(jnp.asarray(prompt), optimizer)
      batch = jax.device_put(batches[method])
      compiled, info = compile_timed(jitted, state, p, batch, jax.random.key(0))
      holder = {"state": state}

      def call(compiled=compiled, holder=holder, p=p, batch=batch):
        holder["state"], metrics = compiled(holder["state"], p, batch, jax.random.key(0))
        return metrics["loss"]

      functions[name] = call
      row["variants"][name] = info
      log(
        f"  scan {method} {name}: lower {info['lower_s']:.1f} s, compile {info['compile_s']:.1f} s, "
        f"temp {info['temp_bytes'] / 2**20:.0f} MiB"
      )
    for name, timing in timed_calls(functions, args.repeats).items():
      row["variants"][name].update(timing)
    row["step_ratio"] = row["variants"]["scanned"]["median_s"] / row["variants"]["unrolled"]["median_s"]
    row["compile_ratio"] = (
      row["variants"]["scanned"]["lower_s"] + row["variants"]["scanned"]["compile_s"]
    ) / (row["variants"]["unrolled"]["lower_s"] + row["variants"]["unrolled"]["compile_s"])
    log(
      f"  scan {method}: step scanned / unrolled {row['step_ratio']:.3f}, compile {row['compile_ratio']:.3f}"
    )
    rows.append(row)
  results["scan"] = dict(shape=bench_steps.shapes_line("small"), rows=rows)


def section_depth(args, results) -> None:
  rows = []
  batches = bench_steps.make_batches("small")
  for method in ("pt", "maml"):
    for layers in (2, 8, 16):
      for scan in (False, True):
        unrolled = T5(
          bench_steps.build_model("small", dropout_rate=0.1).config.replace(
            num_layers=layers, num_decoder_layers=layers
          )
        )
        params = bench_steps.random_params(unrolled)
        model = T5(unrolled.config.replace(scan_layers=scan))
        jitted, optimizer = bench_steps.our_timed_step(method, model)
        state = algorithms.init_state(jnp.asarray(bench_steps.initial_prompt(params, 100)), optimizer)
        _, info = compile_timed(
          jitted,
          state,
          stack_blocks(params) if scan else params,
          jax.device_put(batches[method]),
          jax.random.key(0),
        )
        rows.append(dict(step=method, layers=layers, blocks="scanned" if scan else "unrolled", **info))
        log(
          f"  depth {method} {layers} layers {rows[-1]['blocks']}: lower {info['lower_s']:.1f} s, compile "
          f"{info['compile_s']:.1f} s"
        )
  results["depth"] = dict(shape=bench_steps.shapes_line("small").replace("8+8 layers, ", ""), rows=rows)


def section_dev_eval(args, results) -> None:
  model, params, tokenizer = small_t5(dropout_rate=0.0)  # decoding draws no dropout
  train_model = T5(model.config.replace(dropout_rate=0.1))
  tokenized = wordnet_tokenized(tokenizer, batching.DOWNSTREAM_TARGET_LENGTH, [TARGET_TASK])
  runs = [s for s in SEEDS for _ in GRID_LRS][: args.grid_runs]
  dev = [tokenized[(TARGET_TASK, s, "dev")] for s in runs]
  train = {s: tokenized[(TARGET_TASK, s, "train")] for s in SEEDS}
  candidates = decode.label_candidates(train[SEEDS[0]])
  max_length = 127  # the study's generate(max_length=128)
  vmapped = lambda one: jax.jit(jax.vmap(one))
  decoders = {
    "greedy, vmapped over runs": vmapped(
      lambda p, ids, mask: decode.greedy_decode(model, params, ids, mask, p, max_length=max_length)
    ),
    "greedy, runs as one batch": jax.jit(
      lambda p, ids, mask: decode.greedy_decode_runs(model, params, ids, mask, p, max_length=max_length)
    ),
    "beam (4 beams, penalty 2.5, early stopping), vmapped": vmapped(
      lambda p, ids, mask: decode.beam_search(
        model,
        params,
        ids,
        mask,
        p,
        max_length=max_length,
        num_beams=4,
        repetition_penalty=2.5,
        early_stopping=True,
      )
    ),
    "rank classification, vmapped": vmapped(
      lambda p, ids, mask: decode.rank_classify(model, params, ids, mask, p, candidates=candidates)
    ),
  }
  optimizer = optim.make_optimizer("adafactor", 1.0)
  grid = jax.jit(
    algorithms.make_grid_step(
      methods.make_step("pt", algorithms.make_loss_fn(train_model, deterministic=False), optimizer)
    ),
    donate_argnums=(0,),
  )
  sampler = batching.GridSampler.create(train, runs, 16, buckets=BUCKETS)
  initial = jnp.asarray(np.stack([study_prompt(params, seed=r) for r in range(len(runs))]))
  states = algorithms.init_grid_state(
    initial, optimizer, np.resize(np.asarray(GRID_LRS, np.float32), len(runs))
  )
  train_steps = 30
  for step in range(train_steps):  # prompts that have started to learn the task, as most evaluations see
    states, _ = grid(
      states, params, jax.device_put(sampler(step)), jax.random.split(jax.random.key(step), len(runs))
    )
  trained = jnp.array(states.prompt)
  holder = {"states": states, "batch": jax.device_put(sampler(train_steps))}
  rngs = jax.random.split(jax.random.key(0), len(runs))

  def grid_step():
    holder["states"], metrics = grid(holder["states"], params, holder["batch"], rngs)
    return metrics["loss"]

  evals = {
    label: [jax.device_put(eb.batch) for eb in batching.grid_eval_batches(dev, 32, buckets)]
    for label, buckets in (("bucketed", BUCKETS), ("padded", batching.NO_BUCKETS))
  }
  rows = []
  for prompts_label, prompts in (("initial prompts", initial), (f"after {train_steps} steps", trained)):
    functions, generated = {"grid step": grid_step}, {}
    variants = [(name, "bucketed") for name in decoders] + [("greedy, runs as one batch", "padded")]
    for name, padding in variants:
      decoder, batches = decoders[name], evals[padding]

      def evaluate(decoder=decoder, batches=batches):
        return [decoder(prompts, b["input_ids"], b["input_mask"]) for b in batches]

      functions[(name, padding)] = evaluate
      if not name.startswith("rank"):
        tokens = np.concatenate([np.asarray(t).reshape(-1, max_length) for t in evaluate()])
        generated[(name, padding)] = float((tokens != model.config.pad_token_id).sum(-1).mean())
    timing = timed_calls(functions, min(args.repeats, 2))
    step_s = timing.pop("grid step")["median_s"]
    for (name, padding), t in timing.items():
      share = t["median_s"] / (EVAL_EVERY * step_s + t["median_s"])
      rows.append(
        dict(
          prompts=prompts_label,
          decoding=name,
          padding=padding,
          input_length=int(evals[padding][0]["input_ids"].shape[-1]),
          eval_s=t["median_s"],
          all_s=t["all_s"],
          grid_step_s=step_s,
          share=share,
          mean_generated_tokens=generated.get((name, padding)),
        )
      )
      log(
        f"  dev eval, {prompts_label}, {name}, {padding}: {t['median_s']:.2f} s per evaluation (grid step "
        f"{step_s:.2f} s): share {share:.1%}, {generated.get((name, padding))} tokens on average"
      )
  results["dev_eval"] = dict(
    model=str(SMALL_T5.relative_to(REPO)),
    task=TARGET_TASK,
    runs=len(runs),
    dev_examples=len(dev[0]),
    eval_batch_size=32,
    eval_every=EVAL_EVERY,
    train_steps=train_steps,
    rows=rows,
  )


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------
def run_line(section: dict) -> str:
  m = section["machine"]
  return (
    f"`{section['command']}` ({section['section_s'] / 60:.1f} min): {m['cpu']}, {m['cores']} core(s) "
    f"pinned, load average at start {', '.join(f'{x:.1f}' for x in m['load'])}; jax {m['jax']}; "
    f"{m['date']}."
  )


def markdown(results: dict) -> str:
  lines = []
  if "buckets" in results:
    b = results["buckets"]
    lines += [
      f"### Length buckets: padded to 512 vs bucketed (multiples of {b['buckets']['input']} / "
      f"{b['buckets']['target']}), WordNet gym ({b['setting']}; grid on {b['target']}), "
      f"{b['model']}, prompt {PROMPT_LENGTH}, dropout 0.1",
      "",
      run_line(b),
      "",
      "| step | padded: shape, step (s), compile (s) | bucketed: shape, step (s), compile (s) | "
      "bucketed / padded |",
      "|---|---|---|---|",
    ]
    for r in b["rows"]:
      p, q = r["variants"]["padded"], r["variants"]["bucketed"]
      lines.append(
        f"| {r['step']} | {p['shape']}, {p['median_s']:.3f}, {p['compile_s']:.1f} | "
        f"{q['shape']}, {q['median_s']:.3f}, {q['compile_s']:.1f} | **{r['ratio']:.2f}** |"
      )
    lines.append("")
  if "cache" in results:
    c = results["cache"]
    lines += [
      f"### Persistent compilation cache: {c['step']}",
      "",
      run_line(c),
      "",
      "| process | trace + lower (s) | compile or load (s) | cache hits / misses | whole process (s) |",
      "|---|---|---|---|---|",
    ]
    for r in c["rows"]:
      lines.append(
        f"| {r['process']} | {r['lower_s']:.1f} | {r['compile_s']:.1f} | {r['hits']} / "
        f"{r['misses']} | {r['wall_s']:.1f} |"
      )
    lines += ["", f"Cache size after both: {c['cache_bytes'] / 2**20:.1f} MiB.", ""]
  if "scan" in results:
    s = results["scan"]
    lines += [
      f"### Scanned vs unrolled layers: {s['shape']}",
      "",
      run_line(s),
      "",
      "| step | unrolled: lower + compile (s), step (s), temp (MiB) | scanned: lower + compile (s), "
      "step (s), temp (MiB) | compile scanned / unrolled | step scanned / unrolled |",
      "|---|---|---|---|---|",
    ]
    for r in s["rows"]:
      u, v = r["variants"]["unrolled"], r["variants"]["scanned"]
      lines.append(
        f"| {r['step']} | {u['lower_s']:.1f} + {u['compile_s']:.1f}, {u['median_s']:.3f}, "
        f"{u['temp_bytes'] / 2**20:,.0f} | {v['lower_s']:.1f} + {v['compile_s']:.1f}, "
        f"{v['median_s']:.3f}, {v['temp_bytes'] / 2**20:,.0f} | **{r['compile_ratio']:.2f}** | "
        f"**{r['step_ratio']:.2f}** |"
      )
    lines.append("")
  if "depth" in results:
    d = results["depth"]
    lines += [
      f"### Compile time against depth (layers per stack), T5-small width: {d['shape']}",
      "",
      run_line(d),
      "",
      "| step | layers | unrolled: lower + compile (s) | scanned: lower + compile (s) |",
      "|---|---|---|---|",
    ]
    by_key = {(r["step"], r["layers"], r["blocks"]): r for r in d["rows"]}
    pairs = sorted({(r["step"], r["layers"]) for r in d["rows"]}, key=lambda k: (k[0] != "pt", k[1]))
    for step, layers in pairs:
      u, v = by_key[(step, layers, "unrolled")], by_key[(step, layers, "scanned")]
      lines.append(
        f"| {step} | {layers} | {u['lower_s']:.1f} + {u['compile_s']:.1f} | {v['lower_s']:.1f} + "
        f"{v['compile_s']:.1f} |"
      )
    lines.append("")
  if "dev_eval" in results:
    d = results["dev_eval"]
    lines += [
      f"### Dev evaluation vs the grid step: {d['model']}, {d['task']} ({d['dev_examples']} dev "
      f"examples per run, batches of {d['eval_batch_size']} per run), {d['runs']} runs, up to 127 "
      f"tokens; prompts as initialized and after {d['train_steps']} grid steps",
      "",
      run_line(d),
      "",
      "| prompts | decoding | padding (input) | one evaluation (s) | generated tokens (mean) | "
      "grid step (s) | share at one evaluation per " + f"{d['eval_every']} steps |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in d["rows"]:
      tokens = "" if r["mean_generated_tokens"] is None else f"{r['mean_generated_tokens']:.1f}"
      lines.append(
        f"| {r['prompts']} | {r['decoding']} | {r['padding']} ({r['input_length']}) | "
        f"{r['eval_s']:.2f} | {tokens} | {r['grid_step_s']:.2f} | {r['share']:.1%} |"
      )
    lines.append("")
  return "\n".join(lines) + "\n"


def main():
  args = ARGS
  only = [s for s in args.only.split(",") if s]
  unknown = [s for s in only if s not in SECTIONS]
  if unknown:
    raise SystemExit(f"--only: unknown {unknown}; choose from {SECTIONS}")
  path = args.out / "scale.json"
  results = json.loads(path.read_text()) if path.exists() else {}
  if args.render:
    (args.out / "scale.md").write_text(markdown(results))
    print(markdown(results))
    return
  cpu = next(
    (
      line.split(":", 1)[1].strip()
      for line in Path("/proc/cpuinfo").read_text().splitlines()
      if line.startswith("model name")
    ),
    "unknown CPU",
  )
  command = " ".join(["python -m benchmarks.bench_scale", *sys.argv[1:]])
  args.out.mkdir(parents=True, exist_ok=True)
  for name in only:
    log(f"== {name}")
    machine = dict(
      cpu=cpu,
      cores=len(os.sched_getaffinity(0)),
      load=os.getloadavg(),
      jax=jax.__version__,
      date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    )
    start = time.perf_counter()
    globals()[f"section_{name}"](args, results)
    results[name].update(command=command, machine=machine, section_s=time.perf_counter() - start)
    path.write_text(json.dumps(results, indent=1) + "\n")
    (args.out / "scale.md").write_text(markdown(results))
  print(markdown(results))


if __name__ == "__main__":
  main()
