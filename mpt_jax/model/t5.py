"""T5 encoder-decoder in linen, with a soft-prompt input and an explicit key/value cache.

Covers T5 v1.0 (ReLU feed-forward, head tied to the shared embedding, decoder output scaled by
d_model**-0.5) and v1.1 / LM-adapted (gated-GELU with the tanh approximation `gelu_new`, untied
`lm_head`, no output scaling). Numerics follow transformers' PyTorch T5 (the parity tests compare the
two): RMS layer norm without mean or bias, no 1/sqrt(d) attention scaling, relative position bias
(bidirectional buckets in the encoder, causal in the decoder) held by the first block of each stack and
shared by the others, dropout where HF puts it (drawn 16 bits an element: model/dropout.py).

Parameter names mirror the HF checkpoint so `hf.py` is a mechanical mapping: HF
`encoder.block.0.layer.0.SelfAttention.q.weight` is ours `encoder/block_0/layer_0/SelfAttention/q/kernel`
(transposed: torch Linear weights are [out, in]), `shared.weight` is `shared/embedding`, layer norms
keep `weight`.

The soft prompt is an argument `prompt` [P, d_model] (float32), never a parameter, so the frozen tree
and the trained prompt stay two pytrees. Placements:
  "prepend"  prompt before the input tokens (the prompt-tuning literature; the default).
  "suffix"   prompt right after each example's last real token (position len_i), so relative positions
             never depend on how much padding the batch has.
  "after_padding"  the reference implementation's: it dropped each batch's all-padding columns, then
             appended the prompt, so the prompt starts right after the batch's longest input (position
             max_i len_i) and a shorter input has padding between its last token and the prompt. Here the
             prompt goes to that position whatever the batch's static padding (the padding beyond it
             moves after the prompt, masked), which reproduces the reference exactly, batch by batch; an
             example's output still depends on the other inputs of its batch, as it did there.
The prompt is the embedding (it bypasses the token embedding), is visible in encoder self-attention and
in cross-attention, and gets the embedding dropout like the tokens. Inputs must be right-padded.

Compute dtype: `config.dtype` ("float32" | "bfloat16") is the dtype of the matmuls; the frozen params may
be stored in either (see `cast_params`); layer-norm statistics, softmax, the prompt and the returned
logits are float32. `config.remat` rematerializes each block (`jax.checkpoint`) to trade compute for
memory; `config.remat_policy` says what a block keeps for the backward pass: "nothing" (recompute all)
or "dots" (keep the outputs of the matmuls with the weights, recompute the rest).

Scanned layers (`config.scan_layers`): the blocks after the first of each stack are one `lax.scan` over
their parameters stacked on a leading axis, so XLA compiles one block body instead of one per layer
(compile time grows far less with depth; same numbers up to float rounding). The parameter tree then
holds `block_0` (which owns the position-bias table) and `blocks`, blocks 1..N-1 stacked;
`stack_blocks` / `unstack_blocks` convert between the two layouts, and `hf.py` reads and writes
checkpoints in the per-layer one. Generation with the KV cache runs the stacked blocks in a Python loop
over their slices (the cache stays a list per layer, the layout beam search reorders).

Generation: `encode` once, `init_cache` (self-attention K/V buffers of static length plus the
cross-attention K/V computed once), then `decode(..., cache=, cache_index=)` one or more tokens at a
time under jit. The cache is a plain pytree (a list per decoder layer of dicts of [B, L, H, d_kv]
arrays, batch first), so beam search can reorder it with a `tree_map` gather.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.model.dropout import Dropout
from mpt_jax.model.protocol import MODEL_AXIS

PLACEMENTS = ("prepend", "suffix", "after_padding")
FEED_FORWARD_PROJS = ("relu", "gated-gelu")
DTYPES = ("float32", "bfloat16")
# What a rematerialized block keeps for the backward pass (jax.checkpoint policies).
REMAT_POLICIES = {
  "nothing": None,  # recompute the whole block
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep x @ W, recompute the rest
}
STACKED_BLOCKS = "blocks"  # the parameter of blocks 1..N-1 of a stack when config.scan_layers
# How attention is computed: our einsums ("einsum"), or jax.nn.dot_product_attention with that
# implementation ("xla"; "cudnn": fused cuDNN kernels, bfloat16 on NVIDIA GPUs, first-order gradients
# only). dot_product_attention has no dropout, so it serves only dropout-free calls (evaluation,
# dropout_rate 0); others fall back to the einsums.
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn")

_M = MODEL_AXIS
# Where each weight lives on the mesh's 'model' axis (sharding.py, which explains the layout): (pattern
# searched in the '/'-joined parameter path, spec of its trailing dimensions). The Megatron split: heads
# and feed-forward hidden units over 'model', the vocabulary too; layer norms and position biases whole.
PARTITION_RULES: tuple[tuple[str, tuple[str | None, ...]], ...] = (
  (r"(SelfAttention|EncDecAttention)/(q|k|v)/kernel$", (None, _M)),
  (r"(SelfAttention|EncDecAttention)/o/kernel$", (_M, None)),
  (r"DenseReluDense/wi(_0|_1)?/kernel$", (None, _M)),
  (r"DenseReluDense/wo/kernel$", (_M, None)),
  (r"(^|/)shared/embedding$", (_M, None)),
  (r"(^|/)lm_head/kernel$", (None, _M)),
  (r"relative_attention_bias/embedding$", ()),
  (r"layer_norm/weight$", ()),
)

Cache = list  # per decoder layer: {"self_key", "self_value", "cross_key", "cross_value"}


@dataclasses.dataclass(frozen=True)
class T5Config:
  """T5 hyper-parameters (HF names), plus how we compute (dtype, remat, scan_layers). Hashable: a static
  jit arg."""

  vocab_size: int = 32128
  d_model: int = 512
  d_kv: int = 64
  d_ff: int = 2048
  num_layers: int = 6
  num_decoder_layers: int | None = None  # None: same as num_layers
  num_heads: int = 8
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dropout_rate: float = 0.1
  layer_norm_epsilon: float = 1e-6
  feed_forward_proj: str = "relu"
  tie_word_embeddings: bool = True  # the head is the shared embedding (no lm_head parameter)
  scale_decoder_outputs: bool = True  # multiply the decoder output by d_model**-0.5 (T5 v1.0)
  pad_token_id: int = 0
  eos_token_id: int = 1
  decoder_start_token_id: int = 0
  dtype: str = "float32"
  remat: bool = False
  remat_policy: str = "nothing"  # see REMAT_POLICIES
  scan_layers: bool = False  # blocks 1..N-1 of each stack as one lax.scan (params stacked)
  attention: str = "einsum"  # see ATTENTION_IMPLEMENTATIONS

  def __post_init__(self):
    if self.num_decoder_layers is None:
      object.__setattr__(self, "num_decoder_layers", self.num_layers)
    if self.feed_forward_proj not in FEED_FORWARD_PROJS:
      raise ValueError(
        f"T5Config.feed_forward_proj={self.feed_forward_proj!r}: supported are "
        f"{FEED_FORWARD_PROJS} (T5 v1.0 and v1.1/LM-adapted/Flan-T5)."
      )
    if self.dtype not in DTYPES:
      raise ValueError(f"T5Config.dtype={self.dtype!r}: supported are {DTYPES}.")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"T5Config.attention={self.attention!r}: supported are {ATTENTION_IMPLEMENTATIONS}.")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"T5Config.remat_policy={self.remat_policy!r}: supported are {tuple(REMAT_POLICIES)}.")

  @property
  def compute_dtype(self):
    return jnp.dtype(self.dtype)

  @property
  def is_gated(self) -> bool:
    return self.feed_forward_proj.startswith("gated-")

  def replace(self, **changes) -> T5Config:
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_hf_dict(
    cls,
    hf: Mapping[str, Any],
    *,
    dtype: str = "float32",
    remat: bool = False,
    tie_word_embeddings: bool | None = None,
    scan_layers: bool = False,
  ) -> T5Config:
    """From a transformers `config.json` dict (any transformers version).

    Old files (transformers 4) carry the head tying in `tie_word_embeddings` (False for v1.1), and HF
    scaled the decoder output exactly when the head was tied. transformers 5 forces
    `tie_word_embeddings=True` and keeps the scaling in `scale_decoder_outputs`. So: the scaling is
    `scale_decoder_outputs` when present, else `tie_word_embeddings`; the tying is best judged from the
    checkpoint (a distinct `lm_head.weight` means untied), which the loader passes as
    `tie_word_embeddings`; without it we guess the original pairing (tied exactly when scaled).
    """
    model_type = hf.get("model_type")
    if model_type != "t5":
      raise ValueError(
        f"config model_type is {model_type!r}, not 't5': mpt_jax only runs T5 "
        f"encoder-decoders (t5, t5-v1_1, t5-lm-adapt, flan-t5 checkpoints)."
      )
    if "scale_decoder_outputs" in hf:
      scale = bool(hf["scale_decoder_outputs"])
    else:
      scale = hf.get("tie_word_embeddings", True) is not False
    tie = scale if tie_word_embeddings is None else tie_word_embeddings
    ffp = hf.get("feed_forward_proj", "relu")
    names = [f.name for f in dataclasses.fields(cls)]
    plain = {
      k: hf[k]
      for k in names
      if k in hf
      and k
      not in (
        "tie_word_embeddings",
        "scale_decoder_outputs",
        "dtype",
        "remat",
        "remat_policy",
        "scan_layers",
        "attention",
        "feed_forward_proj",
      )
    }
    if plain.get("decoder_start_token_id") is None:
      plain["decoder_start_token_id"] = hf.get("pad_token_id", 0) or 0
    for key in ("pad_token_id", "eos_token_id"):
      if isinstance(plain.get(key), list):
        plain[key] = plain[key][0]
      if key in plain and plain[key] is None:
        del plain[key]
    return cls(
      **plain,
      feed_forward_proj=ffp,
      tie_word_embeddings=tie,
      scale_decoder_outputs=scale,
      dtype=dtype,
      remat=remat,
      scan_layers=scan_layers,
    )

  def to_hf_dict(self) -> dict[str, Any]:
    """A `config.json` dict that transformers 4 and 5 both read with our meaning."""
    hf = {
      k: getattr(self, k)
      for k in (
        "vocab_size",
        "d_model",
        "d_kv",
        "d_ff",
        "num_layers",
        "num_decoder_layers",
        "num_heads",
        "relative_attention_num_buckets",
        "relative_attention_max_distance",
        "dropout_rate",
        "layer_norm_epsilon",
        "feed_forward_proj",
        "pad_token_id",
        "eos_token_id",
        "decoder_start_token_id",
      )
    }
    hf.update(
      model_type="t5",
      architectures=["T5ForConditionalGeneration"],
      is_encoder_decoder=True,
      # transformers 4 reads the scaling from here; transformers 5 from scale_decoder_outputs.
      tie_word_embeddings=self.tie_word_embeddings,
      scale_decoder_outputs=self.scale_decoder_outputs,
      dense_act_fn="gelu_new" if self.is_gated else "relu",
      is_gated_act=self.is_gated,
      initializer_factor=1.0,
      use_cache=True,
    )
    return hf


def cast_params(params, dtype):
  """The frozen params in `dtype` (e.g. bfloat16 to halve their memory); the prompt is not in here."""
  dtype = jnp.dtype(dtype)
  return jax.tree_util.tree_map(
    lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params
  )


def stack_blocks(params):
  """Per-layer params (`block_0` .. `block_{N-1}` in each stack: the checkpoint's layout) -> the
  scanned layout (`block_0`, and blocks 1..N-1 stacked on a leading axis under `blocks`)."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(params[stack])
    rest = [tree.pop(f"block_{i}") for i in range(1, _num_blocks(tree))]
    if rest:
      # Host (numpy) params stay on the host (hf.load_pretrained(on_host=True) places them part by part).
      tree[STACKED_BLOCKS] = jax.tree_util.tree_map(
        lambda *layers: np.stack(layers) if isinstance(layers[0], np.ndarray) else jnp.stack(layers), *rest
      )
    out[stack] = tree
  return out


def unstack_blocks(params):
  """The scanned layout -> per-layer params (the inverse of `stack_blocks`; others pass through)."""
  out = dict(params)
  for stack in ("encoder", "decoder"):
    tree = dict(params[stack])
    stacked = tree.pop(STACKED_BLOCKS, None)
    if stacked is not None:
      num_blocks = jax.tree_util.tree_leaves(stacked)[0].shape[0]
      for i in range(num_blocks):
        tree[f"block_{i + 1}"] = jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], stacked)
    out[stack] = tree
  return out


def _num_blocks(stack_params) -> int:
  return sum(1 for name in stack_params if name.startswith("block_"))


def relative_position_bucket(relative_position, *, bidirectional: bool, num_buckets: int, max_distance: int):
  """HF/Mesh-TF bucketing of (memory - query) positions, with the same float32 ops as transformers.

  Exact small buckets near 0, then log-spaced buckets up to max_distance; one side each when
  bidirectional, only the past (relative_position <= 0) when causal.
  """
  relative_position = jnp.asarray(relative_position, jnp.int32)
  buckets = jnp.zeros_like(relative_position)
  if bidirectional:
    num_buckets //= 2
    buckets += (relative_position > 0).astype(jnp.int32) * num_buckets
    distance = jnp.abs(relative_position)
  else:
    distance = -jnp.minimum(relative_position, 0)
  max_exact = num_buckets // 2
  is_small = distance < max_exact
  # maximum(): keeps log() finite on the small side, whose value where() discards anyway.
  safe = jnp.maximum(distance, max_exact).astype(jnp.float32)
  large = max_exact + (
    jnp.log(safe / max_exact) / math.log(max_distance / max_exact) * (num_buckets - max_exact)
  ).astype(jnp.int32)
  large = jnp.minimum(large, num_buckets - 1)
  return buckets + jnp.where(is_small, distance, large)


def _normal(std: float):
  return nn.initializers.normal(stddev=std)


class LayerNorm(nn.Module):
  """T5LayerNorm: scale by the root mean square (statistics in float32), no mean, no bias."""

  config: T5Config

  @nn.compact
  def __call__(self, x):
    weight = self.param("weight", nn.initializers.ones, (self.config.d_model,), jnp.float32)
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(
      jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.config.layer_norm_epsilon
    )
    dtype = self.config.compute_dtype
    return weight.astype(dtype) * x32.astype(dtype)


def _dense(config: T5Config, features: int, std: float, name: str):
  return nn.Dense(features, use_bias=False, dtype=config.compute_dtype, kernel_init=_normal(std), name=name)


class Attention(nn.Module):
  """Multi-head attention without 1/sqrt(d) scaling; optionally owns the relative position bias."""

  config: T5Config
  is_decoder: bool = False  # causal relative buckets (only matters with the bias table)
  has_relative_attention_bias: bool = False

  def setup(self):
    c = self.config
    inner = c.num_heads * c.d_kv
    self.q = _dense(c, inner, (c.d_model * c.d_kv) ** -0.5, "q")
    self.k = _dense(c, inner, c.d_model**-0.5, "k")
    self.v = _dense(c, inner, c.d_model**-0.5, "v")
    self.o = _dense(c, c.d_model, inner**-0.5, "o")
    self.dropout = Dropout(c.dropout_rate)
    if self.has_relative_attention_bias:
      self.relative_attention_bias = nn.Embed(
        c.relative_attention_num_buckets,
        c.num_heads,
        embedding_init=_normal(c.d_model**-0.5),
        name="relative_attention_bias",
      )

  def _heads(self, x):
    return x.reshape(*x.shape[:-1], self.config.num_heads, self.config.d_kv)

  def project_kv(self, x):
    """Keys and values [B, L, H, d_kv] of `x` (cross-attention caches these once per input)."""
    return self._heads(self.k(x)), self._heads(self.v(x))

  def position_bias(self, query_positions, key_positions):
    """[1, H, Lq, Lk] float32 bias from the bucket table (first layer only; shared by the rest)."""
    c = self.config
    buckets = relative_position_bucket(
      key_positions[None, :] - query_positions[:, None],
      bidirectional=not self.is_decoder,
      num_buckets=c.relative_attention_num_buckets,
      max_distance=c.relative_attention_max_distance,
    )
    table = self.relative_attention_bias.embedding.astype(jnp.float32)
    return jnp.transpose(table[buckets], (2, 0, 1))[None]

  def __call__(self, x, keys, values, mask, bias, deterministic: bool):
    """x [B, Lq, D]; keys/values [B, Lk, H, d_kv]; mask broadcastable to [B, H, Lq, Lk] (True = see);
    bias None or broadcastable to [B, H, Lq, Lk] float32."""
    query = self._heads(self.q(x))
    c = self.config
    if c.attention != "einsum" and (deterministic or c.dropout_rate == 0):
      # T5 does not scale the scores; the position bias joins in the compute dtype (what cuDNN takes).
      out = jax.nn.dot_product_attention(
        query,
        keys.astype(query.dtype),
        values.astype(query.dtype),
        bias=None if bias is None else bias.astype(query.dtype),
        mask=mask,
        scale=1.0,
        implementation=c.attention,
      )
      return self.o(out.reshape(*out.shape[:2], -1))
    scores = jnp.einsum("bqhd,bkhd->bhqk", query, keys).astype(jnp.float32)
    if bias is not None:
      scores = scores + bias
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    weights = self.dropout(weights, deterministic=deterministic).astype(self.config.compute_dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights, values)
    return self.o(out.reshape(*out.shape[:2], -1))


class SelfAttentionLayer(nn.Module):
  """Pre-norm self-attention with residual (HF T5LayerSelfAttention)."""

  config: T5Config
  is_decoder: bool = False
  has_relative_attention_bias: bool = False

  def setup(self):
    self.SelfAttention = Attention(self.config, self.is_decoder, self.has_relative_attention_bias)
    self.layer_norm = LayerNorm(self.config)
    self.dropout = Dropout(self.config.dropout_rate)

  def __call__(
    self, x, mask, position_bias, query_positions, key_positions, deterministic, cache=None, cache_index=None
  ):
    """Returns (x, position_bias, cache). With a cache, this call's keys/values are written at
    cache_index and attention runs over the whole (static length) buffer."""
    normed = self.layer_norm(x)
    keys, values = self.SelfAttention.project_kv(normed)
    if cache is not None:
      start = (0, cache_index, 0, 0)
      keys = jax.lax.dynamic_update_slice(cache["self_key"], keys.astype(cache["self_key"].dtype), start)
      values = jax.lax.dynamic_update_slice(
        cache["self_value"], values.astype(cache["self_value"].dtype), start
      )
      cache = {**cache, "self_key": keys, "self_value": values}
    if position_bias is None and self.has_relative_attention_bias:
      position_bias = self.SelfAttention.position_bias(query_positions, key_positions)
    out = self.SelfAttention(normed, keys, values, mask, position_bias, deterministic)
    return x + self.dropout(out, deterministic=deterministic), position_bias, cache


class CrossAttentionLayer(nn.Module):
  """Pre-norm attention over the encoder output (HF T5LayerCrossAttention); no position bias."""

  config: T5Config

  def setup(self):
    self.EncDecAttention = Attention(self.config)
    self.layer_norm = LayerNorm(self.config)
    self.dropout = Dropout(self.config.dropout_rate)

  def project_kv(self, encoded):
    return self.EncDecAttention.project_kv(encoded)

  def __call__(self, x, encoded, mask, deterministic, cache=None):
    if cache is not None:
      keys, values = cache["cross_key"], cache["cross_value"]
    else:
      keys, values = self.project_kv(encoded)
    out = self.EncDecAttention(self.layer_norm(x), keys, values, mask, None, deterministic)
    return x + self.dropout(out, deterministic=deterministic)


class FeedForwardLayer(nn.Module):
  """Pre-norm feed-forward with residual: ReLU (v1.0) or gated GELU-tanh (v1.1)."""

  config: T5Config

  @nn.compact
  def __call__(self, x, deterministic):
    c = self.config
    normed = LayerNorm(c, name="layer_norm")(x)
    ff = FeedForward(c, name="DenseReluDense")(normed, deterministic)
    return x + Dropout(c.dropout_rate)(ff, deterministic=deterministic)


class FeedForward(nn.Module):
  config: T5Config

  @nn.compact
  def __call__(self, x, deterministic):
    c = self.config
    if c.is_gated:
      gate = nn.gelu(_dense(c, c.d_ff, c.d_model**-0.5, "wi_0")(x), approximate=True)
      hidden = gate * _dense(c, c.d_ff, c.d_model**-0.5, "wi_1")(x)
    else:
      hidden = nn.relu(_dense(c, c.d_ff, c.d_model**-0.5, "wi")(x))
    hidden = Dropout(c.dropout_rate)(hidden, deterministic=deterministic)
    return _dense(c, c.d_model, c.d_ff**-0.5, "wo")(hidden)


class Block(nn.Module):
  """One encoder (self-attn, FF) or decoder (self-attn, cross-attn, FF) block: HF T5Block."""

  config: T5Config
  is_decoder: bool = False
  has_relative_attention_bias: bool = False

  def setup(self):
    layers = [SelfAttentionLayer(self.config, self.is_decoder, self.has_relative_attention_bias)]
    if self.is_decoder:
      layers.append(CrossAttentionLayer(self.config))
    layers.append(FeedForwardLayer(self.config))
    self.layer = layers

  def cross_kv(self, encoded):
    return self.layer[1].project_kv(encoded)

  # Positional arguments only (`BlockInputs.args` builds them): nn.remat marks `deterministic` (index 10,
  # self = 0) static.
  def __call__(
    self,
    x,
    mask,
    position_bias,
    query_positions,
    key_positions,
    encoded,
    encoder_mask,
    cache,
    cache_index,
    deterministic,
  ):
    x, position_bias, cache = self.layer[0](
      x, mask, position_bias, query_positions, key_positions, deterministic, cache, cache_index
    )
    if self.is_decoder:
      x = self.layer[1](x, encoded, encoder_mask, deterministic, cache)
    x = self.layer[-1](x, deterministic)
    return x, position_bias, cache


class BlockInputs(NamedTuple):
  """What every block of one stack call shares; `args` puts it, with a block's own inputs, in the order of
  `Block.__call__` (positional: nn.remat's static_argnums names `deterministic` by its index)."""

  mask: Any
  query_positions: Any
  key_positions: Any
  encoded: Any
  encoder_mask: Any
  cache_index: Any
  deterministic: bool

  def args(self, x, position_bias, layer_cache) -> tuple:
    return (
      x,
      self.mask,
      position_bias,
      self.query_positions,
      self.key_positions,
      self.encoded,
      self.encoder_mask,
      layer_cache,
      self.cache_index,
      self.deterministic,
    )


_DETERMINISTIC_ARG = 10  # Block.__call__'s `deterministic`, counting self as 0


class Stack(nn.Module):
  """Encoder or decoder stack (HF T5Stack) from input embeddings to the final layer norm."""

  config: T5Config
  is_decoder: bool = False

  def setup(self):
    c = self.config
    block_cls = Block
    if c.remat:
      block_cls = nn.remat(Block, static_argnums=(_DETERMINISTIC_ARG,), policy=REMAT_POLICIES[c.remat_policy])
    n = c.num_decoder_layers if self.is_decoder else c.num_layers
    if self._has_stacked_blocks:
      self.block = [block_cls(c, self.is_decoder, True)]
      self.blocks = self.param(STACKED_BLOCKS, self._init_stacked_blocks, n - 1)
    else:
      self.block = [block_cls(c, self.is_decoder, i == 0) for i in range(n)]
    self.final_layer_norm = LayerNorm(c)
    self.dropout = Dropout(c.dropout_rate)

  @property
  def _has_stacked_blocks(self) -> bool:
    c = self.config
    return c.scan_layers and (c.num_decoder_layers if self.is_decoder else c.num_layers) > 1

  def _plain_block(self) -> Block:
    """A block without the position-bias table, unbound: applied to one layer's (stacked) params."""
    return Block(self.config, self.is_decoder, False, parent=None)

  def _init_stacked_blocks(self, rng, num_blocks: int):
    c = self.config
    x = jnp.zeros((1, 1, c.d_model), jnp.float32)
    mask = jnp.ones((1, 1, 1, 1), bool)
    positions = jnp.zeros((1,), jnp.int32)
    inputs = BlockInputs(mask, positions, positions, x if self.is_decoder else None, mask, None, True)
    bias = jnp.zeros((1, c.num_heads, 1, 1), jnp.float32)
    init = lambda key: self._plain_block().init(key, *inputs.args(x, bias, None))["params"]
    return jax.vmap(init)(jax.random.split(rng, num_blocks))

  def _stacked_slices(self):
    num_blocks = jax.tree_util.tree_leaves(self.blocks)[0].shape[0]
    return [jax.tree_util.tree_map(lambda leaf, i=i: leaf[i], self.blocks) for i in range(num_blocks)]

  def cross_kv(self, encoded):
    kv = [block.cross_kv(encoded) for block in self.block]
    if self._has_stacked_blocks:
      kv += [
        self._plain_block().apply({"params": params}, encoded, method=Block.cross_kv)
        for params in self._stacked_slices()
      ]
    return kv

  def __call__(
    self,
    embeddings,
    mask,
    query_positions,
    key_positions,
    deterministic,
    encoded=None,
    encoder_mask=None,
    cache=None,
    cache_index=None,
  ):
    x = self.dropout(embeddings, deterministic=deterministic)
    inputs = BlockInputs(
      mask, query_positions, key_positions, encoded, encoder_mask, cache_index, deterministic
    )
    position_bias = None
    new_cache = [] if cache is not None else None
    for i, block in enumerate(self.block):
      layer_cache = cache[i] if cache is not None else None
      x, position_bias, layer_cache = block(*inputs.args(x, position_bias, layer_cache))
      if cache is not None:
        new_cache.append(layer_cache)
    if self._has_stacked_blocks:
      x, stacked_cache = self._run_stacked_blocks(x, position_bias, inputs, cache)
      if cache is not None:
        new_cache += stacked_cache
    x = self.final_layer_norm(x)
    return self.dropout(x, deterministic=deterministic), new_cache

  def _run_stacked_blocks(self, x, position_bias, inputs: BlockInputs, cache):
    """Blocks 1..N-1 from their stacked params: one lax.scan (one compiled body), or with a KV cache a
    loop over the layers' slices (the cache is a list per layer). Each layer draws its own dropout."""
    c = self.config
    block = self._plain_block()
    num_blocks = jax.tree_util.tree_leaves(self.blocks)[0].shape[0]
    layer_rngs = None if inputs.deterministic else jax.random.split(self.make_rng("dropout"), num_blocks)

    def apply_block(x, params, rng, layer_cache):
      return block.apply(
        {"params": params},
        *inputs.args(x, position_bias, layer_cache),
        rngs={} if rng is None else {"dropout": rng},
      )

    if cache is not None:
      new_cache = []
      for i, params in enumerate(self._stacked_slices()):
        x, _, layer_cache = apply_block(
          x, params, None if layer_rngs is None else layer_rngs[i], cache[len(self.block) + i]
        )
        new_cache.append(layer_cache)
      return x, new_cache

    def body(x, params_and_rng):
      params, rng = params_and_rng
      return apply_block(x, params, rng, None)[0], None

    if c.remat:
      # prevent_cse=False: inside a scan, CSE cannot merge the recomputation into the forward pass.
      body = jax.checkpoint(body, policy=REMAT_POLICIES[c.remat_policy], prevent_cse=False)
    x, _ = jax.lax.scan(body, x, (self.blocks, layer_rngs))
    return x, None


def place_prompt(embeddings, input_mask, prompt, placement: str):
  """Puts the prompt [P, D] among the token embeddings [B, L, D]: -> ([B, L+P, D], mask [B, L+P])."""
  batch, length, _ = embeddings.shape
  num_prompt = prompt.shape[0]
  prompt = prompt.astype(embeddings.dtype)
  input_mask = input_mask.astype(bool)
  if placement == "prepend":
    prompt_batch = jnp.broadcast_to(prompt[None], (batch, *prompt.shape))
    return (
      jnp.concatenate([prompt_batch, embeddings], 1),
      jnp.concatenate([jnp.ones((batch, num_prompt), bool), input_mask], 1),
    )
  lengths = input_mask.sum(axis=1, dtype=jnp.int32)[:, None]  # right padding assumed
  if placement == "suffix":
    start = lengths
  elif placement == "after_padding":
    # The reference dropped the batch's all-padding columns, then appended the prompt: it starts right
    # after the batch's longest input, whatever padding the batch came with.
    start = jnp.broadcast_to(jnp.max(lengths), lengths.shape)
  else:
    raise ValueError(f"prompt placement {placement!r}: expected one of {PLACEMENTS}")
  positions = jnp.arange(length + num_prompt, dtype=jnp.int32)[None, :]
  in_prompt = (positions >= start) & (positions < start + num_prompt)
  # The columns after the prompt are the input's remaining (padding) columns, shifted right by P.
  token_index = jnp.where(positions < start, positions, jnp.clip(positions - num_prompt, 0, length - 1))
  tokens = jnp.take_along_axis(embeddings, token_index[..., None], axis=1)
  token_mask = jnp.take_along_axis(input_mask, token_index, axis=1)
  prompt_rows = prompt[jnp.clip(positions - start, 0, num_prompt - 1)]
  return jnp.where(in_prompt[..., None], prompt_rows, tokens), in_prompt | token_mask


class T5(nn.Module):
  """T5ForConditionalGeneration. `__call__` -> float32 logits [B, L_out, V] (docs/CONTRACTS.md).

  The implementation of the model protocol (model/protocol.py): `encode`, `decode`, `init_cache` below,
  and these attributes read outside `apply`."""

  config: T5Config
  partition_rules = PARTITION_RULES

  @property
  def pad_id(self) -> int:
    return self.config.pad_token_id

  @property
  def eos_id(self) -> int:
    return self.config.eos_token_id

  @property
  def decoder_start_id(self) -> int:
    return self.config.decoder_start_token_id

  def token_embedding(self, params) -> jax.Array:
    """The shared token embedding [V, d_model] (float32) of a T5 params tree."""
    return token_embedding(params)

  def setup(self):
    c = self.config
    self.shared = nn.Embed(
      c.vocab_size, c.d_model, dtype=c.compute_dtype, embedding_init=_normal(1.0), name="shared"
    )
    self.encoder = Stack(c, is_decoder=False)
    self.decoder = Stack(c, is_decoder=True)
    if not c.tie_word_embeddings:
      self.lm_head = _dense(c, c.vocab_size, 1.0, "lm_head")

  def __call__(
    self,
    input_ids,
    input_mask,
    decoder_input_ids,
    decoder_mask=None,
    prompt=None,
    placement: str = "prepend",
    deterministic: bool = True,
  ):
    encoded, encoder_mask = self.encode(input_ids, input_mask, prompt, placement, deterministic)
    return self.decode(encoded, encoder_mask, decoder_input_ids, decoder_mask, deterministic=deterministic)

  def encode(
    self, input_ids, input_mask, prompt=None, placement: str = "prepend", deterministic: bool = True
  ):
    """-> (encoded [B, L(+P), D] in the compute dtype, encoder_mask [B, L(+P)] bool)."""
    if placement not in PLACEMENTS:
      raise ValueError(f"prompt placement {placement!r}: expected one of {PLACEMENTS}")
    embeddings = self.shared(input_ids)
    mask = input_mask.astype(bool)
    if prompt is not None and prompt.shape[0] > 0:
      if prompt.ndim != 2 or prompt.shape[1] != self.config.d_model:
        raise ValueError(f"prompt has shape {prompt.shape}; expected [P, d_model={self.config.d_model}]")
      embeddings, mask = place_prompt(embeddings, mask, prompt, placement)
    positions = jnp.arange(embeddings.shape[1], dtype=jnp.int32)
    encoded, _ = self.encoder(embeddings, mask[:, None, None, :], positions, positions, deterministic)
    return encoded, mask

  def decode(
    self,
    encoded,
    encoder_mask,
    decoder_input_ids,
    decoder_mask=None,
    deterministic: bool = True,
    cache: Cache | None = None,
    cache_index=None,
  ):
    """Decoder logits (float32). Without a cache: teacher forcing over decoder_input_ids [B, Lq],
    returns logits. With a cache (from `init_cache`): decoder_input_ids are the tokens at positions
    cache_index .. cache_index+Lq-1 (a traced scalar is fine), returns (logits, new_cache); decoder_mask
    is ignored there (every cached position before cache_index counts as real)."""
    length = decoder_input_ids.shape[1]
    query_positions = jnp.arange(length, dtype=jnp.int32)
    if cache is not None:
      query_positions = query_positions + jnp.asarray(cache_index, jnp.int32)
      key_positions = jnp.arange(cache[0]["self_key"].shape[1], dtype=jnp.int32)
      mask = (key_positions[None, :] <= query_positions[:, None])[None, None]
    else:
      key_positions = query_positions
      mask = (key_positions[None, :] <= query_positions[:, None])[None, None]
      if decoder_mask is not None:
        mask = mask & decoder_mask.astype(bool)[:, None, None, :]
    x, new_cache = self.decoder(
      self.shared(decoder_input_ids),
      mask,
      query_positions,
      key_positions,
      deterministic,
      encoded,
      encoder_mask.astype(bool)[:, None, None, :],
      cache,
      cache_index,
    )
    logits = self.logits(x)
    return (logits, new_cache) if cache is not None else logits

  def logits(self, hidden):
    c = self.config
    if c.scale_decoder_outputs:
      hidden = hidden * (c.d_model**-0.5)
    if c.tie_word_embeddings:
      return self.shared.attend(hidden).astype(jnp.float32)
    return self.lm_head(hidden).astype(jnp.float32)

  def init_cache(self, encoded, max_length: int) -> Cache:
    """Empty self-attention K/V buffers of `max_length` decoder positions, and the cross-attention
    K/V of `encoded` (computed once here instead of at every step)."""
    c = self.config
    batch = encoded.shape[0]
    shape = (batch, max_length, c.num_heads, c.d_kv)
    cache = []
    for keys, values in self.decoder.cross_kv(encoded):
      cache.append(
        {
          "self_key": jnp.zeros(shape, keys.dtype),
          "self_value": jnp.zeros(shape, keys.dtype),
          "cross_key": keys,
          "cross_value": values,
        }
      )
    return cache


def token_embedding(params) -> jax.Array:
  """The shared token embedding [V, d_model] (float32) of a T5 params tree (needs no module)."""
  return jnp.asarray(params["shared"]["embedding"], jnp.float32)


def _init_std(config: T5Config, path: tuple[str, ...]) -> float | None:
  """HF's initializer scale of the parameter at `path` (None: a layer-norm weight, initialized to 1)."""
  c = config
  leaf_owner = path[-2]
  if path[-1] == "weight":
    return None
  return {
    "shared": 1.0,
    "lm_head": 1.0,
    "relative_attention_bias": c.d_model**-0.5,
    "q": (c.d_model * c.d_kv) ** -0.5,
    "k": c.d_model**-0.5,
    "v": c.d_model**-0.5,
    "o": (c.num_heads * c.d_kv) ** -0.5,
    "wi": c.d_model**-0.5,
    "wi_0": c.d_model**-0.5,
    "wi_1": c.d_model**-0.5,
    "wo": c.d_ff**-0.5,
  }[leaf_owner]


def init_params(model: T5, seed: int = 0):
  """Random params of `model` with HF's initializer scales, drawn with numpy on the host.

  (model.init gives the same distribution, but compiling or dispatching its ~100 random draws costs
  seconds; tests build many tiny models.)
  """
  import numpy as np

  if not isinstance(seed, int):  # a PRNG key
    seed = int(jax.random.randint(seed, (), 0, 2**31 - 1))
  ids = jnp.zeros((1, 4), jnp.int32)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids, ids)["params"]
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    std = _init_std(model.config, tuple(p.key for p in path))
    if std is None:
      return jnp.ones(leaf.shape, leaf.dtype)
    return jnp.asarray(rng.normal(0.0, std, leaf.shape), leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)
