"""The PyTorch baseline of benchmarks/ computes the same meta-gradients and updates as our steps.

benchmarks/torch_reference.py rebuilds the study's algorithm (transformers' PyTorch T5 + `higher`, tasks
one after another, HF Adafactor); the benchmark times our steps against it, which only means something
if both compute the same thing. Here, on a tiny T5 with dropout off: the baseline's second-order MAML,
first-order MAML, Reptile and PT gradients (summed over tasks there, averaged here) and its Adafactor
update equal ours. The inner learning rate is large (1.0) so that second- and first-order MAML differ by
far more than the tolerance: a first-order baseline (or a first-order step of ours) fails the MAML test.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("higher")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from helpers_t5 import random_batch, tiny_t5  # noqa: E402
from mpt_jax import algorithms, optim  # noqa: E402
from mpt_jax.algorithms import common  # noqa: E402

from benchmarks import torch_reference as reference  # noqa: E402

INNER_LR = 1.0
TOLERANCE = 1e-4  # relative L2 error; float32 on both sides gives ~1e-5
NUM_PROMPT = 4
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def stacked_batches(seed: int, lead: tuple[int, ...], size: int) -> dict[str, np.ndarray]:
  """Independent right-padded batches of `size` examples stacked to [*lead, size, L]."""
  rng = np.random.default_rng(seed)
  count = int(np.prod(lead)) if lead else 1
  parts = [random_batch(int(rng.integers(2**31)), batch=size) for _ in range(count)]
  return {key: np.stack([p[key] for p in parts]).reshape(*lead, size, -1) for key in parts[0]}


@pytest.fixture(scope="module")
def setup():
  """(model, frozen params, torch model holding the same weights, initial prompt); dropout off."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)  # tiny tensors: threads only add overhead on a shared 2-core machine
  # One layer each: the meta-gradient code paths are the same at any depth, and compiling grad-of-grad
  # of a deeper model only costs test time (T5 parity itself is tested against transformers elsewhere).
  model, params = tiny_t5("1.1", dropout_rate=0.0, num_layers=1, num_decoder_layers=1)
  torch_model = reference.build_torch_t5(model.config, params)
  torch_model.eval()
  prompt = np.asarray(jax.random.normal(jax.random.key(3), (NUM_PROMPT, model.config.d_model)))
  yield model, params, torch_model, prompt
  torch.set_num_threads(threads)


def relative_error(ours, theirs) -> float:
  ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
  return float(np.linalg.norm(theirs - ours) / np.linalg.norm(ours))


def ours_and_baseline(setup, method: str, batch, num_tasks: int):
  """(our gradient, our updated prompt, the ReferenceRun after its step) for one step of `method`."""
  model, params, torch_model, prompt = setup
  loss_fn = algorithms.make_loss_fn(model, deterministic=True)
  optimizer = optim.make_optimizer("adafactor", 0.5)
  if method == "reptile":
    grad_fn = algorithms.make_reptile_grad_fn(loss_fn, inner_lr=INNER_LR)
  elif method == "pt":
    grad_fn = algorithms.make_pt_grad_fn(loss_fn)
  else:
    grad_fn = algorithms.make_maml_grad_fn(loss_fn, inner_lr=INNER_LR, first_order=(method == "fomaml"))
  args = (jnp.asarray(prompt), params, batch, jax.random.key(0), 0)
  # Without XLA's backend optimizations the grad-of-grad compiles ~2x faster; same numbers to ~1e-7.
  compiled = jax.jit(grad_fn).lower(*args).compile(FAST_COMPILE)
  grad, metrics = compiled(*args)
  state, _ = common.apply_gradient(
    algorithms.init_state(jnp.asarray(prompt), optimizer), grad, metrics, optimizer
  )
  run = reference.ReferenceRun(torch_model, prompt, inner_lr=INNER_LR)
  torch_loss = run.step(method, reference.to_torch(batch))
  np.testing.assert_allclose(torch_loss, float(metrics["loss"]), rtol=1e-5)
  assert relative_error(grad, run.grad / num_tasks) < TOLERANCE
  assert relative_error(np.asarray(state.prompt) - prompt, run.prompt - prompt) < TOLERANCE
  return np.asarray(grad), run


def maml_episode():
  return {"support": stacked_batches(0, (2, 1), 2), "query": stacked_batches(1, (2,), 2)}


def test_maml_meta_gradient_and_update_equal_ours(setup):
  _, _, torch_model, prompt = setup
  episode = maml_episode()
  grad, _ = ours_and_baseline(setup, "maml", episode, num_tasks=2)
  # The test can see the second-order term: the first-order gradient is far from the MAML one.
  first_order = reference.ReferenceRun(torch_model, prompt, inner_lr=INNER_LR)
  first_order.meta_gradient("fomaml", reference.to_torch(episode))
  assert relative_error(grad, first_order.grad / 2) > 100 * TOLERANCE


def test_first_order_maml_equals_ours(setup):
  ours_and_baseline(setup, "fomaml", maml_episode(), num_tasks=2)


def test_reptile_meta_gradient_equals_ours(setup):
  # 3 inner steps (the study's 10 take the same code path); tasks are summed there, averaged here.
  episode = {"support": stacked_batches(2, (2, 3), 2)}
  ours_and_baseline(setup, "reptile", episode, num_tasks=2)


def test_pt_step_equals_ours(setup):
  ours_and_baseline(setup, "pt", stacked_batches(3, (), 4), num_tasks=1)


def test_build_torch_t5_refuses_mismatched_weights(setup, monkeypatch):
  """A checkpoint round trip that changes a tensor is caught (the baseline would time another model)."""
  model, params, _, _ = setup
  from mpt_jax.model import hf

  real_save = hf.save_checkpoint

  def save_corrupted(directory, config, tree, tokenizer=None):
    tree = {**tree, "lm_head": {"kernel": tree["lm_head"]["kernel"] + 1.0}}
    return real_save(directory, config, tree, tokenizer)

  monkeypatch.setattr(hf, "save_checkpoint", save_corrupted)
  with pytest.raises(RuntimeError, match="lm_head.weight"):
    reference.build_torch_t5(model.config, params)


def test_the_baseline_builds_every_tensor_on_the_models_device(setup):
  """On a GPU every tensor of the reference step must live on the GPU; PyTorch's "meta" device (shapes
  without data) stands in for it here, with a stand-in for transformers' T5 (whose forward reads values,
  which meta tensors have not) that checks what the reference hands it: a tensor made on the CPU by
  mistake (the prompt's attention-mask ones once were) shows up as a CPU tensor."""
  model, _, _, prompt = setup
  seen = {}

  class StandIn(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.embed = torch.nn.Embedding(model.config.vocab_size, model.config.d_model, device="meta")

    def get_input_embeddings(self):
      return self.embed

    def forward(self, inputs_embeds, attention_mask, labels, use_cache):
      seen.update(
        inputs_embeds=inputs_embeds.device, attention_mask=attention_mask.device, labels=labels.device
      )
      return type("Output", (), {"loss": (inputs_embeds.sum() + attention_mask.sum())})()

  stand_in = StandIn()
  batch = reference.to_torch(random_batch(3, batch=2), device="meta")
  assert {value.device.type for value in batch.values()} == {"meta"}
  run = reference.ReferenceRun(stand_in, prompt)
  assert run.soft_prompt.prompt.device.type == "meta" and run.soft_prompt.prompt.is_leaf
  loss = reference.prompt_loss(stand_in, run.soft_prompt(), batch)
  assert {device.type for device in seen.values()} == {"meta"} and loss.device.type == "meta"
  loss.backward()
  assert run.soft_prompt.prompt.grad.device.type == "meta"
