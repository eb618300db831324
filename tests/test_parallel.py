"""Data parallel steps on 2 simulated CPU devices (tests/conftest.py) equal the single-device steps.

The optimizer here is SGD: Adafactor is invariant to the gradient's scale, so it would hide a doubled
(summed instead of averaged) gradient; SGD does not, and `grad_norm` is compared as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_algorithms import (
  deterministic_standin_loss,
  make_t5_model,
  random_batch,
  random_episode,
  random_prompt,
  standin_loss,
  standin_params,
)

from mpt_jax import algorithms, methods, optim, parallel
from mpt_jax.algorithms import common

pytestmark = [
  pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 (simulated) devices"),
  pytest.mark.usefixtures("fast_compile"),  # tiny models: compiling dominates
]


@pytest.fixture(scope="module")
def mesh():
  return parallel.make_mesh(jax.devices()[:2])


def assert_steps_agree(method, loss_fn, frozen, prompt, batches, mesh, *, rtol=1e-5, **kwargs):
  """Two steps sharded vs on one device: same states and metrics."""
  sgd = optim.make_optimizer("sgd", 1.0)
  single = algorithms.jit_step(methods.make_step(method, loss_fn, sgd, **kwargs))
  sharded = parallel.make_sharded_step(method, loss_fn, sgd, mesh, **kwargs)
  single_state = common.init_state(prompt, sgd)
  sharded_state = parallel.replicate(common.init_state(prompt, sgd), mesh)
  frozen_before = jax.tree_util.tree_map(np.array, frozen)
  for i, batch in enumerate(batches):
    rng = jax.random.key(100 + i)
    single_state, single_metrics = single(single_state, frozen, batch, rng)
    sharded_state, sharded_metrics = sharded(
      sharded_state, parallel.replicate(frozen, mesh), parallel.shard(batch, mesh), rng
    )
    for name in ("loss", "grad_norm"):
      np.testing.assert_allclose(
        sharded_metrics[name], single_metrics[name], rtol=rtol, err_msg=f"{method} step {i}: {name}"
      )
    assert bool(sharded_metrics["update_ok"])
    np.testing.assert_allclose(sharded_state.prompt, single_state.prompt, rtol=rtol, atol=rtol * 1e-1)
  assert int(sharded_state.step) == len(batches)
  assert sharded_state.prompt.sharding.is_fully_replicated
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen_before, jax.device_get(frozen))


def test_mesh_by_default_is_all_data_parallel(mesh):
  """model_parallel=1: the 'model' axis has size 1, every device holds every frozen weight."""
  assert mesh.axis_names == (parallel.DATA_AXIS, parallel.MODEL_AXIS)
  assert dict(mesh.shape) == {parallel.DATA_AXIS: 2, parallel.MODEL_AXIS: 1}


@pytest.mark.parametrize("method", ["maml", "reptile"])
def test_sharded_meta_step_equals_single_device(mesh, method):
  """With dropout on: each task draws the same rngs on whichever device it lands."""
  episodes = [random_episode(i, tasks=4, with_query=method != "reptile") for i in range(2)]
  assert_steps_agree(method, standin_loss, standin_params(), random_prompt(), episodes, mesh, inner_lr=0.5)


def test_sharded_pt_step_equals_single_device(mesh):
  """Both shards hold equally many target tokens, so the mean of the per-device means is the mean."""
  batches = [random_batch(np.random.default_rng(i), (4,), full_targets=True) for i in range(2)]
  assert_steps_agree("pt", deterministic_standin_loss, standin_params(), random_prompt(), batches, mesh)


def test_sharded_tiny_t5_pt_step_equals_single_device(mesh):
  model = make_t5_model()
  batches = [
    random_batch(np.random.default_rng(i), (4,), full_targets=True, **model.batch_kw) for i in range(2)
  ]
  assert_steps_agree("pt", model.loss_fn, model.frozen, model.prompt, batches, mesh, rtol=1e-4)


def test_sharded_grid_equals_vmapped_grid(mesh):
  learning_rates = [0.5, 0.4, 0.3, 0.2]
  frozen = standin_params()
  step = methods.make_step("pt", standin_loss, optim.make_optimizer("adafactor", 0.5))
  prompts = jnp.stack([random_prompt(seed) for seed in range(4)])
  states = algorithms.init_grid_state(prompts, optim.make_optimizer("adafactor", 0.5), learning_rates)
  vmapped = jax.jit(algorithms.make_grid_step(step))
  sharded = parallel.shard_grid_step(step, mesh)
  sharded_states = parallel.shard(states, mesh, "grid states")
  for i in range(2):
    batches = random_batch(np.random.default_rng(i), (4, 4))
    rngs = jax.random.split(jax.random.key(i), 4)
    states, metrics = vmapped(states, frozen, batches, rngs)
    sharded_states, sharded_metrics = sharded(
      sharded_states,
      parallel.replicate(frozen, mesh),
      parallel.shard(batches, mesh),
      parallel.shard(rngs, mesh),
    )
  np.testing.assert_allclose(sharded_states.prompt, states.prompt, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sharded_metrics["loss"], metrics["loss"], rtol=1e-5)
  np.testing.assert_allclose(sharded_metrics["learning_rate"], learning_rates)
  assert not sharded_states.prompt.sharding.is_fully_replicated  # runs live on their own device


def test_indivisible_leading_axis_fails_clearly(mesh):
  sgd = optim.make_optimizer("sgd", 1.0)
  sharded = parallel.make_sharded_step("maml", deterministic_standin_loss, sgd, mesh, inner_lr=0.1)
  with pytest.raises(ValueError, match="does not split over 2 devices"):
    sharded(
      parallel.replicate(common.init_state(random_prompt(), sgd), mesh),
      standin_params(),
      random_episode(0, tasks=3),
      jax.random.key(0),
    )


def test_a_grid_of_runs_that_does_not_divide_over_the_devices_is_padded_not_run_on_one(mesh):
  # 3 runs over 2 devices: padded to 4 inside the step (no silent fallback to one device), the padding
  # dropped from what comes back; the 3 runs are those of the unsharded grid.
  learning_rates = [0.5, 0.3, 0.2]
  frozen = standin_params()
  step = methods.make_step("pt", standin_loss, optim.make_optimizer("adafactor", 0.5))
  states = algorithms.init_grid_state(
    jnp.stack([random_prompt(seed) for seed in range(3)]),
    optim.make_optimizer("adafactor", 0.5),
    learning_rates,
  )
  batches = random_batch(np.random.default_rng(0), (3, 4))
  rngs = jax.random.split(jax.random.key(0), 3)
  expected, expected_metrics = jax.jit(algorithms.make_grid_step(step))(states, frozen, batches, rngs)
  sharded, metrics = parallel.shard_grid_step(step, mesh)(
    states, parallel.replicate(frozen, mesh), batches, rngs
  )
  assert sharded.prompt.shape[0] == 3 and metrics["loss"].shape == (3,)
  np.testing.assert_allclose(sharded.prompt, expected.prompt, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["learning_rate"], learning_rates)
  assert parallel.padded_runs(3, mesh) == 4 and parallel.padded_runs(4, mesh) == 4
  layout = parallel.RunLayout(mesh, 3)  # how the pipeline places runs: padded by the last, split
  placed = layout.put({"ids": np.arange(3)})
  assert placed["ids"].tolist() == [0, 1, 2, 2] and not placed["ids"].sharding.is_fully_replicated
  assert layout.local.tolist() == [0, 1, 2, 2]  # one process: it feeds every row
  assert layout.to_host(placed)["ids"].tolist() == [0, 1, 2]


def test_each_process_builds_only_the_rows_its_devices_hold(mesh):
  """The rows a process feeds are those of its devices; with one process, all of them. (Two processes
  feeding halves: tests/test_multiprocess.py.)"""
  assert parallel.process_rows(mesh, 4) == slice(0, 4)
  calls = []

  def sample(step, rows):
    calls.append(rows)
    return {"x": np.arange(4)[rows] + 10 * step}

  batch = parallel.fed_by_process(sample, 4, mesh)(2)
  assert calls == [slice(0, 4)] and batch["x"].tolist() == [20, 21, 22, 23]
  assert [s.data.tolist() for s in batch["x"].addressable_shards] == [[20, 21], [22, 23]]
  with pytest.raises(ValueError, match="does not split over 2 devices"):
    parallel.process_rows(mesh, 3)
