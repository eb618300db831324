"""The model protocol: what the runtime needs of a frozen encoder-decoder (issue 28, item 4).

The losses (model/loss.py), the decoders (decode.py), the prompt init (prompt.py) and the weight placement
(sharding.py) know a model only through `EncoderDecoder`. T5 (model/t5.py) is its one implementation;
tests/test_model_protocol.py runs a small other one through the loss, greedy decoding and a PT step.

A model is a hashable flax linen module (a static jit argument) with
- module methods, run inside `apply` by the functions below (so every caller makes the same calls):
    __call__(input_ids, input_mask, decoder_input_ids, decoder_mask=None, prompt=None, placement, deterministic)
        teacher-forced logits, float32 [B, L_out, V];
    encode(input_ids, input_mask, prompt=None, placement, deterministic) -> (encoded [B, L', D], mask [B, L']),
        the soft prompt [P, D] (float32) placed among the input embeddings as `placement` says
        (model/t5.py lists the placements);
    decode(encoded, encoder_mask, decoder_input_ids, decoder_mask=None, deterministic, cache=None,
        cache_index=None): teacher-forced logits, or with a cache -> (logits, new cache) for the tokens at
        decoder positions cache_index.. (a traced scalar);
    init_cache(encoded, max_length): the decoder's cache for max_length positions, a pytree whose leaves
        are batch-first (beam search reorders its "self_"-named entries per layer by a gather, see
        decode._reorder_self_attention; a model without that layout decodes greedily only);
- plain attributes, read outside any trace:
    token_embedding(params) -> float32 [V, D], the input embedding a prompt is initialized from;
    pad_id, eos_id, decoder_start_id: its special token ids;
    partition_rules: ((regex on the '/'-joined parameter path, spec of its trailing dimensions), ...),
        naming MODEL_AXIS where a dimension splits over the mesh's 'model' axis (sharding.py).

The tokenized data (data/batching.py) pads with 0 and ends sequences with 1, T5's ids: a model with other
ids needs them threaded there too (pipeline.build_runtime refuses such a model).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import jax

MODEL_AXIS = "model"  # the mesh axis the frozen weights split over (parallel.py's mesh)

PartitionRules = Sequence[tuple[str, tuple[str | None, ...]]]


@runtime_checkable
class EncoderDecoder(Protocol):
  """The frozen encoder-decoder the runtime computes with (the module docstring says what each does)."""

  pad_id: int
  eos_id: int
  decoder_start_id: int
  partition_rules: PartitionRules

  def apply(self, variables, *args, rngs=None, method=None, **kwargs) -> Any: ...

  def __call__(
    self,
    input_ids,
    input_mask,
    decoder_input_ids,
    decoder_mask=None,
    prompt=None,
    placement="prepend",
    deterministic=True,
  ) -> jax.Array: ...

  def encode(self, input_ids, input_mask, prompt=None, placement="prepend", deterministic=True): ...

  def decode(
    self,
    encoded,
    encoder_mask,
    decoder_input_ids,
    decoder_mask=None,
    deterministic=True,
    cache=None,
    cache_index=None,
  ): ...

  def init_cache(self, encoded, max_length: int): ...

  def token_embedding(self, params) -> jax.Array: ...


def logits(
  model: EncoderDecoder,
  params,
  input_ids,
  input_mask,
  decoder_input_ids,
  *,
  prompt=None,
  placement: str = "prepend",
  deterministic: bool = True,
  rngs=None,
) -> jax.Array:
  """Teacher-forced decoder logits, float32 [B, L_out, V] (encoder and decoder in one pass)."""
  return model.apply(
    {"params": params},
    input_ids,
    input_mask,
    decoder_input_ids,
    prompt=prompt,
    placement=placement,
    deterministic=deterministic,
    rngs=rngs,
  )


def encode(
  model: EncoderDecoder,
  params,
  input_ids,
  input_mask,
  prompt=None,
  placement: str = "prepend",
  deterministic: bool = True,
  rngs=None,
):
  """-> (encoded [B, L', D], encoder_mask [B, L'] bool): the inputs with the prompt, encoded once."""
  return model.apply(
    {"params": params}, input_ids, input_mask, prompt, placement, deterministic, method="encode", rngs=rngs
  )


def decode(
  model: EncoderDecoder, params, encoded, encoder_mask, decoder_input_ids, deterministic=True, rngs=None
):
  """Teacher-forced logits float32 [B, L_out, V] over encoder outputs (from `encode`)."""
  return model.apply(
    {"params": params},
    encoded,
    encoder_mask,
    decoder_input_ids,
    None,
    deterministic,
    method="decode",
    rngs=rngs,
  )


def init_cache(model: EncoderDecoder, params, encoded, max_length: int):
  """The decoder cache of `max_length` positions for `encoded` (what `decode_step` reads and returns)."""
  return model.apply({"params": params}, encoded, max_length, method="init_cache")


def decode_step(model: EncoderDecoder, params, tokens, encoded, encoder_mask, cache, index):
  """(logits [B, L, V] of the tokens [B, L] at decoder positions index.., the new cache)."""
  return model.apply(
    {"params": params},
    encoded,
    encoder_mask,
    tokens,
    cache=cache,
    cache_index=index,
    method="decode",
  )
