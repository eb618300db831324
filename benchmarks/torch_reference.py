"""The reference algorithm in PyTorch: the baseline that benchmarks/bench_steps.py times ours against.

What the original study's code did (reference/PROTOCOL.md), rebuilt on this machine's stack:
- transformers' PyTorch `T5ForConditionalGeneration`, frozen (`requires_grad=False` everywhere), with
  `attn_implementation="eager"` (the SDPA kernel has no double backward on CPU, so second-order MAML
  fails with it; the 2022 transformers T5 the study ran computed attention this way too).
- The soft prompt [P, d_model] is the only trainable tensor, held by a small `nn.Module` (`SoftPrompt`)
  so `higher` can patch it; it is prepended to the token embeddings (`inputs_embeds`) and the attention
  mask is extended by P ones (our default placement, so both sides compute the same function).
- MAML: per task, `higher.innerloop_ctx(soft_prompt, SGD(lr=inner_lr), copy_initial_weights=False,
  track_higher_grads=True)`: one differentiable SGD step on the support loss, then the query loss at
  the adapted prompt, `backward()` into the prompt's `.grad`: the second-order meta-gradient, SUMMED
  over the tasks, which run one after another.
- First-order MAML: the same with `track_higher_grads=False` (higher detaches the adapted prompt), so the
  query gradient at the adapted prompt is added to the prompt's `.grad` by hand.
- Reptile: 10 inner SGD steps per task (track_higher_grads=False), `.grad += (theta - phi) / inner_lr`.
- PT: a plain gradient step on a batch.
- Outer optimizer: HF `transformers.optimization.Adafactor(lr=0.5, scale_parameter=False,
  relative_step=False, warmup_init=False, weight_decay=1e-5)`, the study's.

Batches are the numpy dicts of docs/CONTRACTS.md (support [T, K, b, L], query [T, q, L], PT [B, L]);
`to_torch` converts them once, outside any timed region.
Devices: everything follows the model's device (`build_torch_t5(..., device="cuda")`, `to_torch(batch,
device)`); the soft prompt is created there and every tensor built on the way (the prompt's attention-mask
ones) is made beside the batch. Our steps average over tasks where this sums
(mpt_jax/algorithms/maml.py explains why Adafactor gives the same update): compare `grad / T` with ours.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

# Batches in torch: dict of int64 tensors with the docs/CONTRACTS.md keys and leading dims.
TorchBatch = Mapping[str, Any]
IGNORE_INDEX = -100  # transformers' CrossEntropyLoss ignore_index: marks the target padding


def build_torch_t5(config, params, *, dropout_rate: float | None = None, device=None):
  """transformers' PyTorch T5 holding exactly our `params` (an `mpt_jax.model.t5.T5Config` and tree).

  Goes through a checkpoint directory: our `save_checkpoint` writes config.json + model.safetensors,
  transformers' `from_pretrained` reads them (untied `lm_head` kept). Then every tensor of the torch
  model is compared with our params (`params_to_hf`), so a mapping mistake fails here, loudly.
  dropout_rate: overrides config.dropout_rate in the torch model (both sides must agree for timing).
  device: where the model goes after the check (default: the CPU).
  """
  from transformers import T5ForConditionalGeneration

  from mpt_jax.model import hf

  if dropout_rate is not None:
    config = config.replace(dropout_rate=dropout_rate)
  with tempfile.TemporaryDirectory(prefix="torch_t5_") as directory:
    hf.save_checkpoint(directory, config, params)
    model = T5ForConditionalGeneration.from_pretrained(directory, attn_implementation="eager")
  model.requires_grad_(False)
  expected = hf.params_to_hf(params)
  state = model.state_dict()
  for name, value in expected.items():
    if name not in state:
      raise RuntimeError(f"torch T5 has no tensor {name}: the checkpoint mapping and transformers disagree")
    if tuple(state[name].shape) != value.shape or not np.array_equal(state[name].numpy(), value):
      raise RuntimeError(f"torch T5 tensor {name} differs from our params after the round trip")
  tied = model.lm_head.weight.data_ptr() == model.shared.weight.data_ptr()
  if not config.tie_word_embeddings and tied:
    raise RuntimeError("transformers tied lm_head to shared although our T5 has an untied head")
  return model if device is None else model.to(device)


def to_torch(batch, device=None):
  """A numpy batch or episode (nested dicts, any leading dims) -> int64 tensors on `device` (embedding
  lookups want long ids)."""
  if isinstance(batch, Mapping):
    return {key: to_torch(value, device) for key, value in batch.items()}
  return torch.as_tensor(np.asarray(batch), dtype=torch.long, device=device)


class SoftPrompt(nn.Module):
  """The only trainable tensor: `higher` patches this module's parameter with its fast weights."""

  def __init__(self, prompt, device=None):
    super().__init__()
    # A copy, never a view, made on the model's device (a leaf there, so .grad lands on it).
    self.prompt = nn.Parameter(torch.tensor(np.array(prompt, np.float32), device=device))

  def forward(self):
    return self.prompt


def prompt_loss(model, prompt: torch.Tensor, batch: TorchBatch) -> torch.Tensor:
  """Token cross-entropy of the frozen T5 with `prompt` prepended, mean over non-pad target tokens."""
  input_ids = batch["input_ids"]
  num_examples = input_ids.shape[0]
  embeddings = model.get_input_embeddings()(input_ids)
  inputs_embeds = torch.cat(
    [prompt.unsqueeze(0).expand(num_examples, -1, -1).to(embeddings.dtype), embeddings], dim=1
  )
  attention_mask = torch.cat(
    [
      torch.ones(num_examples, prompt.shape[0], dtype=torch.long, device=input_ids.device),
      batch["input_mask"],
    ],
    dim=1,
  )
  labels = batch["target_ids"].masked_fill(batch["target_mask"] == 0, IGNORE_INDEX)
  return model(
    inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, use_cache=False
  ).loss


def _slice(batch: TorchBatch, *index) -> dict[str, torch.Tensor]:
  return {key: value[index] for key, value in batch.items()}


def _num_tasks_and_steps(episode) -> tuple[int, int]:
  shape = episode["support"]["input_ids"].shape
  if len(shape) != 4:
    raise ValueError(f"support must be [T, K, b, L], got input_ids shape {tuple(shape)}")
  return shape[0], shape[1]


def _accumulate(soft_prompt: SoftPrompt, grad: torch.Tensor) -> None:
  if soft_prompt.prompt.grad is None:
    soft_prompt.prompt.grad = grad.detach().clone()
  else:
    soft_prompt.prompt.grad += grad.detach()


def maml_meta_gradient(
  model, soft_prompt: SoftPrompt, episode, *, inner_lr: float, first_order: bool = False
) -> float:
  """Sets soft_prompt.prompt.grad to the (first-order) MAML meta-gradient summed over tasks.

  Tasks one after another, each in its own `higher` inner loop. Returns the mean query loss.
  """
  import higher

  soft_prompt.zero_grad(set_to_none=True)
  num_tasks, num_inner_steps = _num_tasks_and_steps(episode)
  inner_opt = torch.optim.SGD(soft_prompt.parameters(), lr=inner_lr)
  total = 0.0
  for task in range(num_tasks):
    with higher.innerloop_ctx(
      soft_prompt, inner_opt, copy_initial_weights=False, track_higher_grads=not first_order
    ) as (fprompt, diffopt):
      for k in range(num_inner_steps):
        diffopt.step(prompt_loss(model, fprompt(), _slice(episode["support"], task, k)))
      query_loss = prompt_loss(model, fprompt(), _slice(episode["query"], task))
      if first_order:
        # higher detached the adapted prompt: its gradient is the first-order meta-gradient.
        (grad,) = torch.autograd.grad(query_loss, [fprompt()])
        _accumulate(soft_prompt, grad)
      else:
        query_loss.backward()  # through the inner step into the initial prompt (sums over tasks)
    total += float(query_loss.detach())
  return total / num_tasks


def reptile_meta_gradient(model, soft_prompt: SoftPrompt, episode, *, inner_lr: float) -> float:
  """Sets soft_prompt.prompt.grad to sum over tasks of (theta - phi) / inner_lr; returns the mean
  support loss over tasks and inner steps."""
  import higher

  soft_prompt.zero_grad(set_to_none=True)
  num_tasks, num_inner_steps = _num_tasks_and_steps(episode)
  inner_opt = torch.optim.SGD(soft_prompt.parameters(), lr=inner_lr)
  theta = soft_prompt.prompt.detach().clone()
  total = 0.0
  for task in range(num_tasks):
    with higher.innerloop_ctx(
      soft_prompt, inner_opt, copy_initial_weights=False, track_higher_grads=False
    ) as (fprompt, diffopt):
      for k in range(num_inner_steps):
        loss = prompt_loss(model, fprompt(), _slice(episode["support"], task, k))
        diffopt.step(loss)
        total += float(loss.detach())
      _accumulate(soft_prompt, (theta - fprompt().detach()) / inner_lr)
  return total / (num_tasks * num_inner_steps)


def pt_gradient(model, soft_prompt: SoftPrompt, batch: TorchBatch) -> float:
  """Sets soft_prompt.prompt.grad to the prompt-tuning gradient of `batch`; returns the loss."""
  soft_prompt.zero_grad(set_to_none=True)
  loss = prompt_loss(model, soft_prompt(), batch)
  loss.backward()
  return float(loss.detach())


def make_outer_optimizer(soft_prompt: SoftPrompt, learning_rate: float = 0.5, weight_decay: float = 1e-5):
  """HF Adafactor as the study configured it (no parameter scaling, no relative step, no momentum)."""
  from transformers.optimization import Adafactor

  return Adafactor(
    soft_prompt.parameters(),
    lr=learning_rate,
    scale_parameter=False,
    relative_step=False,
    warmup_init=False,
    weight_decay=weight_decay,
  )


class ReferenceRun:
  """One prompt-training run of the reference: a soft prompt, its Adafactor, and a step per method.

  `step(method, batch)` computes the method's gradient and applies one Adafactor update; returns the
  loss. `meta_gradient(method, batch)` only computes the gradient (left in `soft_prompt.prompt.grad`).
  """

  def __init__(self, model, prompt, *, inner_lr: float = 3e-5, learning_rate: float = 0.5):
    self.model = model
    self.soft_prompt = SoftPrompt(prompt, device=next(model.parameters()).device)
    self.inner_lr = inner_lr
    self.optimizer = make_outer_optimizer(self.soft_prompt, learning_rate)

  def meta_gradient(self, method: str, batch) -> float:
    if method in ("maml", "fomaml"):
      return maml_meta_gradient(
        self.model, self.soft_prompt, batch, inner_lr=self.inner_lr, first_order=(method == "fomaml")
      )
    if method == "reptile":
      return reptile_meta_gradient(self.model, self.soft_prompt, batch, inner_lr=self.inner_lr)
    if method in ("pt", "mtl"):
      return pt_gradient(self.model, self.soft_prompt, batch)
    raise ValueError(f"unknown method {method!r}; expected pt, mtl, maml, fomaml or reptile")

  def step(self, method: str, batch) -> float:
    loss = self.meta_gradient(method, batch)
    self.optimizer.step()
    return loss

  @property
  def prompt(self) -> np.ndarray:
    return self.soft_prompt.prompt.detach().float().cpu().numpy().copy()

  @property
  def grad(self) -> np.ndarray:
    return self.soft_prompt.prompt.grad.detach().float().cpu().numpy().copy()


def grid_step(runs: list[ReferenceRun], batches: TorchBatch) -> list[float]:
  """One step of each downstream-grid run, one after another, as the reference ran its (seed, lr)
  runs. batches: [R, B, L], run r takes batches[r]. Returns the losses."""
  if len(runs) != batches["input_ids"].shape[0]:
    raise ValueError(f"{len(runs)} runs but batches for {batches['input_ids'].shape[0]}")
  return [run.step("pt", _slice(batches, index)) for index, run in enumerate(runs)]
