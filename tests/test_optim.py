"""The outer optimizers against PyTorch: our Adafactor vs transformers' Adafactor with the study's settings,
AdamW vs torch.optim.AdamW; the learning rate as a state leaf; and Adafactor's scale invariance (why the
mean over tasks gives the reference's summed-gradient updates)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mpt_jax import optim

torch = pytest.importorskip("torch")


def gradients(shape, num_steps, seed=0):
  """Gradients whose scale jumps by orders of magnitude between steps, so that the second-moment EMA
  lags and the update clipping (RMS > 1) really triggers on some steps."""
  rng = np.random.default_rng(seed)
  return [(rng.normal(size=shape) * 10.0 ** rng.uniform(-3, 3)).astype(np.float32) for _ in range(num_steps)]


def run_optax(optimizer, param, grads):
  state = optimizer.init(jnp.asarray(param))
  param = jnp.asarray(param)
  update = jax.jit(optimizer.update)
  trajectory = []
  for grad in grads:
    updates, state = update(jnp.asarray(grad), state, param)
    param = optax.apply_updates(param, updates)
    trajectory.append(np.asarray(param))
  return trajectory, state


def run_torch(make_optimizer, param, grads):
  weight = torch.nn.Parameter(torch.tensor(param))
  optimizer = make_optimizer([weight])
  trajectory = []
  for grad in grads:
    weight.grad = torch.tensor(grad)
    optimizer.step()
    trajectory.append(weight.detach().numpy().copy())
  return trajectory


def hf_adafactor(weight_decay):
  from transformers.optimization import Adafactor

  # The study's call (reference/PROTOCOL.md); the rest are HF's defaults, spelled out.
  return lambda params: Adafactor(
    params,
    lr=0.5,
    scale_parameter=False,
    relative_step=False,
    warmup_init=False,
    weight_decay=weight_decay,
    beta1=None,
    decay_rate=-0.8,
    clip_threshold=1.0,
    eps=(1e-30, 1e-3),
  )


# [100, d] prompts with d below and above 100 (optax and HF order the factored dims differently), a
# small matrix, a vector (unfactored in both) and a single-row matrix.
SHAPES = [(100, 16), (100, 160), (3, 5), (7,), (1, 9)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("weight_decay", [1e-5, 0.1])  # the study's, and one large enough to see
def test_adafactor_matches_transformers(shape, weight_decay):
  param = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  grads = gradients(shape, num_steps=8)
  ours, _ = run_optax(optim.make_optimizer("adafactor", 0.5, weight_decay=weight_decay), param, grads)
  reference = run_torch(hf_adafactor(weight_decay), param, grads)
  for step, (a, b) in enumerate(zip(ours, reference)):
    np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6, err_msg=f"step {step + 1}")
  assert np.abs(ours[-1] - param).max() > 0.5  # it moved (lr 0.5): the comparison is not vacuous


def test_adafactor_factors_the_prompt_like_hf():
  """A [100, d] prompt gets row and column statistics (HF: any >= 2-D param), not a full [100, d]
  second moment as optax's default min_dim_size_to_factor=128 would give; and stock optax.adafactor
  (even with the study's numbers) takes a different path than HF."""
  shape = (100, 16)
  _, state = run_optax(
    optim.make_optimizer("adafactor", 0.5), np.ones(shape, np.float32), gradients(shape, 1)
  )
  factored = state.inner_state[0]
  assert factored.v_row.shape == (16,) and factored.v_col.shape == (100,) and factored.v.shape == (1,)
  param = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  grads = gradients(shape, num_steps=8)
  stock = optax.adafactor(
    0.5,
    multiply_by_parameter_scale=False,
    clipping_threshold=1.0,
    weight_decay_rate=1e-5,
    decay_rate=0.8,
    eps=1e-30,
  )
  stock_trajectory, _ = run_optax(stock, param, grads)
  reference = run_torch(hf_adafactor(1e-5), param, grads)
  assert np.abs(stock_trajectory[-1] - reference[-1]).max() > 1e-3


def test_adafactor_update_is_invariant_to_gradient_scale():
  """Sum vs mean over T tasks = gradients scaled by T: the same Adafactor updates (up to eps1 = 1e-30),
  so averaging over tasks reproduces the reference's summed meta-gradients under Adafactor."""
  shape = (100, 16)
  param = np.random.default_rng(2).normal(size=shape).astype(np.float32)
  grads = gradients(shape, num_steps=6, seed=3)
  optimizer = optim.make_optimizer("adafactor", 0.5)
  mean, _ = run_optax(optimizer, param, grads)
  summed, _ = run_optax(optimizer, param, [2.0 * g for g in grads])  # T = 2 tasks
  for a, b in zip(mean, summed):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  # ... which is special to Adafactor: under SGD the summed gradient gives a different trajectory.
  sgd = optim.make_optimizer("sgd", 0.5)
  sgd_mean, _ = run_optax(sgd, param, grads)
  sgd_summed, _ = run_optax(sgd, param, [2.0 * g for g in grads])
  assert not np.allclose(sgd_mean[-1], sgd_summed[-1])


def test_adamw_matches_torch():
  shape = (10, 6)
  param = np.random.default_rng(4).normal(size=shape).astype(np.float32)
  grads = gradients(shape, num_steps=6, seed=5)
  ours, _ = run_optax(optim.make_optimizer("adamw", 1e-2, weight_decay=0.1), param, grads)
  reference = run_torch(lambda p: torch.optim.AdamW(p, lr=1e-2, weight_decay=0.1), param, grads)
  for a, b in zip(ours, reference):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_learning_rate_is_a_state_leaf():
  shape = (100, 16)
  param = np.random.default_rng(6).normal(size=shape).astype(np.float32)
  grads = gradients(shape, num_steps=3, seed=7)
  direct, _ = run_optax(optim.make_optimizer("adafactor", 0.2), param, grads)
  # An optimizer built with lr 0.5 whose state says 0.2 behaves like the lr-0.2 one.
  optimizer = optim.make_optimizer("adafactor", 0.5)
  state = optim.set_learning_rate(optimizer.init(jnp.asarray(param)), 0.2)
  assert optim.get_learning_rate(state).dtype == jnp.float32
  p = jnp.asarray(param)
  for grad, expected in zip(grads, direct):
    updates, state = optimizer.update(jnp.asarray(grad), state, p)
    p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(p, expected, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(optim.get_learning_rate(state), 0.2)


def test_bad_optimizer_requests_fail_clearly():
  with pytest.raises(ValueError, match="unknown optimizer 'adam'"):
    optim.make_optimizer("adam", 0.1)
  with pytest.raises(ValueError, match="unknown options"):
    optim.make_optimizer("adafactor", 0.1, momentum=0.9)
  with pytest.raises(ValueError, match="<= 2-D"):
    optim.make_optimizer("adafactor", 0.1).init(jnp.zeros((2, 3, 4)))
  with pytest.raises(TypeError, match="make_optimizer"):
    optim.set_learning_rate(optax.sgd(0.1).init(jnp.zeros(3)), 0.2)
