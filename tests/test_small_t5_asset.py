"""The shipped small T5 (assets/small_t5) loads like a hub checkpoint and really learned English:
its span-corruption loss on held-out WordNet text is far below a random model's and below uniform guessing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from mpt_jax.data import span_corruption
from mpt_jax.model.hf import load_pretrained
from mpt_jax.model.loss import seq2seq_loss
from mpt_jax.model.t5 import init_params

ASSET = Path(__file__).resolve().parents[1] / "assets" / "small_t5"
CHUNK = 64  # raw tokens per span-corrupted example: short, to keep the test fast
# The shipped model scores 0.17 here; a decoder that ignores its input (the 480-step first run) 0.01.
INPUT_GAP_NATS = 0.05


@pytest.fixture(scope="module")
def loaded():
  return load_pretrained(str(ASSET))


def test_asset_is_a_small_t5_v1_1_checkpoint(loaded):
  model, params, tokenizer = loaded
  config = model.config
  assert config.feed_forward_proj == "gated-gelu" and not config.tie_word_embeddings
  assert not config.scale_decoder_outputs
  assert "lm_head" in params  # untied head, as in T5 v1.1 / LM-adapted
  assert (ASSET / "model.safetensors").stat().st_size < 20 * 2**20
  assert (ASSET / "spiece.model").is_file() and (ASSET / "WORDNET_LICENSE.txt").is_file()
  # T5 conventions: pad 0, eos 1, unk 2, 100 sentinels on top, <extra_id_0> the last id.
  assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
  assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
  assert tokenizer.convert_tokens_to_ids("<extra_id_99>") == len(tokenizer) - 100
  assert len(tokenizer) <= config.vocab_size
  assert tokenizer.decode(tokenizer("a dog is a kind of canine")["input_ids"],
                          skip_special_tokens=True) == "a dog is a kind of canine"


def _heldout_batch(tokenizer, num_examples: int = 8) -> dict:
  docs = (ASSET / "heldout_documents.txt").read_text(encoding="utf-8").splitlines()
  stream = np.concatenate([tokenizer(d, add_special_tokens=False)["input_ids"] for d in docs])
  assert len(stream) >= num_examples * CHUNK
  rng = np.random.default_rng(0)
  sentinel = tokenizer.convert_tokens_to_ids("<extra_id_0>")
  pairs = [span_corruption.span_corrupt(stream[i * CHUNK:(i + 1) * CHUNK], rng, sentinel)
           for i in range(num_examples)]
  return span_corruption.pad_batch(pairs, *span_corruption.corrupted_lengths(CHUNK))


def test_pretrained_loss_is_far_below_a_random_model_and_uniform_guessing(loaded):
  model, params, tokenizer = loaded
  batch = _heldout_batch(tokenizer)
  loss = jax.jit(lambda p, b: seq2seq_loss(model, p, None, b, deterministic=True))
  trained = float(loss(params, batch))
  random = float(loss(init_params(model, jax.random.PRNGKey(0)), batch))
  uniform = math.log(model.config.vocab_size)
  assert trained < 0.6 * random, (trained, random)
  assert trained < 0.6 * uniform, (trained, uniform)


def test_pretrained_model_reads_its_input(loaded):
  """A decoder that ignores the encoder (the first plateau of seq2seq training) also has a low loss,
  but no prompt could steer it: with another example's input, the loss must be clearly worse."""
  model, params, tokenizer = loaded
  batch = _heldout_batch(tokenizer, num_examples=16)
  loss = jax.jit(lambda p, b: seq2seq_loss(model, p, None, b, deterministic=True))
  other_inputs = dict(batch, input_ids=np.roll(batch["input_ids"], 1, axis=0),
                      input_mask=np.roll(batch["input_mask"], 1, axis=0))
  right, wrong = float(loss(params, batch)), float(loss(params, other_inputs))
  assert right < wrong - INPUT_GAP_NATS, (right, wrong)


def test_pretrain_log_records_a_falling_loss():
  log = json.loads((ASSET / "pretrain_log.json").read_text())
  start = log["heldout"][0][1]  # before the first step: about a uniform guess over the vocabulary
  assert start > math.log(8000) and log["train"][-1][1] < 0.6 * start
  assert log["samples"]["greedy"] and log["samples"]["span_corruption"]


def _uncorrupt(inputs: np.ndarray, targets: np.ndarray, sentinel_start: int) -> list[int]:
  """Puts each sentinel's hidden tokens back into the input: the original chunk."""
  hidden, current = {}, None
  for token in targets[:-1]:
    if token > sentinel_start - 100:
      current = int(token)
      hidden[current] = []
    else:
      hidden[current].append(int(token))
  out = []
  for token in inputs[:-1]:
    out.extend(hidden[int(token)] if token > sentinel_start - 100 else [int(token)])
  return out


@pytest.mark.parametrize("length", [20, 64, 128, 301])
def test_span_corruption_hides_15_percent_in_spans_and_is_invertible(length):
  sentinel = 8099
  rng = np.random.default_rng(length)
  tokens = rng.integers(3, 7900, length)
  inputs, targets = span_corruption.span_corrupt(tokens, rng, sentinel)
  noise, spans = round(0.15 * length), max(round(round(0.15 * length) / 3), 1)
  assert inputs[-1] == targets[-1] == 1  # EOS
  assert (len(inputs), len(targets)) == span_corruption.corrupted_lengths(length)
  assert len(inputs) == length - noise + spans + 1 and len(targets) == noise + spans + 1
  # Sentinels count down from <extra_id_0> in both, in the same order; the input starts with real text.
  assert [t for t in inputs if t > sentinel - 100] == list(range(sentinel, sentinel - spans, -1))
  assert inputs[0] < sentinel - 100 and targets[0] == sentinel
  assert _uncorrupt(inputs, targets, sentinel) == list(tokens)
