"""PT/MTL, MAML, first-order MAML and Reptile steps against independent computations.

References here are written without the library's scan/vmap: plain Python loops over tasks and inner
steps with jax.grad of the whole, finite differences in float64, and the closed forms of first-order
MAML and Reptile. They run on a small stand-in model (fast, float64-capable: a nonlinear function of
the prompt through softmax attention and tanh, with dropout) and on a tiny T5 (the real loss).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mpt_jax import algorithms, methods, optim
from mpt_jax.algorithms import common, maml, reptile

pytestmark = [
  pytest.mark.compat,  # every algorithm's step and the grid, in the newest-JAX environment too
  pytest.mark.usefixtures("fast_compile"),  # tiny models: compiling dominates
]

# ---------------------------------------------------------------------------------------------------
# A stand-in for the frozen T5: same batch format, nonlinear in the prompt, dropout from the rng.
# ---------------------------------------------------------------------------------------------------
VOCAB, D_MODEL, HIDDEN, L_IN, L_OUT, NUM_PROMPT = 13, 6, 8, 5, 3, 4


def standin_params(seed=0, dtype=jnp.float32):
  # numpy draws: eager jax.random ops would each compile (seconds on a busy CPU).
  rng = np.random.default_rng(seed)
  return {
    "embedding": jnp.asarray(rng.normal(size=(VOCAB, D_MODEL)), dtype),
    "w_in": jnp.asarray(rng.normal(size=(D_MODEL, HIDDEN)) / np.sqrt(D_MODEL), dtype),
    "w_out": jnp.asarray(rng.normal(size=(HIDDEN, VOCAB)) / np.sqrt(HIDDEN), dtype),
    "position": jnp.asarray(rng.normal(size=(L_OUT, VOCAB)), dtype),
  }


def hashed_uniform(rng, shape):
  """Uniform [0, 1) numbers from an rng by an integer hash of (key, position): the same role as
  jax.random.uniform, at a fraction of its (threefry) compile time on CPU."""
  key = jax.random.key_data(rng).astype(jnp.uint32)
  x = jnp.arange(int(np.prod(shape)), dtype=jnp.uint32).reshape(shape) * jnp.uint32(0x9E3779B1) + key[0]
  for multiplier, word in ((0x85EBCA6B, key[1]), (0xC2B2AE35, key[0]), (0x27D4EB2F, key[1])):
    x = (x ^ (x >> 16) ^ word) * jnp.uint32(multiplier)
  return (x >> 8).astype(jnp.float32) / np.float32(2**24)


def standin_loss(prompt, frozen_params, batch, rng, *, dropout_rate=0.2):
  """Token cross-entropy of a one-layer 'model' that attends over the prompt."""
  mask = batch["input_mask"][..., None].astype(prompt.dtype)
  tokens = frozen_params["embedding"][batch["input_ids"]].astype(prompt.dtype)
  pooled = jnp.sum(tokens * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1.0)  # [B, D]
  attended = jax.nn.softmax(pooled @ prompt.T, axis=-1) @ prompt  # [B, D]
  hidden = jnp.tanh((pooled + attended) @ frozen_params["w_in"])  # [B, H]
  if dropout_rate and rng is not None:
    keep = hashed_uniform(rng, hidden.shape) >= dropout_rate
    hidden = jnp.where(keep, hidden / (1.0 - dropout_rate), 0.0)
  logits = (hidden @ frozen_params["w_out"])[:, None, :] + frozen_params["position"][None]
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  token_ll = jnp.take_along_axis(log_probs, batch["target_ids"][..., None], axis=-1)[..., 0]
  target_mask = batch["target_mask"].astype(prompt.dtype)
  return -jnp.sum(token_ll * target_mask) / jnp.maximum(jnp.sum(target_mask), 1.0)


deterministic_standin_loss = functools.partial(standin_loss, dropout_rate=0.0)


def random_batch(
  rng: np.random.Generator, lead: tuple[int, ...], *, vocab=VOCAB, l_in=L_IN, l_out=L_OUT, full_targets=False
):
  """A right-padded batch with leading dims `lead` (e.g. (T, K, b)), ids in [2, vocab)."""

  def padded(length, full):
    lengths = np.full(lead, length) if full else rng.integers(1, length + 1, size=lead)
    mask = (np.arange(length) < lengths[..., None]).astype(np.int32)
    return rng.integers(2, vocab, size=(*lead, length)).astype(np.int32) * mask, mask

  input_ids, input_mask = padded(l_in, False)
  target_ids, target_mask = padded(l_out, full_targets)
  return {
    "input_ids": input_ids,
    "input_mask": input_mask,
    "target_ids": target_ids,
    "target_mask": target_mask,
  }


def random_episode(seed, *, tasks=2, inner_steps=2, support=3, query=3, with_query=True, **kw):
  rng = np.random.default_rng(seed)
  episode = {"support": random_batch(rng, (tasks, inner_steps, support), **kw)}
  if with_query:
    episode["query"] = random_batch(rng, (tasks, query), **kw)
  return episode


def random_prompt(seed=1, shape=(NUM_PROMPT, D_MODEL), dtype=jnp.float32):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def take(tree, *index):
  return jax.tree_util.tree_map(lambda x: x[index], tree)


# ---------------------------------------------------------------------------------------------------
# Independent references: Python loops, no scan, no vmap. The rng plan is spelled out here as the spec:
# task t of the meta-batch uses fold_in(rng, t); its inner steps split(fold_in(task, 0), K) and its
# query pass fold_in(task, 1).
# ---------------------------------------------------------------------------------------------------
def reference_task_rngs(rng, task_index, num_inner_steps):
  task_rng = jax.random.fold_in(rng, task_index)
  return jax.random.split(jax.random.fold_in(task_rng, 0), num_inner_steps), jax.random.fold_in(task_rng, 1)


def reference_adapt(loss_fn, theta, frozen, support, inner_rngs, inner_lr, *, first_order=False):
  phi = theta
  for k in range(support["input_ids"].shape[0]):
    grad = jax.grad(loss_fn)(phi, frozen, take(support, k), inner_rngs[k])
    phi = phi - inner_lr * (jax.lax.stop_gradient(grad) if first_order else grad)
  return phi


def reference_meta_loss(loss_fn, theta, frozen, episode, rng, inner_lr, *, first_order=False):
  """Mean over tasks of the query loss after the inner loop, as one differentiable Python program."""
  num_tasks, num_inner_steps = episode["support"]["input_ids"].shape[:2]
  total = 0.0
  for t in range(num_tasks):
    inner_rngs, outer_rng = reference_task_rngs(rng, t, num_inner_steps)
    phi = reference_adapt(
      loss_fn, theta, frozen, take(episode["support"], t), inner_rngs, inner_lr, first_order=first_order
    )
    total = total + loss_fn(phi, frozen, take(episode["query"], t), outer_rng)
  return total / num_tasks


def grad_of(grad_fn, prompt, frozen, batch, rng, shard_index=0):
  return jax.jit(grad_fn)(prompt, frozen, batch, rng, jnp.int32(shard_index))


# ---------------------------------------------------------------------------------------------------
# Two models behind the same tests: the stand-in (with dropout) and a tiny T5 (one encoder and one
# decoder layer, d_model 16; deterministic: its dropout would multiply compile time, and the rng plan is
# checked on the stand-in). Compiled functions are cached with the models, shared by the tests.
# ---------------------------------------------------------------------------------------------------
INNER_LR = 0.5  # large, so that second-order terms are far above float32 noise


def jit_maml_grad_fn(loss_fn, *, first_order=False, remat=False):
  """The library's meta-gradient, compiled once with inner_lr as an argument (0.5 and 0.0 share it).

  (prompt, frozen, episode, rng, inner_lr, shard_index=0) -> (meta-gradient, metrics)
  """
  jitted = jax.jit(
    lambda prompt, frozen, episode, rng, inner_lr, shard_index: maml.make_maml_grad_fn(
      loss_fn, inner_lr=inner_lr, first_order=first_order, remat=remat
    )(prompt, frozen, episode, rng, shard_index)
  )
  return lambda *args, shard_index=0: jitted(*args, jnp.int32(shard_index))


class Model:
  def __init__(self, name, loss_fn, frozen, prompt, batch_kw, episode_kw):
    self.name, self.loss_fn, self.frozen, self.prompt = name, loss_fn, frozen, prompt
    self.batch_kw, self.episode_kw = batch_kw, episode_kw  # random_batch / random_episode options
    self.maml_grad = jit_maml_grad_fn(loss_fn)
    self.fomaml_grad = jit_maml_grad_fn(loss_fn, first_order=True)

  def episode(self, seed, **kw):
    return random_episode(seed, **{**self.batch_kw, **self.episode_kw, **kw})


@functools.cache
def make_standin_model():
  return Model("standin", standin_loss, standin_params(), random_prompt(), {}, {})


@functools.cache
def make_t5_model():
  from helpers_t5 import tiny_t5  # the model engineer's tiny-T5 fixture

  # v1.1 (gated-GELU): smooth, so finite differences are clean (ReLU kinks are not).
  t5, frozen = tiny_t5("1.1", num_layers=1, num_decoder_layers=1)
  return Model(
    "t5",
    common.make_loss_fn(t5, deterministic=True),
    frozen,
    random_prompt(shape=(NUM_PROMPT, t5.config.d_model)),
    dict(vocab=t5.config.vocab_size),
    dict(support=2, query=2, inner_steps=1),
  )


@pytest.fixture(scope="module", params=["standin", "t5"])
def model(request):
  return make_standin_model() if request.param == "standin" else make_t5_model()


# ---------------------------------------------------------------------------------------------------
# MAML
# ---------------------------------------------------------------------------------------------------
def test_maml_meta_gradient_equals_unrolled_python_loop(model):
  """Scan over inner steps + vmap over tasks == a Python loop over both, differentiated as a whole.

  On the stand-in with dropout on: the rng plan (per task, per inner step, outer pass) is checked too.
  """
  episode = model.episode(0)
  rng = jax.random.key(7)
  grad, metrics = model.maml_grad(model.prompt, model.frozen, episode, rng, INNER_LR)
  ref_loss, ref_grad = jax.jit(
    jax.value_and_grad(lambda p: reference_meta_loss(model.loss_fn, p, model.frozen, episode, rng, INNER_LR))
  )(model.prompt)
  np.testing.assert_allclose(metrics["loss"], ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-6 * np.abs(ref_grad).max())
  # Second order matters at this inner_lr: the first-order meta-gradient is measurably different.
  first_order, _ = model.fomaml_grad(model.prompt, model.frozen, episode, rng, INNER_LR)
  assert np.abs(first_order - ref_grad).max() > 30 * np.abs(grad - ref_grad).max()


def test_maml_meta_gradient_equals_finite_differences_float64():
  with jax.enable_x64(True):
    frozen = standin_params(dtype=jnp.float64)
    theta = random_prompt(dtype=jnp.float64)
    episode = random_episode(1)
    rng = jax.random.key(3)
    loss_fn = deterministic_standin_loss
    grad_fn = jax.jit(maml.make_maml_grad_fn(loss_fn, inner_lr=INNER_LR))
    grad, _ = grad_fn(theta, frozen, episode, rng, jnp.int32(0))
    assert grad.dtype == jnp.float64
    # The meta-loss value comes with the gradient; the test above shows it equals the unrolled one.
    meta_loss = lambda p: grad_fn(p, frozen, episode, rng, jnp.int32(0))[1]["loss"]
    eps = 1e-6
    for seed in range(3):
      direction = random_prompt(100 + seed, theta.shape, jnp.float64)
      numeric = (meta_loss(theta + eps * direction) - meta_loss(theta - eps * direction)) / (2 * eps)
      np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=1e-7)


def test_maml_meta_gradient_equals_finite_differences_tiny_t5():
  """float32 (the T5 computes in float32): 4-point central differences of the meta-loss, which the test
  above shows equals the unrolled reference's value."""
  model = make_t5_model()
  episode = model.episode(1)
  rng = jax.random.key(3)
  theta = model.prompt
  grad, _ = model.maml_grad(theta, model.frozen, episode, rng, INNER_LR)
  fo_grad, _ = model.fomaml_grad(theta, model.frozen, episode, rng, INNER_LR)
  meta_loss = lambda p: np.float64(model.maml_grad(p, model.frozen, episode, rng, INNER_LR)[1]["loss"])
  h = 1e-2
  directions = [
    grad / jnp.linalg.norm(grad),
    (grad - fo_grad) / jnp.linalg.norm(grad - fo_grad),
    *(random_prompt(100 + s, theta.shape) for s in range(2)),
  ]
  for direction in directions:
    direction = direction / jnp.linalg.norm(direction)
    f = {k: meta_loss(theta + k * h * direction) for k in (-2, -1, 1, 2)}
    numeric = (8 * (f[1] - f[-1]) - (f[2] - f[-2])) / (12 * h)
    np.testing.assert_allclose(jnp.vdot(grad, direction), numeric, rtol=3e-3, atol=5e-4)
  # The second-order part is resolved, not just the first-order one: along (maml - fomaml) the two
  # gradients disagree by far more than the tolerance.
  along = directions[1]
  assert abs(float(jnp.vdot(grad - fo_grad, along))) > 5 * (3e-3 * abs(float(jnp.vdot(grad, along))) + 5e-4)


def test_first_order_maml_is_query_gradient_at_adapted_prompt(model):
  episode = model.episode(2)
  rng = jax.random.key(11)
  loss_fn, frozen = model.loss_fn, model.frozen
  grad, _ = model.fomaml_grad(model.prompt, frozen, episode, rng, INNER_LR)
  num_tasks, num_inner_steps = episode["support"]["input_ids"].shape[:2]

  @jax.jit
  def expected_gradient(theta):
    expected = 0.0
    for t in range(num_tasks):
      inner_rngs, outer_rng = reference_task_rngs(rng, t, num_inner_steps)
      phi = reference_adapt(loss_fn, theta, frozen, take(episode["support"], t), inner_rngs, INNER_LR)
      expected = expected + jax.grad(loss_fn)(phi, frozen, take(episode["query"], t), outer_rng)
    return expected / num_tasks

  expected = expected_gradient(model.prompt)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())


def test_maml_with_zero_inner_lr_is_plain_query_gradient(model):
  episode = model.episode(3)
  rng = jax.random.key(5)
  loss_fn, frozen = model.loss_fn, model.frozen
  grad, _ = model.maml_grad(model.prompt, frozen, episode, rng, 0.0)
  num_tasks, num_inner_steps = episode["support"]["input_ids"].shape[:2]
  expected = jax.jit(
    lambda theta: (
      sum(
        jax.grad(loss_fn)(
          theta, frozen, take(episode["query"], t), reference_task_rngs(rng, t, num_inner_steps)[1]
        )
        for t in range(num_tasks)
      )
      / num_tasks
    )
  )(model.prompt)
  # The vmapped meta-batch and this sum over tasks add the same float32 terms in other orders: their
  # difference is a few float32 epsilons (1.2e-7) of the largest gradient entry, not of each entry.
  np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())


def test_vmapped_tasks_equal_one_task_at_a_time():
  """The meta-batch of T tasks = the mean of T one-task meta-batches (task t keyed by its index t,
  as a device holding only task t would key it). With dropout on."""
  model = make_standin_model()
  episode = model.episode(4)
  rng = jax.random.key(9)
  grad, metrics = model.maml_grad(model.prompt, model.frozen, episode, rng, INNER_LR)
  per_task = [
    model.maml_grad(model.prompt, model.frozen, take(episode, slice(t, t + 1)), rng, INNER_LR, shard_index=t)
    for t in range(2)
  ]
  np.testing.assert_allclose(grad, np.mean([g for g, _ in per_task], axis=0), rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["loss"], np.mean([m["loss"] for _, m in per_task]), rtol=1e-6)


def test_remat_inner_steps_gives_the_same_meta_gradient():
  model = make_standin_model()
  episode = model.episode(5)
  rng = jax.random.key(2)
  plain, _ = model.maml_grad(model.prompt, model.frozen, episode, rng, INNER_LR)
  remat, _ = jit_maml_grad_fn(model.loss_fn, remat=True)(model.prompt, model.frozen, episode, rng, INNER_LR)
  np.testing.assert_allclose(remat, plain, rtol=1e-5, atol=1e-7)


def test_inner_and_outer_passes_draw_different_dropout():
  """The stand-in's dropout follows its rng (so the rng checks above mean something); and a task's
  inner steps and outer pass get distinct rngs."""
  frozen, theta = standin_params(), random_prompt()
  batch = random_batch(np.random.default_rng(0), (4,))
  losses = {float(standin_loss(theta, frozen, batch, jax.random.key(i))) for i in range(3)}
  assert len(losses) == 3
  inner, outer = common.inner_and_outer_rngs(jax.random.key(0), 3)
  datas = [jax.random.key_data(k) for k in (*inner, outer)]
  assert len({tuple(np.asarray(d).tolist()) for d in datas}) == 4


# ---------------------------------------------------------------------------------------------------
# Reptile
# ---------------------------------------------------------------------------------------------------
def test_reptile_update_is_mean_of_theta_minus_phi_over_inner_lr(model):
  loss_fn, frozen, theta = model.loss_fn, model.frozen, model.prompt
  num_inner_steps, inner_lr = (2 if model.name == "standin" else 1), 0.3
  episode = model.episode(7, inner_steps=num_inner_steps, with_query=False)
  rng = jax.random.key(13)
  grad, metrics = grad_of(
    reptile.make_reptile_grad_fn(loss_fn, inner_lr=inner_lr), theta, frozen, episode, rng
  )

  @jax.jit
  def expected_update(theta):
    expected = 0.0
    for t in range(2):
      inner_rngs, _ = reference_task_rngs(rng, t, num_inner_steps)
      phi = reference_adapt(loss_fn, theta, frozen, take(episode["support"], t), inner_rngs, inner_lr)
      expected = expected + (theta - phi) / inner_lr / 2
    return expected

  expected = expected_update(theta)
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6 * np.abs(expected).max())
  assert np.isfinite(metrics["loss"])


def test_reptile_refuses_zero_inner_lr():
  with pytest.raises(ValueError, match="inner_lr > 0"):
    reptile.make_reptile_grad_fn(standin_loss, inner_lr=0.0)


# ---------------------------------------------------------------------------------------------------
# PT / MTL and the step machinery
# ---------------------------------------------------------------------------------------------------
def test_pt_step_is_an_optimizer_step_on_the_loss_gradient():
  frozen, theta = standin_params(), random_prompt()
  batch = random_batch(np.random.default_rng(0), (4,))
  rng = jax.random.key(4)
  optimizer = optim.make_optimizer("adafactor", 0.5)
  state, metrics = algorithms.jit_step(methods.make_step("mtl", standin_loss, optimizer))(
    common.init_state(theta, optimizer), frozen, batch, rng
  )

  @jax.jit
  def expected(theta):
    example_rng = jax.random.fold_in(rng, 0)  # device 0 of 1
    loss, grad = jax.value_and_grad(standin_loss)(theta, frozen, batch, example_rng)
    return loss, grad, optimizer.update(grad, optimizer.init(theta), theta)[0]

  loss, grad, updates = expected(theta)
  np.testing.assert_allclose(state.prompt, theta + updates, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
  np.testing.assert_allclose(metrics["grad_norm"], jnp.linalg.norm(grad), rtol=1e-5)
  assert int(state.step) == 1 and bool(metrics["update_ok"])
  np.testing.assert_allclose(metrics["learning_rate"], 0.5)


def counting(loss_fn, traces):
  def counted(*args):
    traces.append(1)  # a Python side effect: runs only while tracing
    return loss_fn(*args)

  return counted


def run_steps(model, method, step, state, seeds):
  for i in seeds:
    batch = (
      random_batch(np.random.default_rng(i), (4,), **model.batch_kw)
      if method in ("pt", "mtl")
      else model.episode(i, with_query=method != "reptile")
    )
    state, metrics = step(state, model.frozen, batch, jax.random.key(i))
    common.check_update(metrics, i + 1)
  return state, batch


@pytest.mark.parametrize("method", ["pt", "fomaml", "reptile"])  # maml: on the tiny T5 below
def test_steps_compile_once_and_change_only_the_prompt(method):
  model = make_standin_model()
  traces = []
  optimizer = optim.make_optimizer("adafactor", 0.5)
  step = algorithms.jit_step(
    methods.make_step(method, counting(deterministic_standin_loss, traces), optimizer, inner_lr=0.1)
  )
  frozen_before = jax.tree_util.tree_map(np.array, model.frozen)
  state, _ = run_steps(model, method, step, common.init_state(model.prompt, optimizer), range(2))
  traces_after_compile = len(traces)
  state, _ = run_steps(model, method, step, state, range(2, 4))
  assert traces_after_compile >= 1 and len(traces) == traces_after_compile  # no retrace
  assert step._cache_size() == 1
  assert int(state.step) == 4
  assert not np.allclose(state.prompt, model.prompt)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen_before, jax.device_get(model.frozen))


def test_tiny_t5_maml_step_compiles_once_keeps_frozen_params_and_guards_nans():
  model = make_t5_model()
  traces = []
  optimizer = optim.make_optimizer("adafactor", 0.5)
  step = algorithms.jit_step(
    methods.make_step("maml", counting(model.loss_fn, traces), optimizer, inner_lr=INNER_LR)
  )
  frozen_before = jax.tree_util.tree_map(np.array, model.frozen)
  state, _ = run_steps(model, "maml", step, common.init_state(model.prompt, optimizer), range(1))
  traces_after_compile = len(traces)
  state, batch = run_steps(model, "maml", step, state, range(1, 3))
  assert int(state.step) == 3 and not np.allclose(state.prompt, model.prompt)
  jax.tree_util.tree_map(np.testing.assert_array_equal, frozen_before, jax.device_get(model.frozen))
  # Non-finite frozen weights (same shapes: the same executable) -> the step is skipped.
  poisoned = jax.tree_util.tree_map(lambda x: x.at[(0,) * x.ndim].set(jnp.inf), model.frozen)
  before = jax.device_get(state)
  state, metrics = step(state, poisoned, batch, jax.random.key(9))
  assert not bool(metrics["update_ok"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, before, jax.device_get(state))
  with pytest.raises(FloatingPointError, match="step 4: the loss is"):
    common.check_update(metrics, 4)
  assert step._cache_size() == 1 and len(traces) == traces_after_compile


def test_nan_guard_on_an_infinite_gradient():
  theta = random_prompt()
  optimizer = optim.make_optimizer("sgd", 0.1)
  state = common.init_state(theta, optimizer)
  grad = jnp.zeros_like(theta).at[1, 2].set(jnp.inf)
  new_state, metrics = jax.jit(
    lambda s, g: common.apply_gradient(s, g, {"loss": jnp.float32(1.0)}, optimizer)
  )(state, grad)
  assert not bool(metrics["update_ok"]) and not np.isfinite(metrics["grad_norm"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(state), jax.device_get(new_state))


def test_guard_rejects_a_finite_update_of_a_diverging_learning_rate():
  # What the issue saw: Adafactor at lr 1e30 moves the prompt to ~1e30 in one *finite* step; the layer
  # norms then keep the loss finite and the gradient ~0, and only later does the state overflow. The
  # guard rejects that first step already, so the state kept is a good one.
  theta = random_prompt()
  frozen, batch = standin_params(), random_batch(np.random.default_rng(0), (4,))
  for lr, applied in ((0.5, True), (1e30, False)):
    step = jax.jit(methods.make_step("pt", standin_loss, optim.make_optimizer("adafactor", lr)))
    state = common.init_state(theta, optim.make_optimizer("adafactor", lr))
    new_state, metrics = step(state, frozen, batch, jax.random.key(0))
    assert bool(metrics["update_ok"]) is applied
    assert np.isfinite(float(metrics["loss"])) and np.isfinite(float(metrics["update_rms"]))
  np.testing.assert_array_equal(new_state.prompt, theta)
  with pytest.raises(
    common.Diverged,
    match=r"step 1: the update's RMS, 1e\+30, is over 1000 times the "
    r"prompt's, 0.628: the learning rate is far too large",
  ):
    common.check_update(metrics, 1)


# ---------------------------------------------------------------------------------------------------
# Downstream grid: R runs with their own learning rates in one computation
# ---------------------------------------------------------------------------------------------------
def test_grid_step_equals_runs_one_by_one(model):
  check_grid_against_runs_one_by_one(model, runs_at_once=None)


@pytest.mark.parametrize("runs_at_once", [1, 3])  # one run at a time (CPU's default); groups of 3 + 1
def test_grid_step_in_groups_of_runs_equals_runs_one_by_one(model, runs_at_once):
  check_grid_against_runs_one_by_one(model, runs_at_once)


def check_grid_against_runs_one_by_one(model, runs_at_once):
  learning_rates = [0.5, 0.4, 0.3, 0.2]
  num_runs, num_steps = len(learning_rates), 3
  prompts = jnp.stack(
    [model.prompt + 0.1 * random_prompt(seed, model.prompt.shape) for seed in range(num_runs)]
  )
  batches = [
    random_batch(np.random.default_rng(s), (num_runs, 4), **model.batch_kw) for s in range(num_steps)
  ]
  rngs = [jax.random.split(jax.random.key(s), num_runs) for s in range(num_steps)]
  step = methods.make_step("pt", model.loss_fn, optim.make_optimizer("adafactor", 0.5))
  grid_step = jax.jit(algorithms.make_grid_step(step, runs_at_once))
  states = algorithms.init_grid_state(prompts, optim.make_optimizer("adafactor", 0.5), learning_rates)
  for s in range(num_steps):
    states, metrics = grid_step(states, model.frozen, batches[s], rngs[s])
  assert metrics["loss"].shape == (num_runs,)
  np.testing.assert_allclose(metrics["learning_rate"], learning_rates)
  # One by one: one jitted single-run step; each run's state comes from its own optimizer (lr inside).
  single_step = jax.jit(step)
  for r, lr in enumerate(learning_rates):
    state = common.init_state(prompts[r], optim.make_optimizer("adafactor", lr))
    for s in range(num_steps):
      state, single_metrics = single_step(state, model.frozen, take(batches[s], r), rngs[s][r])
    # What the runs compute is the same, in another order (vmap batches the matmuls and reductions): the
    # prompt's movement, lr times a sum of Adafactor updates made from float32 gradients, agrees to the
    # relative accuracy of a float32 gradient of this model (1e-4 of its largest entry, as the
    # meta-gradient tests above hold it), not to the bits of one CPU's reduction order.
    moved = state.prompt - prompts[r]
    np.testing.assert_allclose(states.prompt[r] - prompts[r], moved, rtol=0, atol=1e-4 * np.abs(moved).max())
    np.testing.assert_allclose(metrics["loss"][r], single_metrics["loss"], rtol=1e-5)
  # (The one-by-one runs use 4 different learning rates, so a grid that ignored its per-run learning
  # rates would fail the comparison above.)


def test_grid_guard_is_per_run():
  frozen = standin_params()
  states = algorithms.init_grid_state(random_prompt(), optim.make_optimizer("sgd", 0.1), [0.1, np.inf])
  step = algorithms.make_grid_step(methods.make_step("pt", standin_loss, optim.make_optimizer("sgd", 0.1)))
  new, metrics = jax.jit(step)(
    states, frozen, random_batch(np.random.default_rng(0), (2, 4)), jax.random.split(jax.random.key(0), 2)
  )
  assert metrics["update_ok"].tolist() == [True, False]
  assert not np.allclose(new.prompt[0], states.prompt[0])
  np.testing.assert_array_equal(new.prompt[1], states.prompt[1])
  with pytest.raises(FloatingPointError, match=r"step 3 in runs \[1\] .*: the update overflowed"):
    common.check_update(metrics, 3)


# ---------------------------------------------------------------------------------------------------
# Clear errors on bad input
# ---------------------------------------------------------------------------------------------------
def test_bad_inputs_fail_early_and_clearly():
  optimizer = optim.make_optimizer("sgd", 0.1)
  with pytest.raises(ValueError, match="unknown method"):
    methods.make_step("promptsgd", standin_loss, optimizer)
  with pytest.raises(ValueError, match="needs inner_lr"):
    methods.make_step("maml", standin_loss, optimizer)
  step = jax.jit(methods.make_step("fomaml", standin_loss, optimizer, inner_lr=0.1))
  state = common.init_state(random_prompt(), optimizer)
  with pytest.raises(ValueError, match="keys"):
    step(state, standin_params(), random_episode(0, with_query=False), jax.random.key(0))
  flat = {
    "support": random_batch(np.random.default_rng(0), (2, 3)),
    "query": random_batch(np.random.default_rng(1), (2, 3)),
  }
  with pytest.raises(ValueError, match=r"\[T, K, b, L\]"):
    step(state, standin_params(), flat, jax.random.key(0))
  with pytest.raises(ValueError, match="num_prompt_tokens, d_model"):
    common.init_state(jnp.zeros((4,)), optimizer)
