"""The GPU table of issue 13: our steps against the reference at the study's model size, in one command.

    python -m benchmarks.bench_steps --gpu                 # on the GPU machine: T5-large shape, <= 8 min
    python -m benchmarks.bench_steps --gpu --scale tiny    # the same code path on a tiny model (CPU, ~3 min)

Model: T5 v1.1 large shape (d_model 1024, 24 + 24 layers, 16 heads x 64, d_ff 2816 gated-GELU, vocab
32128, untied head; 783M params), random weights (costs do not depend on the values), prompt 100, dropout
off on both sides (as in issue 13's first table; the fused-attention variant needs it off), float32
weights multiplied as the backend does by default (TF32 on NVIDIA GPUs) unless "bf16" is said. Lengths:
padded to the study's maxima (input 512; output 64 for MAML, 128 for PT and the grid) and a realistic
bucket (input 128, output 16: the offline gyms' grid batches fall in 64-128 x 16, benchmarks/
length_stats.py; CrossFit's inputs are longer on average, so 128 is a guess to replace by that script's
measurement on CrossFit).

Sections run in order of importance, each skipped when the time left (`--budget_s`, default 450 s from
the start) is below its estimated need; every section's numbers are written as soon as it ends to
OUT/gpu_<date>.json and OUT/gpu_<date>.md. In order:
 env           versions, device, memory limit, measured bf16 and float32 (TF32) matmul rates.
 reference     the reference algorithm (benchmarks/torch_reference.py, transformers + higher) on the
               device: PT step (batch 16) and MAML step (2 tasks x (2 + 2)), padded, with Adafactor;
               run first and freed (JAX's allocator keeps what it takes).
 maml_scan     our MAML step, scanned layers: compile (target <= 30 s), step time (target >= 10x the
               reference), compiled memory (arguments + temporaries) vs the reference's peak.
 maml_remat    the same with per-layer remat (nothing saved): the memory target (<= the reference's).
 pt_scan       our PT step, scanned.
 grid_padded   the 20-run grid step, bf16 weights, scanned, per-layer remat (nothing saved), padded; in
               the fewest chunks of runs that fit (mpt_jax/chunking.py). Target: per run >= 5x the
               reference's PT step.
 grid_bucketed the same at the realistic bucket.
 dev_eval      one dev evaluation of the 20 runs (the study's beam search: 4 beams, penalty 2.5, early
               stopping; up to 127 tokens, 32 examples per run, bucketed input, bf16, scanned); random
               weights rarely emit EOS, so this is the worst case (every beam runs to 127 tokens). Its
               share at one per 50 steps.
 grid_dots     the padded grid with remat policy "dots" (matmul outputs kept).
 grid_cudnn    the padded grid with cuDNN fused attention (jax.nn.dot_product_attention).
 maml_bf16     the scanned MAML step with bf16 weights.
 greedy_runs   greedy dev decoding of the 20 runs: vmap of greedy_decode against greedy_decode_runs (all
               rows in one loop; no per-step select of the cache between runs), same tokens.
 maml_unrolled our MAML step with per-layer (unrolled) blocks: the scan's step-time reference (its
               compile took 116 s on 2026-11-29, ../shared/measurements/gpu_2026-11-29; when the
               budget skips it, run `--sections env,maml_scan,maml_unrolled`).
Then: achieved FLOP/s (analytic matmul counts, bench_steps.forward_flops) against the measured matmul
rates, and an estimate of the whole study's wall time on one device, ours and the reference's.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import bench_steps
from mpt_jax import algorithms, chunking, decode, methods, optim
from mpt_jax.model.t5 import T5, T5Config, cast_params, stack_blocks

SCALES = {
  "large": dict(
    model=dict(
      vocab_size=32128, d_model=1024, d_kv=64, num_heads=16, d_ff=2816, num_layers=24, num_decoder_layers=24
    ),
    prompt=100,
    padded=dict(maml=(512, 64), pt=(512, 128)),
    bucketed=(128, 16),
    batch=16,
    grid_runs=20,
    eval_examples=32,
    decode_length=127,
    matmul_size=8192,
    repeats=5,
  ),
  "tiny": dict(
    model=dict(
      vocab_size=256,
      d_model=64,
      d_kv=16,
      num_heads=4,
      d_ff=128,
      num_layers=3,
      num_decoder_layers=3,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=16,
    ),
    prompt=20,
    padded=dict(maml=(32, 8), pt=(32, 8)),
    bucketed=(16, 4),
    batch=4,
    grid_runs=4,
    eval_examples=4,
    decode_length=6,
    matmul_size=512,
    repeats=2,
  ),
}
# Estimated seconds per section at the large scale (compile included), for the budget.
NEEDS = dict(
  env=15,
  reference=70,
  maml_scan=45,
  maml_remat=45,
  pt_scan=35,
  grid_padded=60,
  grid_bucketed=40,
  dev_eval=60,
  grid_dots=60,
  grid_cudnn=60,
  maml_unrolled=140,
  maml_bf16=45,
  greedy_runs=60,
)
FLAVOUR = bench_steps.MODEL_FLAVOUR
INNER_LR = bench_steps.STUDY_INNER_LR
GRID_LRS = bench_steps.GRID_LEARNING_RATES
STUDY = dict(downstream_steps=3000, eval_every=50, upstream_steps=5000, meta_methods=3, methods=5)


def log(message: str) -> None:
  print(f"[{time.perf_counter() - START:6.1f}s] {message}", flush=True)


START = time.perf_counter()


class Table:
  """The run's record: sections in order, written after each one."""

  def __init__(self, args):
    self.args = args
    self.scale = SCALES[args.scale]
    self.budget_s = args.budget_s
    stamp = time.strftime("%Y-%m-%d_%H%M", time.gmtime())
    self.json_path = args.out / f"gpu_{stamp}{'' if args.scale == 'large' else '_' + args.scale}.json"
    self.md_path = self.json_path.with_suffix(".md")
    self.record = dict(
      command=" ".join(["python -m benchmarks.bench_steps", *sys.argv[1:]]),
      scale=args.scale,
      shapes=self.scale,
      sections={},
    )
    self.state: dict = {}

  def left(self) -> float:
    return self.budget_s - (time.perf_counter() - START)

  def run(self, name: str, fn) -> None:
    need = NEEDS[name] * (1.0 if self.args.scale == "large" else 0.1)
    if self.left() < need:
      self.record["sections"][name] = dict(skipped=f"{self.left():.0f} s left < {need:.0f} s needed")
      log(f"SKIP {name}: {self.left():.0f} s left")
      self.write()
      return
    log(f"BEGIN {name}")
    start = time.perf_counter()
    entry = self.record["sections"].setdefault(name, {})
    try:
      fn(self, entry)
    except Exception as error:  # noqa: BLE001 (a benchmark records a failure and goes on)
      entry["error"] = f"{type(error).__name__}: {error}"[:2000]
      entry["traceback"] = traceback.format_exc()[-3000:]
      log(f"ERROR {name}: {entry['error'][:400]}")
    entry["section_s"] = round(time.perf_counter() - start, 1)
    log(f"END {name} ({entry['section_s']} s)")
    self.write()

  def write(self) -> None:
    self.record["total_s"] = round(time.perf_counter() - START, 1)
    self.args.out.mkdir(parents=True, exist_ok=True)
    self.json_path.write_text(json.dumps(self.record, indent=1, default=str) + "\n")
    self.md_path.write_text(markdown(self.record))


# --------------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------------
def model_config(scale: dict, **changes) -> T5Config:
  return T5Config(**scale["model"], **FLAVOUR, dropout_rate=0.0, **changes)


def batches_for(scale: dict, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  vocab = scale["model"]["vocab_size"]
  kw = lambda lengths: dict(vocab_size=vocab, input_length=lengths[0], output_length=lengths[1])
  b, runs = scale["batch"], scale["grid_runs"]
  return dict(
    maml={
      "support": bench_steps.random_batch(rng, (2, 1, 2), **kw(scale["padded"]["maml"])),
      "query": bench_steps.random_batch(rng, (2, 2), **kw(scale["padded"]["maml"])),
    },
    pt=bench_steps.random_batch(rng, (b,), **kw(scale["padded"]["pt"])),
    grid_padded=bench_steps.random_batch(rng, (runs, b), **kw(scale["padded"]["pt"])),
    grid_bucketed=bench_steps.random_batch(rng, (runs, b), **kw(scale["bucketed"])),
    eval=bench_steps.random_batch(rng, (runs, scale["eval_examples"]), **kw(scale["bucketed"])),
  )


def setup(table: Table) -> dict:
  """Params (float32, per-layer and stacked), prompt and batches, made once."""
  st = table.state
  if "params" not in st:
    start = time.perf_counter()
    model = T5(model_config(table.scale))
    params = jax.device_put(bench_steps.random_params(model))
    st.update(
      params=params,
      stacked=jax.device_put(stack_blocks(params)),
      prompt=bench_steps.initial_prompt(params, table.scale["prompt"]),
      batches=batches_for(table.scale),
      num_params=int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(params))),
    )
    table.record["num_params"] = st["num_params"]
    table.record["setup_s"] = round(time.perf_counter() - start, 1)
  return st


def block(x):
  return jax.block_until_ready(x)


def median_time(fn, repeats: int, warmup: int = 1) -> dict:
  for _ in range(warmup):
    block(fn())
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    block(fn())
    times.append(time.perf_counter() - start)
  return dict(median_s=statistics.median(times), min_s=min(times), all_s=[round(t, 4) for t in times])


def peak_bytes() -> int | None:
  try:
    return int(jax.devices()[0].memory_stats().get("peak_bytes_in_use"))
  except Exception:  # noqa: BLE001 (CPUs report no memory stats)
    return None


def gib(x) -> float | None:
  return None if x is None else round(x / 2**30, 2)


def compile_step(jitted, *args) -> tuple[object, dict]:
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  info = dict(compile_s=round(time.perf_counter() - start, 1))
  memory = compiled.memory_analysis()
  if memory is not None:
    info["temp_gib"] = gib(memory.temp_size_in_bytes)
    # Comparable with the reference's peak, which holds the weights too: arguments + temporaries + outputs.
    info["total_gib"] = gib(
      memory.argument_size_in_bytes
      + memory.temp_size_in_bytes
      + memory.output_size_in_bytes
      - memory.alias_size_in_bytes
    )
  return compiled, info


def step_run(table: Table, entry: dict, method: str, config: T5Config, params, batch) -> None:
  """Compile and time one of our PT/MAML steps (state donated), as users run it."""
  model = T5(config)
  optimizer = optim.make_optimizer("adafactor", 0.5)
  loss_fn = algorithms.make_loss_fn(model, deterministic=True)
  kwargs = dict(inner_lr=INNER_LR) if method == "maml" else {}
  jitted = algorithms.jit_step(methods.make_step(method, loss_fn, optimizer, **kwargs))
  state = algorithms.init_state(jnp.asarray(table.state["prompt"]), optimizer)
  batch = jax.device_put(batch)
  compiled, info = compile_step(jitted, state, params, batch, jax.random.key(0))
  entry.update(info)
  holder = {"state": state}

  def call():
    holder["state"], metrics = compiled(holder["state"], params, batch, jax.random.key(0))
    return metrics["loss"]

  entry["time"] = median_time(call, table.scale["repeats"])
  entry["peak_gib"] = gib(peak_bytes())
  log(
    f"  {method}: {entry['time']['median_s']:.4f} s, compile {entry['compile_s']} s, temp "
    f"{entry.get('temp_gib')} GiB"
  )


def grid_run(table: Table, entry: dict, batch_key: str, **changes) -> None:
  """The grid step (bf16 weights, scanned, per-layer remat unless changed), chunked to fit memory."""
  st = setup(table)
  config = model_config(table.scale, dtype="bfloat16", scan_layers=True, remat=True, **changes)
  if "bf16_stacked" not in st:
    st["bf16_stacked"] = cast_params(st["stacked"], "bfloat16")
  params = st["bf16_stacked"]
  optimizer = optim.make_optimizer("adafactor", 1.0)
  loss_fn = algorithms.make_loss_fn(T5(config), deterministic=True)
  jitted = jax.jit(
    algorithms.make_grid_step(methods.make_step("pt", loss_fn, optimizer)), donate_argnums=(0,)
  )
  runs = table.scale["grid_runs"]
  # The device's free memory decides the chunks; a CPU reports none: plan for "unlimited" there, so the
  # step is still compiled (and timed) ahead of the calls.
  grid = chunking.RunChunks(
    jitted, (0, None, 0, 0), budget_bytes=chunking.device_memory_budget() or 2**62, name="grid"
  )
  states = algorithms.init_grid_state(jnp.asarray(st["prompt"]), optimizer, np.resize(GRID_LRS, runs))
  batch = jax.device_put(st["batches"][batch_key])
  rngs = jax.random.split(jax.random.key(0), runs)
  start = time.perf_counter()
  plan = grid.plan(states, params, batch, rngs)
  entry.update(
    compile_s=round(time.perf_counter() - start, 1),
    chunks=plan.num_chunks,
    chunk_gib=gib(plan.chunk_bytes),
    runs=runs,
    shape=f"{batch['input_ids'].shape[-1]} x {batch['target_ids'].shape[-1]}",
  )
  holder = {"states": states}

  def call():
    holder["states"], metrics = grid(holder["states"], params, batch, rngs)
    return metrics["loss"]

  entry["time"] = median_time(call, table.scale["repeats"])
  entry["per_run_s"] = entry["time"]["median_s"] / runs
  entry["peak_gib"] = gib(peak_bytes())
  reference = table.record["sections"].get("reference", {}).get("pt_time", {}).get("median_s")
  if reference:
    entry["per_run_speedup_vs_reference"] = round(reference / entry["per_run_s"], 2)
  log(
    f"  grid {batch_key} {changes}: {entry['time']['median_s']:.3f} s ({entry['per_run_s']:.4f} s per "
    f"run, {plan.num_chunks} chunk(s)), compile {entry['compile_s']} s"
  )


# --------------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------------
def env(table: Table, entry: dict) -> None:
  import flax

  device = jax.devices()[0]
  entry.update(
    jax=jax.__version__,
    flax=flax.__version__,
    devices=[str(d) for d in jax.devices()],
    platform=device.platform,
    python=sys.version.split()[0],
  )
  try:
    stats = device.memory_stats() or {}
    entry["memory_limit_gib"] = gib(stats.get("bytes_limit"))
  except Exception:  # noqa: BLE001
    entry["memory_limit_gib"] = None
  try:
    entry["nvidia_smi"] = subprocess.run(
      ["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError) as error:
    entry["nvidia_smi"] = repr(error)
  n = table.scale["matmul_size"]
  for dtype in ("bfloat16", "float32"):
    a = jnp.ones((n, n), dtype)
    matmul = jax.jit(jnp.matmul)
    timing = median_time(lambda: matmul(a, a), 5)
    entry[f"matmul_{dtype}_tflops"] = round(2 * n**3 / timing["median_s"] / 1e12, 2)
  log(f"  {json.dumps({k: v for k, v in entry.items() if k != 'nvidia_smi'})}")


def reference(table: Table, entry: dict) -> None:
  import torch

  from benchmarks import torch_reference as ref

  st = setup(table)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.backends.cuda.matmul.allow_tf32 = True  # the default float32 matmuls of JAX on these GPUs
  torch.backends.cudnn.allow_tf32 = True
  start = time.perf_counter()
  config = model_config(table.scale)
  model = ref.build_torch_t5(config, jax.device_get(st["params"]), dropout_rate=0.0, device=device).eval()
  entry.update(device=device, torch=torch.__version__, build_s=round(time.perf_counter() - start, 1))
  sync = (lambda _: torch.cuda.synchronize()) if device == "cuda" else (lambda _: None)

  def timed(model, method, batch):
    batch = ref.to_torch(batch, device)
    run = ref.ReferenceRun(model, st["prompt"], inner_lr=INNER_LR)
    if device == "cuda":
      torch.cuda.reset_peak_memory_stats()
    call = lambda: run.step(method, batch)
    call()
    sync(None)
    times = []
    for _ in range(table.scale["repeats"]):
      t = time.perf_counter()
      call()
      sync(None)
      times.append(time.perf_counter() - t)
    entry[f"{method}_time"] = dict(median_s=statistics.median(times), all_s=[round(t, 4) for t in times])
    if device == "cuda":
      entry[f"{method}_peak_gib"] = gib(torch.cuda.max_memory_allocated())
    log(f"  reference {method}: {entry[f'{method}_time']['median_s']:.4f} s")

  timed(model, "pt", st["batches"]["pt"])
  try:
    import higher  # noqa: F401

    timed(model, "maml", st["batches"]["maml"])
  except ImportError:
    entry["maml_skipped"] = "higher is not installed (pip install higher==0.2.1)"
  del model
  if device == "cuda":
    torch.cuda.empty_cache()


def maml_scan(table: Table, entry: dict) -> None:
  st = setup(table)
  step_run(
    table, entry, "maml", model_config(table.scale, scan_layers=True), st["stacked"], st["batches"]["maml"]
  )
  _versus_reference(table, entry, "maml")


def maml_remat(table: Table, entry: dict) -> None:
  st = setup(table)
  step_run(
    table,
    entry,
    "maml",
    model_config(table.scale, scan_layers=True, remat=True),
    st["stacked"],
    st["batches"]["maml"],
  )
  _versus_reference(table, entry, "maml")


def pt_scan(table: Table, entry: dict) -> None:
  st = setup(table)
  step_run(
    table, entry, "pt", model_config(table.scale, scan_layers=True), st["stacked"], st["batches"]["pt"]
  )
  _versus_reference(table, entry, "pt")


def _versus_reference(table: Table, entry: dict, method: str) -> None:
  ref = table.record["sections"].get("reference", {})
  if f"{method}_time" in ref:
    entry["speedup_vs_reference"] = round(ref[f"{method}_time"]["median_s"] / entry["time"]["median_s"], 2)
  if f"{method}_peak_gib" in ref:
    entry["reference_peak_gib"] = ref[f"{method}_peak_gib"]


def maml_unrolled(table: Table, entry: dict) -> None:
  st = setup(table)
  step_run(table, entry, "maml", model_config(table.scale), st["params"], st["batches"]["maml"])
  scanned = table.record["sections"].get("maml_scan", {}).get("time", {}).get("median_s")
  if scanned:
    entry["scanned_over_unrolled_step"] = round(scanned / entry["time"]["median_s"], 3)


def maml_bf16(table: Table, entry: dict) -> None:
  st = setup(table)
  step_run(
    table,
    entry,
    "maml",
    model_config(table.scale, scan_layers=True, dtype="bfloat16"),
    cast_params(st["stacked"], "bfloat16"),
    st["batches"]["maml"],
  )


def grid_padded(table: Table, entry: dict) -> None:
  grid_run(table, entry, "grid_padded")


def grid_bucketed(table: Table, entry: dict) -> None:
  grid_run(table, entry, "grid_bucketed")


def grid_dots(table: Table, entry: dict) -> None:
  grid_run(table, entry, "grid_padded", remat_policy="dots")


def grid_cudnn(table: Table, entry: dict) -> None:
  attention = "cudnn" if jax.devices()[0].platform == "gpu" else "xla"
  entry["attention"] = attention
  grid_run(table, entry, "grid_padded", attention=attention)


def dev_eval(table: Table, entry: dict) -> None:
  st = setup(table)
  config = model_config(table.scale, dtype="bfloat16", scan_layers=True)
  model = T5(config)
  if "bf16_stacked" not in st:
    st["bf16_stacked"] = cast_params(st["stacked"], "bfloat16")
  length = table.scale["decode_length"]
  generate = jax.jit(
    jax.vmap(
      lambda frozen, prompt, ids, mask: decode.beam_search(
        model,
        frozen,
        ids,
        mask,
        prompt,
        max_length=length,
        num_beams=4,
        repetition_penalty=2.5,
        early_stopping=True,
      ),
      in_axes=(None, 0, 0, 0),
    )
  )
  chunks = chunking.RunChunks(
    generate, (None, 0, 0, 0), budget_bytes=chunking.device_memory_budget() or 2**62, name="dev decoding"
  )
  runs = table.scale["grid_runs"]
  prompts = jnp.broadcast_to(jnp.asarray(st["prompt"]), (runs, *st["prompt"].shape))
  batch = st["batches"]["eval"]
  args = (
    st["bf16_stacked"],
    prompts,
    jax.device_put(batch["input_ids"]),
    jax.device_put(batch["input_mask"]),
  )
  start = time.perf_counter()
  plan = chunks.plan(*args)
  entry.update(
    compile_s=round(time.perf_counter() - start, 1),
    chunks=plan.num_chunks,
    chunk_gib=gib(plan.chunk_bytes),
    runs=runs,
    examples_per_run=table.scale["eval_examples"],
    input_length=int(batch["input_ids"].shape[-1]),
    max_tokens=length,
  )
  tokens = chunks(*args)
  entry["generated_tokens_mean"] = float(np.mean(np.asarray(tokens) != 0)) * length
  entry["time"] = median_time(lambda: chunks(*args), max(2, table.scale["repeats"] - 2))
  grid = table.record["sections"].get("grid_bucketed", {}).get("time", {}).get("median_s")
  if grid:
    eval_s = entry["time"]["median_s"]
    entry["share_at_one_per_50_steps"] = round(eval_s / (STUDY["eval_every"] * grid + eval_s), 3)
  log(f"  dev eval: {entry['time']['median_s']:.3f} s, {plan.num_chunks} chunk(s)")


# In order of importance (the budget skips the last ones first).
def greedy_runs(table: Table, entry: dict) -> None:
  st = setup(table)
  model = T5(model_config(table.scale, dtype="bfloat16", scan_layers=True))
  if "bf16_stacked" not in st:
    st["bf16_stacked"] = cast_params(st["stacked"], "bfloat16")
  length, runs = table.scale["decode_length"], table.scale["grid_runs"]
  prompts = jnp.broadcast_to(jnp.asarray(st["prompt"]), (runs, *st["prompt"].shape))
  batch = st["batches"]["eval"]
  args = (
    st["bf16_stacked"],
    prompts,
    jax.device_put(batch["input_ids"]),
    jax.device_put(batch["input_mask"]),
  )
  decoders = dict(
    vmapped=jax.jit(
      jax.vmap(
        lambda frozen, prompt, ids, mask: decode.greedy_decode(
          model, frozen, ids, mask, prompt, max_length=length
        ),
        in_axes=(None, 0, 0, 0),
      )
    ),
    one_batch=jax.jit(
      lambda frozen, prompts, ids, mask: decode.greedy_decode_runs(
        model, frozen, ids, mask, prompts, max_length=length
      )
    ),
  )
  tokens = {}
  for name, fn in decoders.items():
    start = time.perf_counter()
    tokens[name] = np.asarray(fn(*args))
    entry[f"{name}_first_call_s"] = round(time.perf_counter() - start, 1)
    entry[f"{name}_time"] = median_time(lambda fn=fn: fn(*args), max(2, table.scale["repeats"] - 2), warmup=0)
  entry["same_tokens"] = bool(np.array_equal(tokens["vmapped"], tokens["one_batch"]))
  entry["time"] = entry["one_batch_time"]
  entry["one_batch_over_vmapped"] = round(
    entry["one_batch_time"]["median_s"] / entry["vmapped_time"]["median_s"], 3
  )
  log(
    f"  greedy: vmapped {entry['vmapped_time']['median_s']:.3f} s, one batch "
    f"{entry['one_batch_time']['median_s']:.3f} s, same tokens {entry['same_tokens']}"
  )


SECTIONS = dict(
  env=env,
  reference=reference,
  maml_scan=maml_scan,
  maml_remat=maml_remat,
  pt_scan=pt_scan,
  grid_padded=grid_padded,
  grid_bucketed=grid_bucketed,
  dev_eval=dev_eval,
  grid_dots=grid_dots,
  grid_cudnn=grid_cudnn,
  maml_bf16=maml_bf16,
  greedy_runs=greedy_runs,
  maml_unrolled=maml_unrolled,
)


# --------------------------------------------------------------------------------------------------
# FLOP/s and the study's wall time
# --------------------------------------------------------------------------------------------------
def analytic_flops(record: dict) -> dict:
  """Useful matmul FLOPs per step (bench_steps.forward_flops: F per example forward): a prompt gradient
  costs 2F per example (frozen weights: no weight gradients); MAML 4F per support and 2F per query
  example. Recomputation (remat: about one more F) is not counted, so remat shows as a lower rate."""
  scale = SCALES[record["scale"]]
  config = model_config(scale)
  prompt = scale["prompt"]
  forward = lambda lengths: bench_steps.forward_flops(config, prompt + lengths[0], lengths[1])["total"]
  grid_examples = scale["grid_runs"] * scale["batch"]
  return dict(
    maml_scan=forward(scale["padded"]["maml"]) * (4 * 4 + 2 * 4),
    maml_remat=forward(scale["padded"]["maml"]) * (4 * 4 + 2 * 4),
    maml_unrolled=forward(scale["padded"]["maml"]) * (4 * 4 + 2 * 4),
    maml_bf16=forward(scale["padded"]["maml"]) * (4 * 4 + 2 * 4),
    pt_scan=forward(scale["padded"]["pt"]) * 2 * scale["batch"],
    grid_padded=forward(scale["padded"]["pt"]) * 2 * grid_examples,
    grid_dots=forward(scale["padded"]["pt"]) * 2 * grid_examples,
    grid_cudnn=forward(scale["padded"]["pt"]) * 2 * grid_examples,
    grid_bucketed=forward(scale["bucketed"]) * 2 * grid_examples,
  )


def study_estimate(record: dict) -> dict | None:
  """Whole-study wall time on one device from the measured steps (README: the method)."""
  from mpt_jax.data import settings as settings_lib

  sections = record["sections"]
  ref = sections.get("reference", {})
  targets = sum(len(settings_lib.get_setting(s).target) for s in settings_lib.STUDY_SETTINGS)
  settings = len(settings_lib.STUDY_SETTINGS)
  runs = SCALES[record["scale"]]["grid_runs"]
  evals = STUDY["downstream_steps"] // STUDY["eval_every"] + 1
  out = dict(target_tasks_over_settings=targets, settings=settings)
  eval_s = sections.get("dev_eval", {}).get("time", {}).get("median_s")

  def hours(grid_step_s, maml_s, eval_each_s):
    downstream = (
      STUDY["methods"] * targets * (STUDY["downstream_steps"] * grid_step_s + evals * (eval_each_s or 0.0))
    )
    upstream = settings * STUDY["meta_methods"] * STUDY["upstream_steps"] * (maml_s or 0.0)
    return dict(
      downstream_h=round(downstream / 3600, 1),
      upstream_h=round(upstream / 3600, 1),
      total_h=round((downstream + upstream) / 3600, 1),
    )

  maml = next(
    (
      sections[k]["time"]["median_s"]
      for k in ("maml_bf16", "maml_scan", "maml_unrolled")
      if "time" in sections.get(k, {})
    ),
    None,
  )
  for label, key in (("ours_padded", "grid_padded"), ("ours_bucketed", "grid_bucketed")):
    grid = sections.get(key, {}).get("time", {}).get("median_s")
    if grid:
      out[label] = hours(grid, maml, eval_s)
  if "pt_time" in ref:
    out["reference_padded"] = hours(
      runs * ref["pt_time"]["median_s"], ref.get("maml_time", {}).get("median_s"), eval_s
    )
  return out


def markdown(record: dict) -> str:
  sections = record["sections"]
  e = sections.get("env", {})
  lines = [
    f"# GPU table ({record['scale']}): `{record['command']}`",
    "",
    f"{e.get('nvidia_smi', '')}; jax {e.get('jax')}, flax {e.get('flax')}; device memory limit "
    f"{e.get('memory_limit_gib')} GiB; measured matmul: bf16 {e.get('matmul_bfloat16_tflops')} "
    f"TFLOP/s, float32 (default precision) {e.get('matmul_float32_tflops')} TFLOP/s. "
    f"{record.get('num_params', 0):,} params. Total {record.get('total_s')} s.",
    "",
    "| section | step (s) | per run (s) | vs reference | compile (s) | memory (GiB) | notes |",
    "|---|---|---|---|---|---|---|",
  ]
  flops = analytic_flops(record)
  for name, s in sections.items():
    if name in ("env",):
      continue
    if "skipped" in s or "error" in s:
      lines.append(f"| {name} | | | | | | {s.get('skipped') or s.get('error', '')[:200]} |")
      continue
    if name == "reference":
      for method in ("pt", "maml"):
        if f"{method}_time" in s:
          lines.append(
            f"| reference {method} | {s[f'{method}_time']['median_s']:.4f} | | | | "
            f"{s.get(f'{method}_peak_gib')} peak | torch {s.get('torch')}, {s.get('device')} |"
          )
      continue
    t = s.get("time", {}).get("median_s")
    notes = []
    for key in (
      "shape",
      "chunks",
      "attention",
      "scanned_over_unrolled_step",
      "share_at_one_per_50_steps",
      "generated_tokens_mean",
      "one_batch_over_vmapped",
      "same_tokens",
    ):
      if key in s:
        notes.append(f"{key} {s[key]}")
    if name in flops and t:
      rate = flops[name] / t / 1e12
      matmul = e.get("matmul_bfloat16_tflops")
      notes.append(
        f"{rate:.3g} TFLOP/s analytic" + (f" = {rate / matmul:.0%} of bf16 matmul" if matmul else "")
      )
    memory = (
      f"{s['total_gib']} (temp {s['temp_gib']})"
      if "total_gib" in s
      else f"{s['chunk_gib']} per chunk"
      if s.get("chunk_gib") is not None
      else ""
    )
    if s.get("reference_peak_gib") is not None:
      memory += f" / reference peak {s['reference_peak_gib']}"
    vs = s.get("speedup_vs_reference") or s.get("per_run_speedup_vs_reference")
    per_run = f"{s['per_run_s']:.4f}" if "per_run_s" in s else ""
    lines.append(
      f"| {name} | {t:.4f} | {per_run} | {f'{vs}x' if vs else ''} | {s.get('compile_s', '')} | "
      f"{memory} | {'; '.join(notes)} |"
    )
  estimate = study_estimate(record)
  if estimate:
    lines += [
      "",
      f"Whole study on one device (11 settings, {estimate['target_tasks_over_settings']} target "
      f"tasks over them, 5 methods, 20 runs x 3000 steps, dev every 50; upstream 3 meta-"
      f"learning methods x 5000 MAML-priced steps per setting; MTL left out): ",
    ]
    for label in ("ours_padded", "ours_bucketed", "reference_padded"):
      if label in estimate:
        h = estimate[label]
        lines.append(
          f"- {label}: downstream {h['downstream_h']} h + upstream {h['upstream_h']} h = **{h['total_h']} h**"
        )
  return "\n".join(lines) + "\n"


def main(args) -> None:
  if args.scale == "large" and jax.devices()[0].platform == "cpu":
    raise SystemExit("--gpu at the large scale needs an accelerator; use --scale tiny for a CPU dry run")
  table = Table(args)
  names = args.sections.split(",") if args.sections else list(SECTIONS)
  unknown = [n for n in names if n not in SECTIONS]
  if unknown:
    raise SystemExit(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
  for name in names:
    table.run(name, SECTIONS[name])
  table.write()
  log(f"wrote {table.json_path} and {table.md_path}")
  print(table.md_path.read_text())
