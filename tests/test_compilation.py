"""The persistent compilation cache: a second process loads the step the first one compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np

from mpt_jax import compilation

REPO = Path(__file__).resolve().parents[1]

# One process of a run in miniature: turn the cache on, compile and take one PT step of a tiny T5.
PROCESS = r"""
import json, sys, time
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
import jax, jax.numpy as jnp, numpy as np
from helpers_t5 import random_batch, tiny_t5
from mpt_jax import algorithms, compilation, methods, optim

compilation.enable_persistent_cache(sys.argv[1], min_compile_time_secs=0)
model, params = tiny_t5("1.1", seed=0, num_layers=1, num_decoder_layers=1, dropout_rate=0.0)
optimizer = optim.make_optimizer("adafactor", 0.5)
step = algorithms.jit_step(methods.make_step("pt", algorithms.make_loss_fn(model, deterministic=True),
                                                optimizer))
state = algorithms.init_state(jnp.ones((3, 16)), optimizer)
batch, rng = jax.device_put(random_batch(0)), jax.random.key(0)
with compilation.count_cache_events() as events:
  start = time.perf_counter()
  state, _ = step(state, params, batch, rng)
  prompt = np.asarray(state.prompt)
  seconds = time.perf_counter() - start
print(json.dumps({"hits": events.hits, "misses": events.misses, "seconds": seconds,
                  "prompt": prompt.tolist()}))
"""


def _run_process(cache_dir: Path) -> dict:
  result = subprocess.run(
    [sys.executable, "-c", PROCESS, str(cache_dir), str(REPO)],
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_compiled_step_from_the_cache(tmp_path):
  cache_dir = tmp_path / "compiled"
  first = _run_process(cache_dir)
  assert first["hits"] == 0 and first["misses"] >= 1  # compiled, then written
  assert any(cache_dir.iterdir())
  second = _run_process(cache_dir)
  assert second["misses"] == 0 and second["hits"] >= 1  # every program of the step came from disk
  np.testing.assert_array_equal(second["prompt"], first["prompt"])
  # Another directory is another cache: nothing to load there.
  other = _run_process(tmp_path / "other")
  assert other["hits"] == 0 and other["misses"] >= 1


def test_the_cache_directory_can_move_within_a_process(tmp_path):
  previous = jax.config.jax_compilation_cache_dir
  try:
    for name in ("a", "b"):
      directory = compilation.enable_persistent_cache(tmp_path / name, min_compile_time_secs=0)
      assert directory == str(tmp_path / name) and jax.config.jax_compilation_cache_dir == directory
      with compilation.count_cache_events() as events:
        # A program no other test compiles: where the cache lives decides where it is written.
        jax.jit(lambda x: jax.numpy.sin(x) * 3.25 + 0.5)(np.arange(7.0, dtype=np.float32)).block_until_ready()
      assert events.misses == 1 and any((tmp_path / name).iterdir())
  finally:
    compilation.disable_persistent_cache()
    if previous is not None:
      compilation.enable_persistent_cache(previous)
