"""Sequence-to-sequence losses of the frozen T5 with a soft prompt (docs/CONTRACTS.md).

Both are pure functions of (prompt, frozen_params, batch): differentiate with respect to `prompt` only;
the frozen params are an argument so that jit does not bake them in as constants. `weights_loss` is the
same token cross-entropy for training the model's own weights (pretraining, fine-tuning), no prompt.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpt_jax.model.t5 import T5


def shift_right(target_ids, decoder_start_token_id: int):
  """Decoder inputs for teacher forcing: the start token, then the targets without their last token."""
  start = jnp.full((*target_ids.shape[:-1], 1), decoder_start_token_id, target_ids.dtype)
  return jnp.concatenate([start, target_ids[..., :-1]], axis=-1)


def target_log_likelihoods(logits, target_ids):
  """log p(target_t) per position from decoder logits [B, L, V] (computed in float32) -> [B, L]."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, target_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]


def mean_token_nll(token_ll, target_mask):
  """Token cross-entropy: the mean negative log-likelihood over the non-pad target tokens (scalar)."""
  mask = target_mask.astype(jnp.float32)
  return -jnp.sum(token_ll * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def token_log_likelihoods(
  model: T5, frozen_params, prompt, batch, rng=None, *, deterministic=True, placement: str = "prepend"
):
  """log p(target_t | input, target_<t) per target position, float32 [B, L_out] (pads included)."""
  target_ids = batch["target_ids"]
  rngs = {} if deterministic or rng is None else {"dropout": rng}
  if not deterministic and rng is None:
    raise ValueError("dropout (deterministic=False) needs an rng")
  # stop_gradient: the T5 is frozen by construction, even for a caller that differentiates the
  # whole argument list (its gradient is then zero and XLA drops the work).
  logits = model.apply(
    {"params": jax.lax.stop_gradient(frozen_params)},
    batch["input_ids"],
    batch["input_mask"],
    shift_right(target_ids, model.config.decoder_start_token_id),
    prompt=prompt,
    placement=placement,
    deterministic=deterministic,
    rngs=rngs,
  )
  return target_log_likelihoods(logits, target_ids)


def seq2seq_loss(
  model: T5, frozen_params, prompt, batch, rng=None, *, deterministic: bool, placement: str = "prepend"
):
  """Token cross-entropy, mean over the non-pad target tokens of the batch (float32 scalar)."""
  token_ll = token_log_likelihoods(
    model, frozen_params, prompt, batch, rng, deterministic=deterministic, placement=placement
  )
  return mean_token_nll(token_ll, batch["target_mask"])


def weights_loss(model: T5, params, batch):
  """`seq2seq_loss` without a prompt and without its stop_gradient on the T5 params (which guards the
  frozen model in prompt tuning): for differentiating the weights themselves. Dropout off."""
  logits = model.apply(
    {"params": params},
    batch["input_ids"],
    batch["input_mask"],
    shift_right(batch["target_ids"], model.config.decoder_start_token_id),
  )
  return mean_token_nll(target_log_likelihoods(logits, batch["target_ids"]), batch["target_mask"])


def sequence_log_likelihood(model: T5, frozen_params, prompt, batch, *, placement: str = "prepend"):
  """Sum of target-token log-likelihoods per example [B] (deterministic): rank classification scores."""
  token_ll = token_log_likelihoods(
    model, frozen_params, prompt, batch, deterministic=True, placement=placement
  )
  return jnp.sum(token_ll * batch["target_mask"].astype(jnp.float32), axis=-1)
