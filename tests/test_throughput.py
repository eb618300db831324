"""Time and memory in every log: a tiny upstream run and a tiny downstream grid write step time,
throughput, compile time, ETA and memory to their JSONL and TensorBoard files and a per-stage summary.

Timings are never asserted by value (they depend on the machine), only their presence and the
relations that hold by construction (examples/s x step time = examples a step, the ETA falls to 0).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import helpers_t5
from mpt_jax import adapt, algorithms, logs, optim, throughput, train

pytestmark = pytest.mark.usefixtures("fast_compile")

PERF_KEYS = (
  "step_time_s",
  "examples_per_s",
  "tokens_per_s",
  "eta_stage_s",
  "first_step_s",
  "compile_s",
  "compile_cache_hits",
  "host_rss_gb",
)
BATCH = helpers_t5.random_batch(5, batch=4, input_length=6, target_length=3)
EXAMPLES = int((BATCH["input_mask"].sum(-1) > 0).sum())
TOKENS = int(BATCH["input_mask"].sum() + BATCH["target_mask"].sum())


@pytest.fixture(scope="module")
def tiny():
  model, params = helpers_t5.tiny_t5("1.1")
  prompt0 = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (2, model.config.d_model)))
  loss = algorithms.make_loss_fn(model, deterministic=True)
  return model, params, prompt0, loss


def check_interval_records(records: list[dict], prefix: str, examples: int, tokens: int, total: int):
  for record in records:
    for key in PERF_KEYS:
      assert f"{prefix}{key}" in record, (key, record)
    step_s = record[f"{prefix}step_time_s"]
    assert step_s > 0
    np.testing.assert_allclose(record[f"{prefix}examples_per_s"] * step_s, examples, rtol=1e-9)
    np.testing.assert_allclose(record[f"{prefix}tokens_per_s"] * step_s, tokens, rtol=1e-9)
    np.testing.assert_allclose(record[f"{prefix}eta_stage_s"], step_s * (total - record["step"]), rtol=1e-9)
    assert record[f"{prefix}compile_s"] >= 0 and record[f"{prefix}first_step_s"] > 0
    assert record[f"{prefix}host_rss_gb"] > 0
    # device memory: where the backend reports it, and nowhere else (the CPU backend does not)
    reported = jax.local_devices()[0].memory_stats() is not None
    assert (f"{prefix}device_memory_gb" in record) == reported
  etas = [r[f"{prefix}eta_stage_s"] for r in records]
  assert etas[-1] == 0 and all(a >= b for a, b in zip(etas, etas[1:]))
  compile_s = [r[f"{prefix}compile_s"] for r in records]
  assert compile_s == sorted(compile_s)  # a running total


def check_summary(summary: dict, steps: int, examples: int, tokens: int):
  assert summary["steps"] == steps
  assert summary["examples"] == examples * steps and summary["tokens"] == tokens * steps
  assert summary["wall_s"] >= summary["first_step_s"] + summary["other_s"] > 0
  np.testing.assert_allclose(summary["steps_per_s"], (steps - 1) / summary["steady_s"], rtol=1e-9)
  assert summary["compile_cache_hits"] >= 0 and summary["compile_cache_misses"] >= 0
  assert summary["host_rss_peak_gb"] > 0
  if jax.local_devices()[0].memory_stats() is None:  # CPU: said, not faked
    assert summary["device_memory_peak_gb"] is None
    assert "not reported" in summary["device_memory_note"]
  else:
    assert summary["device_memory_peak_gb"] > 0 and summary["device_memory_note"] is None


def test_an_upstream_run_logs_time_throughput_compile_eta_and_memory(tiny, tmp_path):
  _, params, prompt0, loss = tiny
  optimizer = optim.make_optimizer("adafactor", 0.3)
  step = algorithms.jit_step(algorithms.make_pt_step(loss, optimizer))

  def upstream(num_steps):
    loop = train.LoopConfig(num_steps=num_steps, checkpoint_every=4, log_every=2, seed=0)
    train.train_prompt(
      step, algorithms.init_state(prompt0, optimizer), params, lambda s: BATCH, loop, str(tmp_path)
    )

  upstream(6)
  records = logs.read_metrics(tmp_path / "logs" / "metrics.jsonl")
  assert [r["step"] for r in records] == [2, 4, 6]
  check_interval_records(records, "upstream/perf/", EXAMPLES, TOKENS, total=6)
  # TensorBoard holds the same scalars (float32)
  events = logs.read_events(tmp_path / "logs")
  for key in PERF_KEYS:
    tag = f"upstream/perf/{key}"
    assert [s for s, _ in events[tag]] == [2, 4, 6]
    np.testing.assert_allclose([v for _, v in events[tag]], [r[tag] for r in records], rtol=1e-6)
  (summary,) = throughput.read_summaries(tmp_path / "logs" / throughput.SUMMARY_FILE)
  assert summary["stage"] == "upstream" and summary["start_step"] == 0
  check_summary(summary, 6, EXAMPLES, TOKENS)

  upstream(8)  # resumes from the final checkpoint, at step 6
  history = throughput.read_summaries(tmp_path / "logs" / throughput.SUMMARY_FILE)
  assert len(history) == 2 and history[0] == summary  # a resumed stage appends its own part
  assert history[1]["start_step"] == 6 and history[1]["steps"] == 2


def test_a_downstream_grid_logs_time_throughput_and_memory_per_task(tiny, tmp_path):
  model, params, prompt0, loss = tiny
  del model
  optimizer = optim.make_optimizer("sgd", 0.5)
  runs = adapt.grid_runs([1, 2], [0.5, 0.2])
  grid_step = adapt.make_grid_trainer(loss, optimizer)
  states = algorithms.init_grid_state(prompt0, optimizer, [r.learning_rate for r in runs])
  batch = {k: np.stack([v] * len(runs)) for k, v in BATCH.items()}
  config = adapt.GridConfig(lrs=[0.5, 0.2], batch_size=4, num_steps=6, eval_every=2, eval_batch_size=4)
  writer = logs.MetricWriter(tmp_path / "logs")
  try:
    progress = adapt.train_grid(
      grid_step,
      states,
      params,
      lambda step, runs: {k: v[runs] for k, v in batch.items()},
      lambda prompts: -np.abs(np.asarray(prompts)).mean(axis=(1, 2)),
      config,
      writer,
      desc="task_a",
    )
  finally:
    writer.close()
  records = logs.read_metrics(tmp_path / "logs" / "metrics.jsonl")
  assert [r["step"] for r in records] == [2, 4, 6]
  # a grid step is one step of every run: its examples and tokens are those of the R runs' batches
  check_interval_records(records, "task_a/perf/", EXAMPLES * len(runs), TOKENS * len(runs), total=6)
  events = logs.read_events(tmp_path / "logs")
  assert [s for s, _ in events["task_a/perf/step_time_s"]] == [2, 4, 6]
  summary = progress.throughput
  assert summary["stage"] == "downstream/task_a" and summary["runs"] == len(runs)
  check_summary(summary, 6, EXAMPLES * len(runs), TOKENS * len(runs))
  assert summary["other_s"] > 0  # dev scoring is timed apart from the steps
  path = throughput.write_summary(summary, str(tmp_path / "logs"))
  assert json.loads(Path(path).read_text()) == [summary]


def test_the_run_eta_adds_the_stages_to_come_at_their_kinds_step_time():
  """A declared run of upstream then two grids: while upstream trains, the grids cannot be timed (a lower
  bound); in the first grid, the second is timed at the first's step time; a reused one drops out."""
  import jax.numpy as jnp

  def one_interval(stage: str, total: int) -> dict:
    meter = throughput.StageMeter(stage, total)
    with meter:
      for _ in range(3):
        meter.after_step(BATCH, jnp.ones(()))
      return meter.interval(3)

  throughput.plan_run([("upstream", 0), ("downstream/a", 7), ("downstream/b", 5), ("downstream/c", 2)])
  try:
    up = one_interval("upstream", 10)
    assert up["eta_run_lower_bound"] == 1.0 and up["eta_run_s"] == up["eta_stage_s"]
    a = one_interval("downstream/a", 7)
    assert a["eta_run_lower_bound"] == 0.0
    np.testing.assert_allclose(a["eta_run_s"], a["eta_stage_s"] + (5 + 2) * a["step_time_s"], rtol=1e-9)
    throughput.skip_stage("downstream/b")  # its results were there already
    b = one_interval("downstream/c", 2)
    assert b["eta_run_s"] == b["eta_stage_s"]
    assert "run eta" in throughput.progress_text(a) and "run eta >" in throughput.progress_text(up)
  finally:
    throughput.end_run()
  assert "eta_run_s" not in one_interval("downstream/a", 7)  # no run declared: no run ETA
