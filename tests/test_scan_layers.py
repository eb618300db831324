"""The scanned T5 (config.scan_layers: blocks 1..N-1 as one lax.scan over stacked params) against the
per-layer one: the same checkpoints, logits, meta-gradients and generated tokens."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers_t5 import random_batch, tiny_t5
from mpt_jax import algorithms, decode
from mpt_jax.model import hf
from mpt_jax.model.loss import shift_right
from mpt_jax.model.t5 import STACKED_BLOCKS, T5, init_params, stack_blocks, unstack_blocks

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates


def _scanned(model: T5, **changes) -> T5:
  return T5(model.config.replace(scan_layers=True, **changes))


def _prompt(model: T5, rows: int = 3, seed: int = 0):
  return 0.5 * jnp.asarray(np.random.default_rng(seed).normal(size=(rows, model.config.d_model)), jnp.float32)


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_stacked_params_are_the_scanned_models_tree_and_round_trip(version):
  model, params = tiny_t5(version, num_layers=3, num_decoder_layers=4)
  stacked = stack_blocks(params)
  ids = jnp.zeros((1, 4), jnp.int32)
  expected = jax.eval_shape(_scanned(model).init, jax.random.PRNGKey(0), ids, ids, ids)["params"]
  assert jax.tree_util.tree_structure(stacked) == jax.tree_util.tree_structure(expected)
  assert jax.tree_util.tree_map(jnp.shape, stacked) == jax.tree_util.tree_map(lambda x: x.shape, expected)
  assert sorted(stacked["encoder"]) == ["block_0", STACKED_BLOCKS, "final_layer_norm"]
  assert stacked["decoder"][STACKED_BLOCKS]["layer_2"]["DenseReluDense"]["wo"]["kernel"].shape[0] == 3
  back = unstack_blocks(stacked)
  jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
  # A stack of one block has nothing to stack; and random init works in the scanned layout.
  one_layer, one_params = tiny_t5(version, num_layers=1, num_decoder_layers=1)
  assert stack_blocks(one_params)["encoder"].keys() == one_params["encoder"].keys()
  assert STACKED_BLOCKS in init_params(_scanned(model), 0)["decoder"]


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_scanned_logits_equal_the_per_layer_models(version):
  model, params = tiny_t5(version, seed=4, num_layers=3, num_decoder_layers=4, dropout_rate=0.0)
  batch = random_batch(1, batch=3, input_length=9, target_length=5)
  args = (batch["input_ids"], batch["input_mask"], shift_right(batch["target_ids"], 0))
  apply = lambda m, p, placement: jax.jit(m.apply, static_argnames="placement")(
    {"params": p}, *args, prompt=_prompt(model), placement=placement
  )
  for placement in ("prepend", "suffix"):
    logits = apply(model, params, placement)
    np.testing.assert_allclose(
      apply(_scanned(model), stack_blocks(params), placement), logits, atol=1e-5, rtol=0
    )
    remat = _scanned(model, remat=True, remat_policy="dots")
    np.testing.assert_allclose(apply(remat, stack_blocks(params), placement), logits, atol=1e-5, rtol=0)


def test_scanned_meta_gradient_equals_the_per_layer_models():
  model, params = tiny_t5("1.1", seed=5, num_layers=2, num_decoder_layers=2, dropout_rate=0.0)
  support = random_batch(2, batch=4, input_length=8, target_length=4)
  query = random_batch(3, batch=4, input_length=8, target_length=4)
  episode = {
    "support": {k: v.reshape(2, 1, 2, -1) for k, v in support.items()},
    "query": {k: v.reshape(2, 2, -1) for k, v in query.items()},
  }

  def meta_gradient(model, params):
    loss_fn = algorithms.make_loss_fn(model, deterministic=True)
    grad_fn = jax.jit(algorithms.make_maml_grad_fn(loss_fn, inner_lr=10.0))
    return grad_fn(_prompt(model, 4, seed=1), params, episode, jax.random.key(0), 0)

  grad, metrics = meta_gradient(model, params)
  for scanned in (_scanned(model), _scanned(model, remat=True)):
    scanned_grad, scanned_metrics = meta_gradient(scanned, stack_blocks(params))
    np.testing.assert_allclose(scanned_metrics["loss"], metrics["loss"], rtol=1e-6)
    np.testing.assert_allclose(scanned_grad, grad, rtol=1e-5, atol=1e-5 * float(jnp.abs(grad).max()))
  # The inner step matters at this inner lr: a first-order meta-gradient is far from it.
  first_order = jax.jit(
    algorithms.make_maml_grad_fn(
      algorithms.make_loss_fn(model, deterministic=True), inner_lr=10.0, first_order=True
    )
  )(_prompt(model, 4, seed=1), params, episode, jax.random.key(0), 0)[0]
  assert float(jnp.abs(first_order - grad).max()) > 100 * float(jnp.abs(scanned_grad - grad).max())


def test_scanned_layers_draw_dropout_per_layer_and_remat_redraws_the_same():
  model, params = tiny_t5("1.1", seed=6, num_layers=3, num_decoder_layers=3)
  scanned, remat = _scanned(model), _scanned(model, remat=True)
  stacked = stack_blocks(params)
  batch = random_batch(4)

  def loss_and_grad(model, prompt, rng, deterministic=False):
    fn = algorithms.make_loss_fn(model, deterministic=deterministic)
    return jax.jit(jax.value_and_grad(fn))(prompt, stacked, batch, rng)

  prompt = _prompt(model)
  with jax.threefry_partitionable(False):
    loss, grad = loss_and_grad(scanned, prompt, jax.random.key(1))
    again, _ = loss_and_grad(scanned, prompt, jax.random.key(1))
    other, _ = loss_and_grad(scanned, prompt, jax.random.key(2))
    remat_loss, remat_grad = loss_and_grad(remat, prompt, jax.random.key(1))
    plain, _ = loss_and_grad(scanned, prompt, None, deterministic=True)
  assert loss == again and loss != other and abs(float(loss - plain)) > 1e-4
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(remat_grad, grad, rtol=1e-5, atol=1e-7)


def test_scanned_generation_equals_the_per_layer_models():
  model, params = tiny_t5("1.1", seed=7, num_layers=2, num_decoder_layers=3, dropout_rate=0.0)
  batch = random_batch(5, batch=3, input_length=9)
  prompt = _prompt(model)
  for generate in (decode.greedy_decode, lambda *a, **k: decode.beam_search(*a, num_beams=3, **k)):
    tokens = generate(model, params, batch["input_ids"], batch["input_mask"], prompt, max_length=6)
    scanned = generate(
      _scanned(model), stack_blocks(params), batch["input_ids"], batch["input_mask"], prompt, max_length=6
    )
    np.testing.assert_array_equal(scanned, tokens)


def test_scanned_model_loads_and_saves_hf_checkpoints(hf_t5_v11_dir, tmp_path):
  model, params, _ = hf.load_pretrained(hf_t5_v11_dir)
  scanned_model, scanned_params, _ = hf.load_pretrained(hf_t5_v11_dir, scan_layers=True)
  assert scanned_model.config == model.config.replace(scan_layers=True)
  jax.tree_util.tree_map(np.testing.assert_array_equal, scanned_params, stack_blocks(params))
  saved = hf.save_checkpoint(
    tmp_path / "saved", scanned_model.config, scanned_params, hf_t5_v11_dir / "spiece.model"
  )
  reread = hf.read_weights(saved)
  original = hf.params_to_hf(params)
  assert sorted(reread) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(reread[name], value)
  _, reloaded, _ = hf.load_pretrained(saved)  # the saved checkpoint is an ordinary per-layer one
  jax.tree_util.tree_map(np.testing.assert_array_equal, reloaded, params)
