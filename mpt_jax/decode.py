"""Generation with the frozen T5 and a soft prompt: greedy decoding with the key/value cache.

Everything is jitted with static shapes: the cache holds `max_length` decoder positions and the loop
is a `lax.while_loop` that stops once every sequence has produced EOS. The building blocks
(`start_generation`: encode once and build the cache; `decode_step`: logits of the next token) are
separate so that beam search and rank classification can reuse them (the cache is batch-first, so
beams can reorder it with `jax.tree_util.tree_map(lambda x: x[beam_index], cache)`).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from mpt_jax.model.t5 import T5


def start_generation(model: T5, frozen_params, input_ids, input_mask, prompt=None, *,
                     placement: str = "prepend", max_length: int):
  """Encodes the inputs once -> (encoded, encoder_mask, cache for max_length decoder positions)."""
  variables = {"params": frozen_params}
  encoded, encoder_mask = model.apply(variables, input_ids, input_mask, prompt, placement,
                                      method=T5.encode)
  cache = model.apply(variables, encoded, max_length, method=T5.init_cache)
  return encoded, encoder_mask, cache


def decode_step(model: T5, frozen_params, tokens, encoded, encoder_mask, cache, index):
  """Next-token logits [B, V] (float32) given the token at decoder position `index` [B]."""
  logits, cache = model.apply({"params": frozen_params}, encoded, encoder_mask, tokens[:, None],
                              cache=cache, cache_index=index, method=T5.decode)
  return logits[:, 0], cache


@functools.partial(jax.jit, static_argnames=("model", "max_length", "placement"))
def greedy_decode(model: T5, frozen_params, input_ids, input_mask, prompt=None, *, max_length: int,
                  placement: str = "prepend", eos_token_id=None):
  """Greedy output tokens [B, max_length] int32: the argmax continuation from the decoder start
  token, up to and including EOS, then padding (pad_token_id).

  eos_token_id: the stop token, default the model's; a traced value (changing it does not recompile).
  """
  config = model.config
  eos = config.eos_token_id if eos_token_id is None else eos_token_id
  batch = input_ids.shape[0]
  encoded, encoder_mask, cache = start_generation(model, frozen_params, input_ids, input_mask, prompt,
                                                  placement=placement, max_length=max_length)
  output = jnp.full((batch, max_length), config.pad_token_id, jnp.int32)
  start = jnp.full((batch,), config.decoder_start_token_id, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def not_finished(carry):
    index, _, _, done, _ = carry
    return (index < max_length) & ~jnp.all(done)

  def step(carry):
    index, tokens, output, done, cache = carry
    logits, cache = decode_step(model, frozen_params, tokens, encoded, encoder_mask, cache, index)
    next_tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    next_tokens = jnp.where(done, config.pad_token_id, next_tokens)
    output = output.at[:, index].set(next_tokens)
    done = done | (next_tokens == eos)
    return index + 1, next_tokens, output, done, cache

  _, _, output, _, _ = jax.lax.while_loop(not_finished, step,
                                          (jnp.int32(0), start, output, done, cache))
  return output
