"""The shipped small T5 (assets/small_t5) loads like a hub checkpoint and really learned English: on
held-out WordNet text its LM loss is far below a random model's and uniform guessing, it reads its input,
and it answers in plain text (LM-adapted); the pretraining objectives cut and corrupt text correctly."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest

from experiments import pretrain_objectives
from mpt_jax.model.hf import load_pretrained
from mpt_jax.model.loss import seq2seq_loss
from mpt_jax.model.t5 import init_params

REPO = Path(__file__).resolve().parents[1]
ASSET = REPO / "assets" / "small_t5"
_spec = importlib.util.spec_from_file_location(
  "pretrain_small_t5", REPO / "experiments" / "pretrain_small_t5.py"
)

pretrain_small_t5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(pretrain_small_t5)

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates (tests/helpers_t5.py)
CHUNK = 64  # raw tokens per example, as the pretraining's LM phase
PREFIX_LM_MAX_TARGET = pretrain_small_t5.PREFIX_LM_MAX_TARGET
# On these 16 examples the shipped model scores 3.69 with its own input and 4.03 with another (gap 0.34);
# the span-corruption-only model before it 13.61 / 13.59 (no gap, and every output opened with a sentinel).
PREFIX_LM_INPUT_GAP_NATS = 0.25


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
  assert (
    tokenizer.decode(tokenizer("a dog is a kind of canine")["input_ids"], skip_special_tokens=True)
    == "a dog is a kind of canine"
  )


def _heldout_prefix_lm_batch(tokenizer, num_examples: int = 16) -> dict:
  """One example per held-out document, cut as in the LM-adaptation phase of the pretraining."""
  docs = (ASSET / "heldout_documents.txt").read_text(encoding="utf-8").splitlines()[:num_examples]
  rng = np.random.default_rng(0)
  pairs = [
    pretrain_objectives.prefix_lm(
      np.asarray(tokenizer(d, add_special_tokens=False)["input_ids"][:CHUNK]),
      rng,
      max_target_tokens=PREFIX_LM_MAX_TARGET,
    )
    for d in docs
  ]
  return pretrain_objectives.pad_batch(
    pairs, *pretrain_objectives.prefix_lm_lengths(CHUNK, PREFIX_LM_MAX_TARGET)
  )


def _loss(model):
  return jax.jit(lambda p, b: seq2seq_loss(model, p, None, b, deterministic=True))


def test_pretrained_loss_is_far_below_a_random_model_and_uniform_guessing(loaded):
  model, params, tokenizer = loaded
  batch = _heldout_prefix_lm_batch(tokenizer)
  trained = float(_loss(model)(params, batch))
  random = float(_loss(model)(init_params(model, jax.random.PRNGKey(0)), batch))
  uniform = math.log(model.config.vocab_size)
  assert trained < 0.6 * random, (trained, random)
  assert trained < 0.6 * uniform, (trained, uniform)


def test_pretrained_model_reads_its_input(loaded):
  """A decoder that ignores the encoder (the first plateau of seq2seq training) also has a low loss,
  but no prompt could steer it: with another example's input, the loss must be clearly worse."""
  model, params, tokenizer = loaded
  batch = _heldout_prefix_lm_batch(tokenizer)
  other_inputs = dict(
    batch,
    input_ids=np.roll(batch["input_ids"], 1, axis=0),
    input_mask=np.roll(batch["input_mask"], 1, axis=0),
  )
  right, wrong = float(_loss(model)(params, batch)), float(_loss(model)(params, other_inputs))
  assert right < wrong - PREFIX_LM_INPUT_GAP_NATS, (right, wrong)


def test_lm_adapted_model_answers_in_plain_text(loaded):
  """Like google/t5-*-lm-adapt (what prompt tuning uses), the model continues plain text. A span-
  corruption-only model opens every output with <extra_id_0> (the first shipped model did, costing ~22
  nats on the first token of any label word)."""
  model, params, tokenizer = loaded
  first_tokens = greedy_first_tokens(model, params, _heldout_prefix_lm_batch(tokenizer))
  sentinels = [t for t in first_tokens if t >= len(tokenizer) - 100]
  assert not sentinels, tokenizer.convert_ids_to_tokens(sentinels)


def greedy_first_tokens(model, params, batch) -> list[int]:
  start = np.zeros((batch["input_ids"].shape[0], 1), np.int32)
  logits = model.apply({"params": params}, batch["input_ids"], batch["input_mask"], start)
  return [int(t) for t in np.asarray(logits[:, 0].argmax(-1))]


def test_pretrain_log_records_both_phases_and_falling_losses():
  log = json.loads((ASSET / "pretrain_log.json").read_text())
  phases = pretrain_small_t5.training_phases(log)
  assert [phase["objective"] for phase in phases] == ["span_corruption", "prefix_lm"]
  start = log["heldout"][0][1]  # before the first step: about a uniform guess over the vocabulary
  assert start > math.log(8000) and min(loss for _, loss in log["heldout"]) < 0.6 * start
  lm_start = phases[1]["step"]
  lm = [loss for step, loss in log["heldout_prefix_lm"] if step > lm_start]
  assert lm and lm[-1] < 0.6 * math.log(8000)
  assert log["samples"]["greedy"] and log["samples"]["span_corruption"] and log["samples"]["prefix_lm"]


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
  inputs, targets = pretrain_objectives.span_corrupt(tokens, rng, sentinel)
  noise, spans = round(0.15 * length), max(round(round(0.15 * length) / 3), 1)
  assert inputs[-1] == targets[-1] == 1  # EOS
  assert (len(inputs), len(targets)) == pretrain_objectives.corrupted_lengths(length)
  assert len(inputs) == length - noise + spans + 1 and len(targets) == noise + spans + 1
  # Sentinels count down from <extra_id_0> in both, in the same order; the input starts with real text.
  assert [t for t in inputs if t > sentinel - 100] == list(range(sentinel, sentinel - spans, -1))
  assert inputs[0] < sentinel - 100 and targets[0] == sentinel
  assert _uncorrupt(inputs, targets, sentinel) == list(tokens)


@pytest.mark.parametrize("length,cap", [(2, None), (64, None), (64, 24), (10, 24), (301, 1)])
def test_prefix_lm_cuts_a_chunk_into_a_nonempty_input_and_a_capped_target(length, cap):
  rng = np.random.default_rng(length)
  tokens = rng.integers(3, 7900, length)
  input_len, target_len = pretrain_objectives.prefix_lm_lengths(length, cap)
  targets_seen = set()
  for _ in range(3000):
    inputs, targets = pretrain_objectives.prefix_lm(tokens, rng, max_target_tokens=cap)
    assert inputs[-1] == targets[-1] == 1  # EOS
    assert len(inputs) >= 2 and len(targets) >= 2  # both parts non-empty
    assert len(inputs) <= input_len and len(targets) <= target_len
    assert list(inputs[:-1]) + list(targets[:-1]) == list(tokens)
    targets_seen.add(len(targets) - 1)
  # Every allowed cut is drawn (uniform over them): target lengths 1 .. min(cap, length - 1).
  assert targets_seen == set(range(1, min(cap or length, length - 1) + 1))


def test_prefix_lm_refuses_what_it_cannot_cut():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="at least 2 tokens"):
    pretrain_objectives.prefix_lm(np.array([5]), rng)
  with pytest.raises(ValueError, match="max_target_tokens"):
    pretrain_objectives.prefix_lm(np.arange(3, 10), rng, max_target_tokens=0)


@pytest.mark.parametrize("length,num_tokens", [(2, 4), (9, 4), (64, 1), (64, 4)])
def test_next_words_targets_are_the_tokens_right_after_a_uniform_cut(length, num_tokens):
  rng = np.random.default_rng(length)
  tokens = rng.integers(3, 7900, length)
  cuts = set()
  for _ in range(2000):
    inputs, targets = pretrain_objectives.next_words(tokens, rng, num_tokens=num_tokens)
    assert inputs[-1] == targets[-1] == 1  # EOS
    cut = len(inputs) - 1
    assert 1 <= cut <= length - 1  # both parts non-empty
    assert list(inputs[:-1]) == list(tokens[:cut])  # the input is the chunk up to the cut
    assert list(targets[:-1]) == list(tokens[cut : cut + num_tokens])  # then only the next tokens
    cuts.add(cut)
  assert cuts == set(range(1, length))  # every cut is drawn
  with pytest.raises(ValueError, match="at least 2 tokens"):
    pretrain_objectives.next_words(np.array([5]), rng)
  with pytest.raises(ValueError, match="num_tokens"):
    pretrain_objectives.next_words(tokens, rng, num_tokens=0)


def test_word_fill_hides_whole_words_behind_one_sentinel_and_targets_them_alone():
  # ids 10-19 open a word, 20-29 continue one: words are [10 21] [11] [12 22 23] [13] [14 24]
  word_start = np.zeros(30, bool)
  word_start[10:20] = True
  tokens = np.array([10, 21, 11, 12, 22, 23, 13, 14, 24])
  words = [[10, 21], [11], [12, 22, 23], [13], [14, 24]]
  rng = np.random.default_rng(0)
  seen = set()
  for _ in range(3000):
    inputs, targets = pretrain_objectives.word_fill(tokens, word_start, rng, sentinel_start=8099)
    assert inputs[-1] == targets[-1] == 1 and list(inputs).count(8099) == 1
    hole = list(inputs).index(8099)
    # Some run of 1-3 consecutive whole words, put back where the sentinel is, restores the document.
    hidden = list(targets[:-1])
    matches = [
      (first, count)
      for count in (1, 2, 3)
      for first in range(len(words) - count + 1)
      if sum(words[first : first + count], []) == hidden
      and sum(words[:first], []) == list(inputs[:hole])
      and sum(words[first + count :], []) == list(inputs[hole + 1 : -1])
    ]
    assert len(matches) == 1, (inputs, targets)
    seen.add(matches[0])
  assert seen == {(f, c) for c in (1, 2, 3) for f in range(len(words) - c + 1)}  # every span is drawn
  # A long word hides only its first max_target_tokens tokens; the rest stays after the sentinel.
  long_doc = np.array([10, 20, 21, 22, 23, 24, 11])
  for _ in range(50):
    inputs, targets = pretrain_objectives.word_fill(long_doc, word_start, rng, 8099, max_target_tokens=3)
    assert len(targets) <= 4
  with pytest.raises(ValueError, match="at least 2 words"):
    pretrain_objectives.word_fill(np.array([10, 21]), word_start, rng, 8099)


def test_word_starts_are_the_pieces_that_open_a_word():
  starts = pretrain_objectives.word_starts(["<pad>", "</s>", "\u2581the", "s", "\u2581", ".", "\u2581(noun"])
  assert starts.tolist() == [False, False, True, False, True, False, True]


def test_mixture_flag_parses_fractions_and_refuses_bad_ones():
  parse = pretrain_small_t5.parse_mixture
  assert parse("") == {"span_corruption": 0.5, "prefix_lm": 0.5}
  assert parse("", span_fraction=0.25) == {"span_corruption": 0.25, "prefix_lm": 0.75}
  assert parse("prefix_lm=0.5, word_fill=0.5") == {"prefix_lm": 0.5, "word_fill": 0.5}
  for bad, message in (
    ("prefix_lm=0.5,word_fill=0.4", "sum to 1"),
    ("prefix_lm=0.5,mixture=0.5", "not one objective"),
    ("prefix_lm=0.5,prefix_lm=0.5", "repeated"),
    ("prefix_lm", "needs a fraction"),
  ):
    with pytest.raises(ValueError, match=message):
      parse(bad)


def _synset(key, pos, lexname, lemmas, definition, pointers=()):
  from experiments import wordnet as wn

  return wn.Synset(
    key=key,
    pos=pos,
    satellite=False,
    lexname=lexname,
    lemmas=lemmas,
    pointers=pointers,
    verb_frames=(),
    definition=definition,
    examples=(),
  )


def test_documents_carry_the_lexicographer_category_of_nouns_and_verbs_only():
  from experiments import wordnet as wn

  tree = _synset(("n", 2), "n", "noun.plant", ("tree",), "a tall perennial woody plant")
  orange = _synset(
    ("n", 1),
    "n",
    "noun.plant",
    ("temple orange",),
    "large citrus tree",
    (wn.Pointer(wn.HYPERNYM, ("n", 2), 0, 0),),
  )
  top = _synset(("n", 3), "n", "noun.Tops", ("entity",), "that which exists")
  quick = _synset(("a", 4), "a", "adj.all", ("quick",), "moving fast")
  synsets = {s.key: s for s in (tree, orange, top, quick)}
  doc = pretrain_small_t5.synset_document(orange, synsets, categories=True)
  assert doc == "Temple orange (noun, plant): large citrus tree. Temple orange is a kind of tree."
  assert pretrain_small_t5.synset_document(orange, synsets).startswith("Temple orange (noun): ")
  assert pretrain_small_t5.synset_document(top, synsets, categories=True).startswith("Entity (noun): ")
  assert pretrain_small_t5.synset_document(quick, synsets, categories=True).startswith("Quick (adjective): ")


def test_mixture_batches_hold_both_objectives_and_are_a_pure_function_of_the_step():
  docs = [np.arange(3, 3 + n, dtype=np.int32) for n in (30, 50, 70, 90, 45, 12, 64, 80)] * 4
  sentinel = 8099

  def batch(step):  # fresh streams each time: nothing carried over between calls
    streams = pretrain_small_t5.make_streams("mixture", docs, CHUNK, seed=0)
    fractions = {"span_corruption": 0.25, "prefix_lm": 0.75}
    return streams, pretrain_small_t5.mixed_batch(streams, step, 8, sentinel, fractions)

  streams, first = batch(5)
  _, again = batch(5)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert first["input_ids"].shape[0] == 8
  # The first 2 rows (25%) are span corruption (targets open with a sentinel), the other 6 prefix LM.
  assert (first["target_ids"][:2, 0] == sentinel).all() and (first["target_ids"][2:, 0] < 8000).all()
  span = pretrain_small_t5.train_batch(streams["span_corruption"], 5, 2, sentinel, "span_corruption")
  prefix = pretrain_small_t5.train_batch(streams["prefix_lm"], 5, 6, sentinel, "prefix_lm")
  for key in ("input_ids", "target_ids"):
    np.testing.assert_array_equal(first[key][:2, : span[key].shape[1]], span[key])
    np.testing.assert_array_equal(first[key][2:, : prefix[key].shape[1]], prefix[key])
    assert not first[key][:2, span[key].shape[1] :].any() and not first[key][2:, prefix[key].shape[1] :].any()


def test_mixture_of_three_objectives_gives_each_its_block_of_rows():
  docs = [np.arange(3, 3 + n, dtype=np.int32) for n in (30, 50, 70, 90, 45, 12, 64, 80)] * 4
  word_start = np.zeros(8100, bool)
  word_start[::2] = True  # every other id opens a word
  fractions = pretrain_small_t5.parse_mixture("prefix_lm=0.25,word_fill=0.5,span_corruption=0.25")
  streams = pretrain_small_t5.make_streams("mixture", docs, CHUNK, seed=0, mixture=fractions)
  assert set(streams) == {"prefix_lm", "word_fill", "span_corruption"}
  batch = pretrain_small_t5.mixed_batch(streams, 3, 8, 8099, fractions, word_start)
  fill = pretrain_small_t5.train_batch(streams["word_fill"], 3, 4, 8099, "word_fill", word_start)
  np.testing.assert_array_equal(batch["input_ids"][2:6, : fill["input_ids"].shape[1]], fill["input_ids"])
  # word_fill rows: one sentinel in the input, a plain-text target; span corruption's open with it.
  assert ((batch["input_ids"][2:6] == 8099).sum(1) == 1).all() and (batch["target_ids"][2:6, 0] < 8000).all()
  assert (batch["target_ids"][6:, 0] == 8099).all() and (batch["target_ids"][:2, 0] < 8000).all()
  with pytest.raises(ValueError, match="word_start"):
    pretrain_small_t5.mixed_batch(streams, 3, 8, 8099, fractions)


def test_a_schedule_without_room_is_refused_before_anything_runs(capsys):
  with pytest.raises(SystemExit):
    pretrain_small_t5.parse_args(["--steps=100", "--phase_start=50", "--warmup_steps=60"])
  assert "--steps=100 leaves no room" in capsys.readouterr().err
  args = pretrain_small_t5.parse_args(["--smoke", "--out_dir=/tmp/somewhere"])
  assert args.plot == "/tmp/somewhere/pretrain_loss.png"  # never the shipped model's curve by default
