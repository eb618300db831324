"""Steps on a 2-D mesh ('data' 2 x 'model' 4) of 8 simulated CPU devices, the frozen T5 split over
'model' by mpt_jax/sharding.py, equal the single-device steps: PT, second-order MAML (with dropout and
with remat), Reptile, the downstream grid (3 runs: padded over 'data'), greedy decoding; and the
weights stay split while the step runs.

Not collected with the other tests (the process needs 8 devices; tests/conftest.py gives 2):
tests/test_sharding.py runs this module in a pytest subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8. Run it alone the same way:

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/mesh_2d_checks.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_t5
from mpt_jax import algorithms, methods, optim, parallel, scoring
from mpt_jax.algorithms import common

pytestmark = [
  pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices"),
  pytest.mark.usefixtures("fast_compile"),
]
DATA, MODEL = 2, 4


@pytest.fixture(scope="module")
def mesh():
  mesh = parallel.make_mesh(model_parallel=MODEL)
  assert dict(mesh.shape) == {"data": DATA, "model": MODEL}
  return mesh


@pytest.fixture(scope="module")
def t5():
  """A one-layer tiny T5 v1.1 with dropout: every split dimension (heads x d_kv 16, d_ff 32, vocabulary
  64) divides over the 4 devices of 'model'."""
  model, frozen = helpers_t5.tiny_t5("1.1", num_layers=1, num_decoder_layers=1, dropout_rate=0.1)
  prompt = np.random.default_rng(0).normal(size=(3, model.config.d_model)).astype(np.float32)
  return model, frozen, prompt


def _episode(seed, *, with_query=True, tasks=4):
  """T tasks x (K=1 inner step of 2 examples) + 2 query examples each."""
  batch = lambda s, n: helpers_t5.random_batch(s, batch=tasks * n, input_length=6, target_length=3)
  shape = lambda b, lead: {k: v.reshape(*lead, *v.shape[1:]) for k, v in b.items()}
  episode = {"support": shape(batch(seed, 2), (tasks, 1, 2))}
  if with_query:
    episode["query"] = shape(batch(seed + 100, 2), (tasks, 2))
  return episode


def test_frozen_weights_are_split_over_the_model_axis(mesh, t5):
  _, frozen, _ = t5
  placed = parallel.place_frozen(frozen, mesh)
  query = placed["encoder"]["block_0"]["layer_0"]["SelfAttention"]["q"]["kernel"]  # [16, heads * d_kv 16]
  assert {s.data.shape for s in query.addressable_shards} == {(16, 16 // MODEL)}
  assert {s.data.shape for s in placed["shared"]["embedding"].addressable_shards} == {(64 // MODEL, 16)}
  norm = placed["encoder"]["final_layer_norm"]["weight"]
  assert norm.sharding.is_fully_replicated
  total = sum(x.nbytes for x in jax.tree.leaves(frozen))
  on_device_0 = sum(
    s.data.nbytes
    for x in jax.tree.leaves(placed)
    for s in x.addressable_shards
    if s.device == mesh.devices[0, 0]
  )
  assert on_device_0 < total / MODEL * 1.1  # only the layer norms and position biases are whole
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), placed, frozen)


def _steps_agree(mesh, t5, method, batches, *, deterministic, rtol=2e-5, **kwargs):
  """Two steps on the mesh vs on one device: the same prompts and losses."""
  model, frozen, prompt = t5
  loss_fn = algorithms.make_loss_fn(model, deterministic=deterministic)
  sgd = optim.make_optimizer("sgd", 1.0)  # not scale invariant: a doubled gradient would show
  single = algorithms.jit_step(methods.make_step(method, loss_fn, sgd, **kwargs))
  sharded = parallel.make_sharded_step(method, loss_fn, sgd, mesh, **kwargs)
  placed = parallel.place_frozen(frozen, mesh)
  single_state = common.init_state(prompt, sgd)
  sharded_state = parallel.replicate(common.init_state(prompt, sgd), mesh)
  for i, batch in enumerate(batches):
    rng = jax.random.key(10 + i)
    single_state, expected = single(single_state, frozen, batch, rng)
    sharded_state, got = sharded(sharded_state, placed, parallel.shard(batch, mesh), rng)
    for name in ("loss", "grad_norm"):
      np.testing.assert_allclose(got[name], expected[name], rtol=rtol, err_msg=f"{method} step {i}: {name}")
    np.testing.assert_allclose(sharded_state.prompt, single_state.prompt, rtol=rtol, atol=rtol / 10)
  assert sharded_state.prompt.sharding.is_fully_replicated
  # The weights kept their split: the step read them in place, it did not gather them.
  kernel = placed["decoder"]["block_0"]["layer_2"]["DenseReluDense"]["wo"]["kernel"]
  assert {s.data.shape for s in kernel.addressable_shards} == {(32 // MODEL, 16)}


@pytest.mark.parametrize("remat", [False, True], ids=["maml", "maml_remat"])
def test_second_order_maml_with_dropout_equals_one_device(mesh, t5, remat):
  """Each task draws its dropout by its index in the meta-batch, wherever it runs."""
  episodes = [_episode(i) for i in range(2)]
  _steps_agree(mesh, t5, "maml", episodes, deterministic=False, inner_lr=0.5, remat=remat)


def test_reptile_equals_one_device(mesh, t5):
  episodes = [_episode(i, with_query=False) for i in range(2)]
  _steps_agree(mesh, t5, "reptile", episodes, deterministic=False, inner_lr=0.5)


def test_pt_step_equals_one_device(mesh, t5):
  """Without dropout (PT draws one dropout rng per data shard) and with full targets (the mean of the
  shards' token means is the batch's token mean when they hold as many target tokens)."""
  batches = [
    helpers_t5.random_batch(i, batch=4, input_length=6, target_length=3, min_target=3) for i in range(2)
  ]
  _steps_agree(mesh, t5, "pt", batches, deterministic=True)


def test_grid_of_three_runs_equals_the_vmapped_grid(mesh, t5):
  """3 runs over the 2 rows of 'data' (padded to 4 by RunLayout), each with its own learning rate."""
  model, frozen, prompt = t5
  loss_fn = algorithms.make_loss_fn(model, deterministic=False)
  adafactor = optim.make_optimizer("adafactor", 1.0)
  step = algorithms.make_pt_step(loss_fn, adafactor)
  learning_rates = [0.5, 0.3, 0.2]
  states = algorithms.init_grid_state(jnp.asarray(prompt), adafactor, learning_rates)
  layout = parallel.RunLayout(mesh, 3)
  vmapped, sharded = jax.jit(algorithms.make_grid_step(step)), parallel.shard_grid_step(step, mesh)
  placed, sharded_states = parallel.place_frozen(frozen, mesh), layout.put(parallel.to_host(states))
  for i in range(2):
    batches = {
      k: v.reshape(3, 2, -1)
      for k, v in helpers_t5.random_batch(i, batch=6, input_length=6, target_length=3).items()
    }
    rngs = jax.random.split(jax.random.PRNGKey(i), 3)
    states, expected = vmapped(states, frozen, batches, rngs)
    sharded_states, got = sharded(sharded_states, placed, layout.put(batches), layout.put(rngs))
  np.testing.assert_allclose(layout.to_host(sharded_states.prompt), states.prompt, rtol=2e-5, atol=2e-6)
  np.testing.assert_allclose(layout.to_host(got["loss"]), expected["loss"], rtol=2e-5)
  np.testing.assert_allclose(layout.to_host(got["learning_rate"]), learning_rates)


def test_greedy_decoding_of_runs_equals_one_device(mesh, t5):
  model, frozen, prompt = t5
  generate = scoring.make_generate(
    model,
    "greedy",
    max_decode_len=5,
    placement="prepend",
    num_beams=1,
    repetition_penalty=1.0,
    early_stopping=False,
  )
  prompts = np.stack([prompt, prompt * 0.5, prompt * -1.0])
  batch = helpers_t5.random_batch(7, batch=6, input_length=6, target_length=3)
  ids, mask = batch["input_ids"].reshape(3, 2, 6), batch["input_mask"].reshape(3, 2, 6)
  expected = np.asarray(generate(frozen, prompts, ids, mask))
  layout = parallel.RunLayout(mesh, 3)
  got = layout.to_host(generate(parallel.place_frozen(frozen, mesh), *layout.put((prompts, ids, mask))))
  np.testing.assert_array_equal(got, expected)


def test_the_maml_step_reads_the_weights_in_place_never_gathering_one(mesh, t5):
  """Tensor parallelism, not a gather of each weight before use: the compiled second-order MAML step
  has cross-device reductions (of partial matmul sums over 'model', of the gradient over 'data') and
  no all-gather, so no device ever holds more than its share of a weight."""
  import re

  model, frozen, prompt = t5
  sgd = optim.make_optimizer("sgd", 1.0)
  step = parallel.make_sharded_step(
    "maml", algorithms.make_loss_fn(model, deterministic=False), sgd, mesh, inner_lr=0.5
  )
  args = (parallel.replicate(common.init_state(prompt, sgd), mesh), parallel.place_frozen(frozen, mesh))
  hlo = step.lower(*args, parallel.shard(_episode(0), mesh), jax.random.key(0)).compile().as_text()
  assert re.search(r"all-reduce(-start)?\(", hlo) and not re.search(r"all-gather(-start)?\(", hlo)
