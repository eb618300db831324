"""Our T5 against transformers' PyTorch T5 (the independent reference), and the model's own switches.

Tiny random checkpoints of both flavours (v1.0: ReLU, tied, scaled; v1.1: gated-GELU, untied, 3
decoder over 2 encoder layers, few buckets so short inputs reach the log-spaced ones) are built with
transformers and read back through our loader.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers_t5
from helpers_t5 import random_batch, tiny_t5
from mpt_jax.decode import greedy_decode
from mpt_jax.model.loss import seq2seq_loss, sequence_log_likelihood, shift_right
from mpt_jax.model.t5 import T5, cast_params, relative_position_bucket

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates

try:
  import torch
except ImportError:  # the JAX-only tests below still run
  torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="the transformers reference needs torch")

TEXTS = [
  "premise: the movie was great [SEP] hypothesis: good",
  "one two",
  "question: who is the old cat that was on the mountain and by the river? answer: the dog",
]
TARGETS = ["positive", "a blue bird in the city", "no"]


def _load_pair(request, version):
  """(version, our model, our params, tokenizer, transformers reference model), loaded once."""
  return (version, *helpers_t5.load_reference_pair(request, version))


@pytest.fixture(scope="module", params=["1.0", "1.1"])
def pair(request):
  return _load_pair(request, request.param)


@pytest.fixture(scope="module")
def pair_v11(request):
  return _load_pair(request, "1.1")


def _jit_apply(model):
  """model.apply under jit: one compilation instead of hundreds of op-by-op ones (tests stay fast)."""
  return jax.jit(model.apply, static_argnames=("placement", "deterministic", "method"))


def _encode(tokenizer, texts):
  out = tokenizer(texts, padding=True, return_tensors="np")
  return out.input_ids.astype(np.int32), out.attention_mask.astype(np.int32)


def _batch(tokenizer):
  input_ids, input_mask = _encode(tokenizer, TEXTS)
  target_ids, target_mask = _encode(tokenizer, TARGETS)
  return {
    "input_ids": input_ids,
    "input_mask": input_mask,
    "target_ids": target_ids,
    "target_mask": target_mask,
  }


def _t(x):
  return torch.tensor(np.asarray(x), dtype=torch.long)


@needs_torch
def test_relative_position_bucket_matches_transformers():
  from transformers.models.t5.modeling_t5 import T5Attention

  relative = np.arange(-600, 601)[None, :]
  for bidirectional in (True, False):
    for buckets, distance in ((32, 128), (8, 12), (32, 20), (64, 256)):
      expected = T5Attention._relative_position_bucket(
        torch.tensor(relative), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
      ).numpy()
      ours = relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
      )
      np.testing.assert_array_equal(np.asarray(ours), expected)


@needs_torch
def test_loaded_config_matches_flavour(pair):
  version, model, params, _, reference = pair
  config = model.config
  assert config.num_decoder_layers == reference.config.num_decoder_layers
  if version == "1.0":
    assert config.tie_word_embeddings and config.scale_decoder_outputs and "lm_head" not in params
  else:
    assert not config.tie_word_embeddings and not config.scale_decoder_outputs
    assert config.num_decoder_layers == 3 and config.num_layers == 2
    np.testing.assert_array_equal(
      np.asarray(params["lm_head"]["kernel"]).T, reference.lm_head.weight.detach().numpy()
    )


@needs_torch
def test_logits_and_loss_match_transformers_on_padded_batch(pair):
  _, model, params, tokenizer, reference = pair
  batch = _batch(tokenizer)
  assert len(set(batch["input_mask"].sum(1))) == 3  # three different input lengths
  decoder_input_ids = np.asarray(shift_right(batch["target_ids"], 0))
  decoder_mask = np.asarray(shift_right(batch["target_mask"], 1))
  labels = np.where(batch["target_mask"] == 1, batch["target_ids"], -100)
  with torch.no_grad():
    expected_logits = reference(
      input_ids=_t(batch["input_ids"]),
      attention_mask=_t(batch["input_mask"]),
      decoder_input_ids=_t(decoder_input_ids),
      decoder_attention_mask=_t(decoder_mask),
    ).logits
    expected_loss = reference(
      input_ids=_t(batch["input_ids"]), attention_mask=_t(batch["input_mask"]), labels=_t(labels)
    ).loss.item()

  @jax.jit  # one compilation for the three quantities
  def ours(params, batch):
    logits = model.apply(
      {"params": params}, batch["input_ids"], batch["input_mask"], decoder_input_ids, decoder_mask
    )
    return (
      logits,
      seq2seq_loss(model, params, None, batch, None, deterministic=True),
      sequence_log_likelihood(model, params, None, batch),
    )

  logits, loss, log_likelihoods = ours(params, batch)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), expected_logits.numpy(), atol=1e-5, rtol=0)
  np.testing.assert_allclose(float(loss), expected_loss, rtol=1e-5)
  # Per-example sums of log-likelihoods, summed and normalized, give back the mean token loss.
  np.testing.assert_allclose(
    -float(log_likelihoods.sum()) / batch["target_mask"].sum(), expected_loss, rtol=1e-5
  )


def _prompt_embeddings(reference, batch, prompt, placement):
  """Encoder inputs_embeds and mask with the prompt placed by hand (numpy), for transformers."""
  tokens = reference.shared.weight.detach().numpy()[batch["input_ids"]]
  lengths = batch["input_mask"].sum(1)
  num_prompt = prompt.shape[0]
  batch_size, length, d_model = tokens.shape
  embeds = np.zeros((batch_size, length + num_prompt, d_model), np.float32)
  mask = np.zeros((batch_size, length + num_prompt), np.int64)
  for i, n in enumerate(lengths):
    rows = [prompt, tokens[i, :n]] if placement == "prepend" else [tokens[i, :n], prompt]
    embeds[i, : n + num_prompt] = np.concatenate(rows)
    embeds[i, n + num_prompt :] = tokens[i, n:]  # padding rows: masked out
    mask[i, : n + num_prompt] = 1
  return embeds, mask


@needs_torch
@pytest.mark.parametrize("placement", ["prepend", "suffix"])
def test_prompted_logits_match_transformers_inputs_embeds(pair_v11, placement):
  # The prompt path does not depend on the flavour; v1.1 is the study's model.
  _, model, params, tokenizer, reference = pair_v11
  batch = _batch(tokenizer)
  prompt = np.random.default_rng(0).normal(size=(4, model.config.d_model)).astype(np.float32)
  decoder_input_ids = np.asarray(shift_right(batch["target_ids"], 0))
  embeds, mask = _prompt_embeddings(reference, batch, prompt, placement)
  with torch.no_grad():
    expected = reference(
      inputs_embeds=torch.tensor(embeds),
      attention_mask=torch.tensor(mask),
      decoder_input_ids=_t(decoder_input_ids),
    ).logits.numpy()
  ours = _jit_apply(model)(
    {"params": params},
    batch["input_ids"],
    batch["input_mask"],
    decoder_input_ids,
    prompt=jnp.asarray(prompt),
    placement=placement,
  )
  np.testing.assert_allclose(np.asarray(ours), expected, atol=1e-5, rtol=0)


@needs_torch
def test_greedy_decoding_matches_transformers_generate(pair):
  _, model, params, tokenizer, reference = pair
  input_ids, input_mask = _encode(tokenizer, TEXTS)
  max_length = 10
  # HF's cache breaks when the decoder is deeper than the encoder (DESIGN.md).
  use_cache = model.config.num_decoder_layers <= model.config.num_layers
  with torch.no_grad():
    free = reference.generate(
      input_ids=_t(input_ids),
      attention_mask=_t(input_mask),
      max_new_tokens=max_length,
      do_sample=False,
      num_beams=1,
      use_cache=use_cache,
    ).numpy()[:, 1:]
  ours = np.asarray(
    greedy_decode(
      model, params, input_ids, input_mask, max_length=max_length, eos_token_id=model.config.eos_token_id
    )
  )
  np.testing.assert_array_equal(ours, np.pad(free, ((0, 0), (0, max_length - free.shape[1]))))

  # Stopping: make a token the first example emits mid-sequence the EOS; both must stop there and pad.
  eos = int(free[0, min(2, free.shape[1] - 1)])
  with torch.no_grad():
    stopped = reference.generate(
      input_ids=_t(input_ids),
      attention_mask=_t(input_mask),
      max_new_tokens=max_length,
      do_sample=False,
      num_beams=1,
      use_cache=use_cache,
      eos_token_id=eos,
      pad_token_id=0,
    ).numpy()[:, 1:]
  stopped = np.pad(stopped, ((0, 0), (0, max_length - stopped.shape[1])))
  ours = np.asarray(
    greedy_decode(model, params, input_ids, input_mask, max_length=max_length, eos_token_id=eos)
  )
  np.testing.assert_array_equal(ours, stopped)
  first_eos = int(np.argmax(ours[0] == eos))
  assert ours[0, first_eos] == eos and np.all(ours[0, first_eos + 1 :] == 0)


# --- the model's own switches (tiny JAX-built models, no torch) --------------------------------------


# Dropout tests compile many threefry draws; JAX's default partitionable threefry compiles ~3x slower
# on CPU. Scoped to these tests (a different random stream, same semantics).
def cheap_dropout_compile():
  return jax.threefry_partitionable(False)


def test_cached_decoding_equals_teacher_forcing():
  model, params = tiny_t5("1.1", seed=1)  # decoder deeper than the encoder
  batch = random_batch(0, batch=3, input_length=9, target_length=6)
  decoder_input_ids = shift_right(batch["target_ids"], 0)

  def cached(variables, batch):
    encoded, encoder_mask = model.apply(variables, batch["input_ids"], batch["input_mask"], method=T5.encode)
    cache = model.apply(variables, encoded, 6, method=T5.init_cache)
    pieces = []
    for start, stop in ((0, 1), (1, 3), (3, 6)):  # one token, then chunks of several
      logits, cache = model.apply(
        variables,
        encoded,
        encoder_mask,
        decoder_input_ids[:, start:stop],
        cache=cache,
        cache_index=start,
        method=T5.decode,
      )
      pieces.append(logits)
    return jnp.concatenate(pieces, axis=1)

  variables = {"params": params}
  full = _jit_apply(model)(variables, batch["input_ids"], batch["input_mask"], decoder_input_ids)
  np.testing.assert_allclose(jax.jit(cached)(variables, batch), full, atol=1e-5, rtol=0)


def test_dropout_is_random_only_when_training():
  # One layer each: every dropout site costs compile time (threefry), and one of each kind suffices.
  model, params = tiny_t5("1.0", num_layers=1, num_decoder_layers=1)
  no_dropout, _ = tiny_t5("1.0", num_layers=1, num_decoder_layers=1, dropout_rate=0.0)
  batch = random_batch(1)

  @jax.jit
  def losses(params, batch, rngs):
    train = jax.vmap(lambda r: seq2seq_loss(model, params, None, batch, r, deterministic=False))
    plain = seq2seq_loss(model, params, None, batch, None, deterministic=True)
    rate_zero = seq2seq_loss(no_dropout, params, None, batch, rngs[0], deterministic=False)
    return train(rngs), plain, rate_zero

  rngs = jnp.stack([jax.random.PRNGKey(3), jax.random.PRNGKey(3), jax.random.PRNGKey(4)])
  with cheap_dropout_compile():
    train, plain, rate_zero = map(np.asarray, losses(params, batch, rngs))
  assert train[0] == train[1] and train[0] != train[2]  # same rng, same dropout mask
  assert abs(train[0] - plain) > 1e-4
  np.testing.assert_allclose(rate_zero, plain, rtol=1e-6)


def _loss_and_grad(model, params, prompt, batch, rng, deterministic=False):
  fn = lambda p: seq2seq_loss(model, params, p, batch, rng, deterministic=deterministic)
  return jax.jit(jax.value_and_grad(fn))(prompt)


def test_remat_gives_identical_loss_and_gradient():
  # Dropout on: rematerialized blocks must redraw the same masks in the backward pass.
  model, params = tiny_t5("1.1", num_layers=1, num_decoder_layers=1)
  remat_model, _ = tiny_t5("1.1", num_layers=1, num_decoder_layers=1, remat=True)
  batch = random_batch(2)
  prompt = jax.random.normal(jax.random.PRNGKey(0), (3, model.config.d_model))
  rng = jax.random.PRNGKey(5)
  with cheap_dropout_compile():
    loss, grad = _loss_and_grad(model, params, prompt, batch, rng)
    remat_loss, remat_grad = _loss_and_grad(remat_model, params, prompt, batch, rng)
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  np.testing.assert_allclose(remat_grad, grad, rtol=1e-5, atol=1e-7)


def test_bfloat16_weights_stay_close_to_float32():
  model, params = tiny_t5("1.1", seed=2, num_layers=1, num_decoder_layers=1)
  bf16_model, _ = tiny_t5("1.1", seed=2, num_layers=1, num_decoder_layers=1, dtype="bfloat16")
  bf16_params = cast_params(params, "bfloat16")
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(bf16_params))
  batch = random_batch(3)
  prompt = 0.5 * jax.random.normal(jax.random.PRNGKey(0), (3, model.config.d_model))
  decoder_input_ids = shift_right(batch["target_ids"], 0)

  def run(model, params):
    def loss_and_logits(prompt):
      logits = model.apply(
        {"params": params}, batch["input_ids"], batch["input_mask"], decoder_input_ids, prompt=prompt
      )
      log_probs = jax.nn.log_softmax(logits)
      token_ll = jnp.take_along_axis(log_probs, batch["target_ids"][..., None], -1)[..., 0]
      return -jnp.sum(token_ll * batch["target_mask"]) / batch["target_mask"].sum(), logits

    (loss, logits), grad = jax.jit(jax.value_and_grad(loss_and_logits, has_aux=True))(prompt)
    return loss, logits, grad

  loss, logits, grad = run(model, params)
  bf16_loss, bf16_logits, bf16_grad = run(bf16_model, bf16_params)
  assert bf16_logits.dtype == jnp.float32 and bf16_grad.dtype == jnp.float32
  scale = float(jnp.abs(logits).max())
  assert float(jnp.abs(bf16_logits - logits).max()) < 0.05 * scale
  np.testing.assert_allclose(bf16_loss, loss, rtol=3e-2)
  cosine = jnp.vdot(grad, bf16_grad) / (jnp.linalg.norm(grad) * jnp.linalg.norm(bf16_grad))
  assert float(cosine) > 0.95
