"""The downstream grid in chunks of runs that fit a memory budget: the same results as one big step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_t5
from mpt_jax import adapt, algorithms, chunking, decode, optim

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates

NUM_RUNS = 4


@pytest.fixture(scope="module")
def grid():
  model, params = helpers_t5.tiny_t5("1.1", seed=2, dropout_rate=0.0)
  optimizer = optim.make_optimizer("adafactor", 1.0)
  loss_fn = algorithms.make_loss_fn(model, deterministic=True)
  prompts = 0.5 * np.random.default_rng(0).normal(size=(NUM_RUNS, 3, model.config.d_model))
  batches = [
    {
      k: v.reshape(NUM_RUNS, 2, -1)
      for k, v in helpers_t5.random_batch(step, batch=2 * NUM_RUNS, input_length=7, target_length=4).items()
    }
    for step in range(3)
  ]
  return model, params, optimizer, loss_fn, prompts.astype(np.float32), batches


def _bytes_for(grid_step, args, runs: int) -> int:
  """Compiled memory of the grid step for `runs` runs (what the planner measures)."""
  return chunking.compiled_bytes(chunking.RunChunks(grid_step.fn, (0, None, 0, 0))._compile(args, runs))


def _train(grid_step, grid, steps: int = 3):
  _, params, optimizer, _, prompts, batches = grid
  states = algorithms.init_grid_state(prompts, optimizer, [0.5, 0.4, 0.3, 0.2])
  losses = []
  for step in range(steps):
    rngs = jax.random.split(jax.random.key(step), NUM_RUNS)
    states, metrics = grid_step(states, params, batches[step], rngs)
    losses.append(np.asarray(metrics["loss"]))
  return jax.device_get(states), np.stack(losses)


def test_a_chunked_grid_equals_the_grid_in_one_step(grid):
  _, params, optimizer, loss_fn, prompts, batches = grid
  whole = adapt.make_grid_trainer(loss_fn, optimizer)  # CPU, no budget: one chunk, the jitted step
  states = algorithms.init_grid_state(prompts, optimizer, [0.5, 0.4, 0.3, 0.2])
  args = (states, params, batches[0], jax.random.split(jax.random.key(0), NUM_RUNS))
  assert whole.plan(*args).num_chunks == 1
  sizes = {runs: _bytes_for(whole, args, runs) for runs in (1, 2, 4)}
  assert sizes[1] < sizes[2] < sizes[4]  # memory grows with the runs in a chunk
  chunked = adapt.make_grid_trainer(loss_fn, optimizer, memory_budget_bytes=sizes[2])
  plan = chunked.plan(*args)
  assert plan.num_chunks == 2 and plan.chunk_bytes <= sizes[2]  # the fewest chunks that fit
  expected_states, expected_losses = _train(whole, grid)
  chunked_states, chunked_losses = _train(chunked, grid)
  # Programs compiled for 2 and 4 runs round float32 sums differently in the last bits, and Adafactor
  # normalizes its update, which carries that to ~5e-6 in the prompt over 3 steps at lr 0.5 (as between
  # the vmapped grid and runs one by one, tests/test_pipeline.py). A mixed-up run would differ at O(1).
  np.testing.assert_allclose(chunked_losses, expected_losses, rtol=1e-6)
  jax.tree_util.tree_map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=3e-5), chunked_states, expected_states
  )
  assert not np.allclose(expected_states.prompt, prompts)  # the runs did train
  # A budget below one run's needs: one run per chunk (the most there can be), with a warning.
  tight = adapt.make_grid_trainer(loss_fn, optimizer, memory_budget_bytes=sizes[1] // 2)
  assert tight.plan(*args).num_chunks == NUM_RUNS
  tight_states, _ = _train(tight, grid, steps=1)
  one_step, _ = _train(whole, grid, steps=1)
  np.testing.assert_allclose(tight_states.prompt, one_step.prompt, rtol=1e-4, atol=3e-5)


def test_chunked_decoding_equals_decoding_all_runs_at_once(grid):
  model, params, _, _, prompts, batches = grid
  generate = jax.jit(
    jax.vmap(
      lambda frozen, prompt, ids, mask: decode.greedy_decode(model, frozen, ids, mask, prompt, max_length=5),
      in_axes=(None, 0, 0, 0),
    )
  )
  args = (params, jnp.asarray(prompts), batches[1]["input_ids"], batches[1]["input_mask"])
  whole = chunking.RunChunks(generate, (None, 0, 0, 0))
  one_run = chunking.compiled_bytes(whole._compile(args, 1))
  chunked = chunking.RunChunks(generate, (None, 0, 0, 0), budget_bytes=one_run)
  assert chunked.plan(*args).num_chunks == NUM_RUNS
  np.testing.assert_array_equal(chunked(*args), whole(*args))


def test_runs_must_agree_on_their_number():
  chunks = chunking.RunChunks(jax.jit(lambda a, b: a + b), (0, 0), budget_bytes=1 << 30)
  with pytest.raises(ValueError, match="run axis"):
    chunks(np.zeros((4, 2)), np.zeros((3, 2)))
  assert chunking.device_memory_budget() is None  # CPU: no memory limit reported
