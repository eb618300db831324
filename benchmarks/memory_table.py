"""Memory per device of the frozen T5 (LM-adapted, bf16) and of the second-order MAML step's
activations, on a 'model' axis of M devices, and the smallest M each accelerator needs: docs/MEMORY.md.

    python -m benchmarks.memory_table            # prints the markdown of docs/MEMORY.md's tables

Analytic, nothing compiled or run (a T5-XXL MAML step does not compile in reasonable time on CPU):
- Weights: exact. The parameter shapes of our linen T5 (jax.eval_shape, no arrays) and the partition rules
  of mpt_jax/sharding.py (`bytes_per_device`: split tensors / M, layer norms and position biases whole).
- Activations: an estimate, `maml_activation_bytes` below: the tensors one example's forward keeps for
  its backward pass, counted per layer (the residual stream and layer-norm outputs [S, d_model] whole on
  every device; q/k/v/context [S, heads*d_kv], attention probabilities and dropout masks [heads, S, S],
  feed-forward hidden units [S, d_ff] and the logits [T, vocab] split over M, as the sharded matmuls
  leave them), then second-order MAML's count: each support example of an inner step is held twice (its
  forward, and its backward's intermediates, which the outer gradient differentiates again), each query
  example once. Calibrated against the one measurement there is: XLA's buffer assignment of our MAML
  step at T5-small shape on CPU (benchmarks/README.md, 1,630 MiB in float32); the factor is printed.
"""

from __future__ import annotations

import jax
import numpy as np

from mpt_jax import sharding, study
from mpt_jax.model.t5 import T5, T5Config

GiB = 2**30
# The study's MAML step (reference/PROTOCOL.md; mpt_jax/config.py): tasks, inner steps, support and
# query examples per task; prompt, input and (upstream) target lengths.
STUDY_MAML = dict(tasks=2, inner_steps=1, support=2, query=2)
LENGTHS = dict(prompt=study.PROMPT_LENGTH, input=study.MAX_INPUT_LEN, target=study.UPSTREAM_TARGET_LEN)

MODELS = {  # google/t5-{large,xl,xxl}-lm-adapt: T5 v1.1 (gated-GELU, untied head), 24 + 24 layers
  "T5-large": dict(d_model=1024, d_ff=2816, num_heads=16),
  "T5-XL": dict(d_model=2048, d_ff=5120, num_heads=32),
  "T5-XXL": dict(d_model=4096, d_ff=10240, num_heads=64),
}
COMMON = dict(vocab_size=32128, d_kv=64, num_layers=24, num_decoder_layers=24, feed_forward_proj="gated-gelu")
# Memory per device (bytes) and the share a run may use: TPU HBM per chip (v4 32 GiB, v5e 16 GiB); GPUs
# 80 GB (A100/H100) and 141 GB (H200), of which JAX takes 75% by default (XLA_PYTHON_CLIENT_MEM_FRACTION)
# and a run may raise it to ~0.95; 90% of each is the budget here (the compiler and runtime keep some).
ACCELERATORS = {"TPU v4": 32 * GiB, "TPU v5e": 16 * GiB, "GPU 80 GB": 80e9, "GPU 141 GB": 141e9}
BUDGET = 0.9
# The anchor: our MAML step at T5-small shape, float32, 2 tasks x (1 inner step of 2) + 2 query,
# prompt 100, input 128, target 16: XLA CPU temp buffer 1,629.6 MiB (benchmarks/README.md).
ANCHOR = dict(
  model=dict(
    d_model=512, d_ff=1024, num_heads=6, vocab_size=32128, d_kv=64, num_layers=8, num_decoder_layers=8
  ),
  lengths=dict(prompt=100, input=128, target=16),
  measured=1629.6 * 2**20,
  bytes_per_value=4,
)


def param_shapes(model: dict, dtype: str = "bfloat16"):
  config = T5Config(
    **{**COMMON, **model}, tie_word_embeddings=False, scale_decoder_outputs=False, dtype=dtype
  )
  ids = jax.ShapeDtypeStruct((1, 2), np.int32)
  shapes = jax.eval_shape(T5(config).init, jax.random.PRNGKey(0), ids, ids, ids)["params"]
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, config.compute_dtype), shapes)


def example_activations(model: dict, lengths: dict, m: int, bytes_per_value: int) -> float:
  """Bytes one example's forward keeps for its backward, per device of a 'model' axis of m."""
  d, f, h = model["d_model"], model["d_ff"], model["num_heads"]
  inner = h * model.get("d_kv", COMMON["d_kv"])
  s, t = lengths["prompt"] + lengths["input"], lengths["target"]
  whole = lambda n: n  # noqa: E731 (replicated over 'model')
  split = lambda n: n / m  # noqa: E731
  encoder_layer = whole(4 * s * d) + split(4 * s * inner + 4 * s * f + 3 * h * s * s)
  decoder_layer = whole(6 * t * d) + split(
    6 * t * inner + 2 * s * inner + 4 * t * f + 3 * h * t * t + 3 * h * t * s
  )
  layers = model.get("num_layers", COMMON["num_layers"]) * encoder_layer
  layers += model.get("num_decoder_layers", COMMON["num_decoder_layers"]) * decoder_layer
  vocab = model.get("vocab_size", COMMON["vocab_size"])
  logits = split(2 * t * vocab) * 4  # float32 logits and their softmax
  return layers * bytes_per_value + logits


def maml_activation_bytes(model, lengths, m, bytes_per_value, tasks_per_device, step=STUDY_MAML) -> float:
  per_task = 2 * step["inner_steps"] * step["support"] + step["query"]
  return tasks_per_device * per_task * example_activations(model, lengths, m, bytes_per_value)


def calibration() -> float:
  estimate = maml_activation_bytes(
    ANCHOR["model"], ANCHOR["lengths"], 1, ANCHOR["bytes_per_value"], tasks_per_device=STUDY_MAML["tasks"]
  )
  return ANCHOR["measured"] / estimate


def table() -> str:
  factor = calibration()
  sizes = (1, 2, 4, 8, 16)
  lines = [
    f"Calibration: measured / estimated MAML activations at the T5-small anchor = {factor:.2f} "
    "(applied to every estimate below).",
    "",
    "| model | parameters | bf16 weights, whole | weights per device, M = "
    + " / ".join(map(str, sizes))
    + " |"
    " MAML activations per device (2 tasks on it), M = " + " / ".join(map(str, sizes)) + " |",
    "|---|---|---|---|---|",
  ]
  weights, acts = {}, {}
  for name, model in MODELS.items():
    shapes = param_shapes(model)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))
    weights[name] = {m: sharding.bytes_per_device(shapes, m) for m in sizes}
    acts[name] = {
      m: factor * maml_activation_bytes({**COMMON, **model}, LENGTHS, m, 2, STUDY_MAML["tasks"])
      for m in sizes
    }
    lines.append(
      f"| {name} | {count / 1e9:.2f} B | {weights[name][1] / GiB:.1f} GiB | "
      + " / ".join(f"{weights[name][m] / GiB:.1f}" for m in sizes)
      + " GiB | "
      + " / ".join(f"{acts[name][m] / GiB:.1f}" for m in sizes)
      + " GiB |"
    )
  lines += [
    "",
    f"Smallest mesh, data x model (devices), that holds the weights and the activations of the study's "
    f"MAML step in {BUDGET:.0%} of each device's memory; the step's {STUDY_MAML['tasks']} tasks split over "
    "'data' (so data <= 2), memory per device in brackets:",
    "",
    "| model | " + " | ".join(ACCELERATORS) + " |",
    "|---|" + "---|" * len(ACCELERATORS),
  ]
  for name in MODELS:
    cells = []
    for capacity in ACCELERATORS.values():
      meshes = sorted(
        (data * m, data, m)
        for m in sizes
        for data in (1, 2)
        if weights[name][m] + acts[name][m] / data <= BUDGET * capacity
      )
      if meshes:
        _, data, m = meshes[0]
        used = weights[name][m] + acts[name][m] / data
        cells.append(f"{data} x {m} ({used / GiB:.1f} GiB)")
      else:
        cells.append(f"more than 2 x {sizes[-1]}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


if __name__ == "__main__":
  print(table())
