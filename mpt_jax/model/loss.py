"""Sequence-to-sequence losses of the frozen model with a soft prompt (docs/CONTRACTS.md).

Both are pure functions of (prompt, frozen_params, batch): differentiate with respect to `prompt` only;
the frozen params are an argument so that jit does not bake them in as constants. `weights_loss` is the
same token cross-entropy for training the model's own weights (pretraining, fine-tuning), no prompt.
The model is any encoder-decoder of the model protocol (model/protocol.py); T5 is the one shipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mpt_jax.model import protocol
from mpt_jax.model.protocol import EncoderDecoder


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
  model: EncoderDecoder,
  frozen_params,
  prompt,
  batch,
  rng=None,
  *,
  deterministic=True,
  placement: str = "prepend",
):
  """log p(target_t | input, target_<t) per target position, float32 [B, L_out] (pads included)."""
  target_ids = batch["target_ids"]
  rngs = {} if deterministic or rng is None else {"dropout": rng}
  if not deterministic and rng is None:
    raise ValueError("dropout (deterministic=False) needs an rng")
  # stop_gradient: the model is frozen by construction, even for a caller that differentiates the
  # whole argument list (its gradient is then zero and XLA drops the work).
  logits = protocol.logits(
    model,
    jax.lax.stop_gradient(frozen_params),
    batch["input_ids"],
    batch["input_mask"],
    shift_right(target_ids, model.decoder_start_id),
    prompt=prompt,
    placement=placement,
    deterministic=deterministic,
    rngs=rngs,
  )
  return target_log_likelihoods(logits, target_ids)


def seq2seq_loss(
  model: EncoderDecoder,
  frozen_params,
  prompt,
  batch,
  rng=None,
  *,
  deterministic: bool,
  placement: str = "prepend",
):
  """Token cross-entropy, mean over the non-pad target tokens of the batch (float32 scalar)."""
  token_ll = token_log_likelihoods(
    model, frozen_params, prompt, batch, rng, deterministic=deterministic, placement=placement
  )
  return mean_token_nll(token_ll, batch["target_mask"])


def weights_loss(model: EncoderDecoder, params, batch):
  """`seq2seq_loss` without a prompt and without its stop_gradient on the model's params (which guards
  the frozen model in prompt tuning): for differentiating the weights themselves. Dropout off."""
  logits = protocol.logits(
    model,
    params,
    batch["input_ids"],
    batch["input_mask"],
    shift_right(batch["target_ids"], model.decoder_start_id),
  )
  return mean_token_nll(target_log_likelihoods(logits, batch["target_ids"]), batch["target_mask"])


def sequence_log_likelihood(
  model: EncoderDecoder, frozen_params, prompt, batch, *, placement: str = "prepend"
):
  """Sum of target-token log-likelihoods per example [B] (deterministic): rank classification scores."""
  token_ll = token_log_likelihoods(
    model, frozen_params, prompt, batch, deterministic=True, placement=placement
  )
  return jnp.sum(token_ll * batch["target_mask"].astype(jnp.float32), axis=-1)


# --- choosing among a task's labels ---------------------------------------------------------------------

DIRECTIONS = ("direct", "channel")  # which side the model reads: the text (direct) or the label (channel)


def label_log_likelihoods(
  model: EncoderDecoder,
  frozen_params,
  prompt,
  text_ids,
  text_mask,
  label_ids,
  label_mask,
  rng=None,
  *,
  direction: str,
  placement: str = "prepend",
  deterministic: bool = True,
):
  """log-likelihood of every (text, label) pair [B, C]: the sum of the scored side's token log-probabilities,
  EOS included.

  direct: log p(label | prompt, text). Each text is encoded once with the prompt; the decoder scores all C
    labels against it in one batch of B * C rows.
  channel (Min et al. 2022): log p(text | prompt, label). Each label is encoded once with the prompt; the
    decoder scores every text against one label at a time (a `lax.map` over the labels keeps the logits at
    [B, L, V]).
  text_ids / label_ids are EOS-terminated and right-padded ([B, L_text], [C, L_label]), as the encoder reads
  them. Direct, the labels are the decoder's targets over label_ids' whole width: cut it to the longest
  label first (`decode.rank_classify` does) to spare the padding's positions, which the causal decoder
  makes irrelevant to the scores. With dropout (deterministic=False) every pass draws from `rng`."""
  if direction not in DIRECTIONS:
    raise ValueError(f"direction {direction!r}: expected one of {DIRECTIONS}")
  if not deterministic and rng is None:
    raise ValueError("dropout (deterministic=False) needs an rng")
  params = jax.lax.stop_gradient(frozen_params)
  rngs = {} if deterministic else {"dropout": rng}
  start = model.decoder_start_id
  text_ids, label_ids = jnp.asarray(text_ids, jnp.int32), jnp.asarray(label_ids, jnp.int32)
  batch, num_labels = text_ids.shape[0], label_ids.shape[0]

  def decode(encoded, encoder_mask, targets, target_mask):
    logits = protocol.decode(
      model, params, encoded, encoder_mask, shift_right(targets, start), deterministic, rngs=rngs
    )
    return jnp.sum(target_log_likelihoods(logits, targets) * target_mask, axis=-1)

  if direction == "direct":
    encoded, encoder_mask = protocol.encode(
      model, params, text_ids, text_mask, prompt, placement, deterministic, rngs=rngs
    )
    # Row b * C + c: text b with label c.
    scores = decode(
      jnp.repeat(encoded, num_labels, axis=0),
      jnp.repeat(encoder_mask, num_labels, axis=0),
      jnp.tile(label_ids, (batch, 1)),
      jnp.tile(jnp.asarray(label_mask, jnp.float32), (batch, 1)),
    )
    return scores.reshape(batch, num_labels)
  encoded, encoder_mask = protocol.encode(
    model, params, label_ids, label_mask, prompt, placement, deterministic, rngs=rngs
  )
  text_mask = jnp.asarray(text_mask, jnp.float32)

  def score_label(label):
    enc, enc_mask = label
    return decode(
      jnp.broadcast_to(enc, (batch, *enc.shape)),
      jnp.broadcast_to(enc_mask, (batch, *enc_mask.shape)),
      text_ids,
      text_mask,
    )

  return jax.lax.map(score_label, (encoded, encoder_mask)).T  # [B, C]


def gold_label_one_hot(gold_ids, label_ids):
  """[B, C] float32: 1 where example b's gold label (its token ids [B, L], right-padded) is label c
  ([C, L'], right-padded), compared over the longer of the two lengths."""
  length = max(gold_ids.shape[1], label_ids.shape[1])
  gold = jnp.pad(jnp.asarray(gold_ids, jnp.int32), ((0, 0), (0, length - gold_ids.shape[1])))
  labels = jnp.pad(jnp.asarray(label_ids, jnp.int32), ((0, 0), (0, length - label_ids.shape[1])))
  return jnp.all(gold[:, None, :] == labels[None, :, :], axis=-1).astype(jnp.float32)


def label_choice_loss(
  model: EncoderDecoder,
  frozen_params,
  prompt,
  batch,
  rng=None,
  *,
  direction: str,
  deterministic: bool,
  placement: str = "prepend",
):
  """Cross-entropy of each example's gold label among its task's labels, the labels scored by their
  log-likelihood in `direction` (`label_log_likelihoods`): the objective of rank classification itself,
  where the token cross-entropy trains the likelihood of the gold alone. Mean over the examples.

  `batch` holds the task's label set ("label_ids", "label_mask" [C, L]) beside its examples in their
  training form: direct, the input is the text and the target the gold label; channel
  (`batching.channel_form`), the other way round. An example's gold is found among the labels by its token
  ids; one that is not there (every train label is, `decode.label_candidates`) has no target and counts
  zero."""
  if direction == "direct":
    text_ids, text_mask, gold_ids = batch["input_ids"], batch["input_mask"], batch["target_ids"]
  else:
    text_ids, text_mask, gold_ids = batch["target_ids"], batch["target_mask"], batch["input_ids"]
  scores = label_log_likelihoods(
    model,
    frozen_params,
    prompt,
    text_ids,
    text_mask,
    batch["label_ids"],
    batch["label_mask"],
    rng,
    direction=direction,
    placement=placement,
    deterministic=deterministic,
  )
  gold = gold_label_one_hot(gold_ids, batch["label_ids"])
  return -jnp.sum(jax.nn.log_softmax(scores, axis=-1) * gold) / gold.shape[0]
