"""Pretrains the small T5 v1.1 shipped in assets/small_t5 (the frozen model of the offline default).

Nobody here can download google/t5-large-lm-adapt, and prompt tuning only works on a frozen model that
already knows some language. So this script builds an English corpus from the WordNet 3.0 database
(definitions, example sentences, "X is a kind of Y" / synonym / antonym sentences, one short document
per synset), trains a SentencePiece vocabulary on it, and pretrains a small T5 v1.1 (gated-GELU, untied
head, no dropout) using our JAX model and AdamW, in two phases like the checkpoint the study uses:
T5's span-corruption objective (15% noise, mean span 3, <extra_id_*> sentinels), then the "LM
adaptation" (`--objective=prefix_lm`: continue a document from a random cut, no sentinels), without
which every output starts with a sentinel and prompt tuning fights that first. The result is saved in
the Hugging Face layout (config.json, model.safetensors, spiece.model) and loads through
`mpt_jax.model.hf.load_pretrained` like a hub model.

Source text: `apt-get install wordnet-base` (gives /usr/share/wordnet), or set MPT_WORDNET_DIR.

  # smoke run (a minute): tiny model, few steps, into runs/; then its LM-adaptation phase
  python experiments/pretrain_small_t5.py --smoke
  python experiments/pretrain_small_t5.py --smoke --steps=40 --objective=prefix_lm --phase_start=30
  # the shipped model: the exact commands (one run resumed with other --steps, batch shapes and the
  # second phase) are in experiments/README.md

Deterministic given --seed: the corpus, the held-out split, the vocabulary, the batch of every step
(a pure function of the step) and the initialization. Checkpoints go to work_dir every --ckpt_every
steps; a killed run resumes from there.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import os
import pickle
import time
import zlib
from pathlib import Path

# Run by path (python experiments/pretrain_small_t5.py): the repository root makes `experiments` a package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from experiments import pretrain_objectives  # noqa: E402
from experiments import wordnet as wn  # noqa: E402
from mpt_jax import host_memory  # noqa: E402
from mpt_jax.model import tokenizer as tokenizer_lib  # noqa: E402

HELDOUT_PERCENT = 1  # synsets whose hash falls in this percent are never trained on
HELDOUT_FILE = "heldout_documents.txt"
HELDOUT_BATCH_SIZE = 32  # the held-out evaluation batches

# ----------------------------------------------------------------------------------------------------
# Corpus


def _capitalize(text: str) -> str:
  return text[:1].upper() + text[1:]


def _sentence(text: str) -> str:
  text = text.strip()
  return text if text[-1:] in ".!?" else text + "."


def synset_document(synset: wn.Synset, synsets: dict, categories: bool = False) -> str:
  """One short English document about a synset: its definition, examples and relations as sentences.

  categories: head a noun or verb with its WordNet lexicographer category, as a dictionary's field
  label ("Temple orange (noun, plant): ..."), the way a large corpus states somewhere that a temple
  orange is a plant; the tree of "is a kind of" sentences alone leaves it many hops away.
  """
  word = synset.lemmas[0]
  pos = wn.POS_NAMES[synset.pos]
  category = synset.lexname.split(".", 1)[1]
  label = f"{pos}, {category}" if categories and synset.pos in "nv" and category != "Tops" else pos
  parts = [f"{_capitalize(word)} ({label}): {_sentence(synset.definition)}"]
  parts += [_sentence(_capitalize(example)) for example in synset.examples]
  if len(synset.lemmas) > 1:
    parts.append(f"{_capitalize(word)} means the same as {' or '.join(synset.lemmas[1:4])}.")
  hypernyms = [
    synsets[k].lemmas[0] for k in synset.related(wn.HYPERNYM) + synset.related(wn.INSTANCE_HYPERNYM)
  ]
  if hypernyms and synset.pos == "n":
    parts.append(f"{_capitalize(word)} is a kind of {hypernyms[0]}.")
  elif hypernyms and synset.pos == "v":
    parts.append(f"To {word} is a way to {hypernyms[0]}.")
  for p in synset.pointers:
    if p.symbol == wn.ANTONYM and p.source_word:
      antonym = synsets[p.target].lemmas[p.target_word - 1]
      parts.append(f"The opposite of {synset.lemmas[p.source_word - 1]} is {antonym}.")
  return " ".join(parts)


def is_heldout(synset: wn.Synset) -> bool:
  return zlib.crc32(f"{synset.key[0]}{synset.key[1]}".encode()) % 100 < HELDOUT_PERCENT


def build_corpus(wordnet_dir: str | None, categories: bool = False) -> tuple[list[str], list[str]]:
  """(train documents, held-out documents), one per synset, in database order."""
  synsets = wn.load_wordnet(wordnet_dir)
  train, heldout = [], []
  for synset in synsets.values():
    (heldout if is_heldout(synset) else train).append(synset_document(synset, synsets, categories))
  return train, heldout


# ----------------------------------------------------------------------------------------------------
# Data: every step's batch is a pure function of (seed, step), so a resumed run sees the same data.


class ChunkStream:
  """Epochs of the train documents, shuffled per epoch, concatenated and cut into fixed-length chunks."""

  def __init__(self, doc_ids: list[np.ndarray], chunk_len: int, seed: int):
    self.doc_ids, self.chunk_len, self.seed = doc_ids, chunk_len, seed
    self.num_chunks = sum(len(d) for d in doc_ids) // chunk_len
    self._epoch, self._chunks = -1, None

  def chunk(self, index: int) -> np.ndarray:
    epoch, within = divmod(index, self.num_chunks)
    if epoch != self._epoch:
      order = np.random.default_rng([self.seed, epoch]).permutation(len(self.doc_ids))
      stream = np.concatenate([self.doc_ids[i] for i in order])
      self._chunks = stream[: self.num_chunks * self.chunk_len].reshape(self.num_chunks, self.chunk_len)
      self._epoch = epoch
    return self._chunks[within]


class DocumentStream:
  """Epochs of the train documents, shuffled per epoch, one example per document (its first chunk_len
  tokens). The prefix LM cuts each document, not a chunk of concatenated ones: WordNet documents are
  short (~42 tokens), so a chunk's continuation would often be the next, unrelated document, which no
  model can predict from its input (C4's documents, T5's, are hundreds of tokens long)."""

  def __init__(self, doc_ids: list[np.ndarray], chunk_len: int, seed: int):
    self.docs = [d[:chunk_len] for d in doc_ids if len(d) >= 2]
    self.chunk_len, self.seed = chunk_len, seed
    self.num_chunks = len(self.docs)
    self._epoch, self._order = -1, None

  def chunk(self, index: int) -> np.ndarray:
    epoch, within = divmod(index, self.num_chunks)
    if epoch != self._epoch:
      self._order = np.random.default_rng([self.seed, 2, epoch]).permutation(self.num_chunks)
      self._epoch = epoch
    return self.docs[self._order[within]]


# Objectives that take one example per document (see DocumentStream), in training and held out.
DOCUMENT_ALIGNED = ("prefix_lm", "next_words", "word_fill")


def make_stream(objective: str, doc_ids: list[np.ndarray], chunk_len: int, seed: int):
  document_aligned = objective in DOCUMENT_ALIGNED
  return (DocumentStream if document_aligned else ChunkStream)(doc_ids, chunk_len, seed)


def make_streams(objective: str, doc_ids: list[np.ndarray], chunk_len: int, seed: int, mixture=None) -> dict:
  """{objective: stream} of the objectives a training run draws from (`mixture`: {objective: fraction},
  for objective "mixture"; None: DEFAULT_MIXTURE)."""
  names = tuple(mixture or DEFAULT_MIXTURE) if objective == "mixture" else (objective,)
  return {name: make_stream(name, doc_ids, chunk_len, seed) for name in names}


OBJECTIVES = ("span_corruption", "prefix_lm")
# "mixture": every batch holds several objectives (--mixture, default span corruption and prefix LM with
# --span_fraction of the rows span corruption), as UL2-style mixtures do, so that the decoder keeps
# learning to read its input while the model learns to continue plain text (span corruption alone never
# produces plain text; prefix LM alone lets a small decoder get by as an unconditional LM).
# "next_words": a prefix LM whose target is only the next NEXT_WORDS_TOKENS tokens after the cut, so that
# every target token depends on reading where the input stops (pretrain_objectives.next_words).
# "word_fill": a one-sentinel cloze of 1-3 whole words of a document, the target the words alone
# (pretrain_objectives.word_fill).
SINGLE_OBJECTIVES = OBJECTIVES + ("next_words", "word_fill")
TRAIN_OBJECTIVES = SINGLE_OBJECTIVES + ("mixture",)
HELDOUT_OBJECTIVES = OBJECTIVES + ("word_fill",)  # evaluated in every run, whatever it trains
DEFAULT_MIXTURE = {"span_corruption": 0.5, "prefix_lm": 0.5}


def parse_mixture(text: str, span_fraction: float = 0.5) -> dict:
  """--mixture "prefix_lm=0.5,word_fill=0.5" -> {objective: fraction}; "" -> span corruption and prefix
  LM, span_fraction of the rows span corruption (the flag's older form). Fractions must sum to 1."""
  if not text:
    return {"span_corruption": span_fraction, "prefix_lm": 1.0 - span_fraction}
  fractions = {}
  for part in text.split(","):
    name, _, value = part.partition("=")
    name = name.strip()
    if name not in SINGLE_OBJECTIVES or name in fractions:
      raise ValueError(f"--mixture: {name!r} is not one objective of {SINGLE_OBJECTIVES} (or is repeated)")
    try:
      fractions[name] = float(value)
    except ValueError:
      raise ValueError(f"--mixture: {part!r} needs a fraction, as in prefix_lm=0.5") from None
  if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-6:
    raise ValueError(f"--mixture: fractions {fractions} must be >= 0 and sum to 1")
  return fractions


PREFIX_LM_MAX_TARGET = 24  # target tokens of a prefix-LM example at most (the gym's labels: 1-7 tokens)
NEXT_WORDS_TOKENS = 4
WORD_FILL_TARGET = 12  # target tokens of a word_fill example at most (EOS excluded)


def objective_batch(
  objective: str,
  chunks: list[np.ndarray],
  rng: np.random.Generator,
  sentinel_start: int,
  chunk_len: int,
  word_start: np.ndarray | None = None,
) -> dict:
  """A padded batch of (input, target) pairs of `objective` made from raw chunks of chunk_len tokens
  (`word_start`: pretrain_objectives.word_starts of the vocabulary, for word_fill)."""
  if objective == "span_corruption":
    lengths = pretrain_objectives.corrupted_lengths(chunk_len)
    pairs = [pretrain_objectives.span_corrupt(c, rng, sentinel_start) for c in chunks]
  elif objective == "prefix_lm":
    lengths = pretrain_objectives.prefix_lm_lengths(chunk_len, PREFIX_LM_MAX_TARGET)
    pairs = [pretrain_objectives.prefix_lm(c, rng, max_target_tokens=PREFIX_LM_MAX_TARGET) for c in chunks]
  elif objective == "next_words":
    lengths = (chunk_len, NEXT_WORDS_TOKENS + 1)
    pairs = [pretrain_objectives.next_words(c, rng, num_tokens=NEXT_WORDS_TOKENS) for c in chunks]
  elif objective == "word_fill":
    if word_start is None:
      raise ValueError("word_fill needs word_start (pretrain_objectives.word_starts of the vocabulary)")
    lengths = (chunk_len + 1, WORD_FILL_TARGET + 1)
    pairs = [
      pretrain_objectives.word_fill(c, word_start, rng, sentinel_start, max_target_tokens=WORD_FILL_TARGET)
      for c in chunks
    ]
  else:
    raise ValueError(f"unknown objective {objective!r}; expected one of {TRAIN_OBJECTIVES}")
  return pretrain_objectives.pad_batch(pairs, *lengths)


def train_batch(
  stream: ChunkStream,
  step: int,
  batch_size: int,
  sentinel_start: int,
  objective: str = "span_corruption",
  word_start: np.ndarray | None = None,
) -> dict:
  chunks = [stream.chunk(step * batch_size + i) for i in range(batch_size)]
  rng = np.random.default_rng([stream.seed, 1_000_003, step])
  return objective_batch(objective, chunks, rng, sentinel_start, stream.chunk_len, word_start)


def mixed_batch(
  streams: dict,
  step: int,
  batch_size: int,
  sentinel_start: int,
  fractions: dict,
  word_start: np.ndarray | None = None,
) -> dict:
  """One batch of several objectives ({objective: fraction}, in that order): consecutive blocks of rows,
  each round(cumulative fraction * batch_size) rows long, padded to common lengths (each stream advances
  by its own rows per step)."""
  edges = np.round(np.cumsum([0.0, *fractions.values()]) * batch_size).astype(int)
  parts = [(name, int(n)) for name, n in zip(fractions, np.diff(edges)) if n]
  batches = [train_batch(streams[name], step, n, sentinel_start, name, word_start) for name, n in parts]
  input_len = max(b["input_ids"].shape[1] for b in batches)
  target_len = max(b["target_ids"].shape[1] for b in batches)

  def pad_to(x, width):
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))

  return {
    key: np.concatenate(
      [pad_to(b[key], input_len if key.startswith("input") else target_len) for b in batches]
    )
    for key in batches[0]
  }


def step_batch(streams: dict, step: int, args, sentinel_start: int, word_start=None) -> dict:
  """The training batch of `step` for the run's objective (a pure function of seed and step)."""
  if args.objective == "mixture":
    fractions = parse_mixture(getattr(args, "mixture", ""), args.span_fraction)
    return mixed_batch(streams, step, args.batch_size, sentinel_start, fractions, word_start)
  return train_batch(
    streams[args.objective], step, args.batch_size, sentinel_start, args.objective, word_start
  )


def heldout_batches(
  doc_ids: list[np.ndarray],
  chunk_len: int,
  batch_size: int,
  num_batches: int,
  sentinel_start: int,
  seed: int,
  objective: str = "span_corruption",
  word_start: np.ndarray | None = None,
) -> list[dict]:
  """Fixed batches of held-out text (same noise and cuts every evaluation)."""
  if objective in DOCUMENT_ALIGNED:  # one example per document, as in training
    chunks = [d[:chunk_len] for d in doc_ids if len(d) >= 2][: batch_size * num_batches]
  else:
    stream = np.concatenate(doc_ids)
    n = min(len(stream) // chunk_len, batch_size * num_batches)
    chunks = list(stream[: n * chunk_len].reshape(n, chunk_len))
  n = len(chunks)
  rng = np.random.default_rng([seed, 7])
  return [
    objective_batch(objective, chunks[i : i + batch_size], rng, sentinel_start, chunk_len, word_start)
    for i in range(0, n - batch_size + 1, batch_size)
  ]


# ----------------------------------------------------------------------------------------------------
# Model, loss and step


def make_config(args, vocab_size: int):
  from mpt_jax.model.t5 import T5Config

  return T5Config(
    vocab_size=vocab_size,
    d_model=args.d_model,
    d_kv=args.d_model // args.num_heads,
    d_ff=args.d_ff,
    num_layers=args.num_layers,
    num_decoder_layers=args.num_decoder_layers or args.num_layers,
    num_heads=args.num_heads,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    dropout_rate=0.0,
    layer_norm_epsilon=1e-6,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    scale_decoder_outputs=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
    dtype=args.compute_dtype,
    remat=False,
  )


def make_optimizer(args):
  """AdamW with clipping; the learning rate warms up and decays by cosine over [phase_start, steps], so
  that a new phase of a resumed run (e.g. the LM adaptation) gets its own schedule."""
  phase = optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=args.lr,
    warmup_steps=args.warmup_steps,
    decay_steps=args.steps - args.phase_start,
    end_value=args.lr * 0.1,
  )

  def schedule(count):
    return phase(jnp.maximum(count - args.phase_start, 0))

  return optax.chain(
    optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=args.weight_decay)
  )


def make_steps(model, optimizer):
  from mpt_jax.model.loss import weights_loss  # seq2seq_loss without its stop_gradient on the params

  def loss_fn(params, batch):
    return weights_loss(model, params, batch)

  @jax.jit
  def eval_loss(params, batch):
    # Token-weighted, so that the held-out mean is over tokens, like the training loss.
    return loss_fn(params, batch) * batch["target_mask"].sum(), batch["target_mask"].sum()

  def train_step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.global_norm(grads)

  return jax.jit(train_step, donate_argnums=(0, 1)), eval_loss


def heldout_loss(eval_loss, params, batches, shuffle_inputs: bool = False) -> float:
  """Mean held-out token loss. shuffle_inputs: pair each target with another example's input; the gap
  to the true loss says how much the model reads its input (a decoder that ignores the encoder, the
  first plateau of seq2seq training, has no gap, and a prompt could not steer it)."""
  total, count = 0.0, 0.0
  for batch in batches:
    if shuffle_inputs:
      batch = dict(
        batch,
        input_ids=np.roll(batch["input_ids"], 1, axis=0),
        input_mask=np.roll(batch["input_mask"], 1, axis=0),
      )
    s, n = eval_loss(params, batch)
    total, count = total + float(s), count + float(n)
  return total / count


def greedy_decode(model, params, input_ids: np.ndarray, max_len: int, eos_id: int = 1) -> list[list[int]]:
  """Plain greedy decoding by re-running the decoder on the growing prefix (short outputs only)."""
  apply = jax.jit(lambda p, i, m, d: model.apply({"params": p}, i, m, d))
  batch = input_ids.shape[0]
  decoder = np.zeros((batch, max_len + 1), np.int32)  # position 0: decoder start (pad) token
  input_mask = (input_ids != 0).astype(np.int32)
  for t in range(max_len):
    logits = apply(params, input_ids, input_mask, decoder[:, :max_len])
    decoder[:, t + 1] = np.asarray(jnp.argmax(logits[:, t], axis=-1))
  outputs = []
  for row in decoder[:, 1:]:
    row = list(row)
    outputs.append(row[: row.index(eos_id)] if eos_id in row else row)
  return outputs


# ----------------------------------------------------------------------------------------------------
# Checkpoints (the training state; the HF-layout model is written at the end)


def save_state(path: Path, step: int, params, opt_state, log: dict) -> None:
  tmp = path.with_suffix(".tmp")
  with open(tmp, "wb") as f:
    pickle.dump(
      {"step": step, "params": jax.device_get(params), "opt_state": jax.device_get(opt_state), "log": log}, f
    )
  os.replace(tmp, path)


def load_state(path: Path):
  with open(path, "rb") as f:
    return pickle.load(f)


def save_hf(out_dir: Path, config, params, tokenizer, dtype: str = "float32") -> None:
  """config.json + model.safetensors (weights in `dtype`) + spiece.model, loadable by load_pretrained."""
  from mpt_jax.model.hf import save_checkpoint

  save_checkpoint(
    out_dir, dataclasses.replace(config, dtype="float32"), jax.device_get(params), tokenizer, dtype=dtype
  )


def training_phases(log: dict) -> list[dict]:
  """[{step, objective}] where the objective changed, from the run's arguments and its resumes
  (runs from before --objective existed were span corruption)."""
  phases = []
  for step, args in [(0, log["args"])] + [(r["step"], r["args"]) for r in log.get("resumes", [])]:
    objective = args.get("objective", "span_corruption")
    if not phases or phases[-1]["objective"] != objective:
      phases.append({"step": step, "objective": objective})
  return phases


def plot_log(log_path: Path, png_path: Path) -> None:
  """The train and held-out loss curves of a pretrain_log.json, as a PNG."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  log = json.loads(Path(log_path).read_text())
  fig, ax = plt.subplots(figsize=(10, 4), dpi=120)
  curves = (
    ("train", "-", "C0", "train (objective of the phase)"),
    ("heldout", "o-", "C1", "held-out span corruption"),
    ("heldout_shuffled_inputs", "x--", "C1", "  same, another example's input"),
    ("heldout_prefix_lm", "o-", "C2", "held-out prefix LM"),
    ("heldout_prefix_lm_shuffled_inputs", "x--", "C2", "  same, another example's input"),
    ("heldout_word_fill", "o-", "C3", "held-out word fill"),
    ("heldout_word_fill_shuffled_inputs", "x--", "C3", "  same, another example's input"),
  )
  for name, style, color, label in curves:
    if log.get(name):
      steps, losses = zip(*log[name])
      ax.plot(steps, losses, style, color=color, markersize=3, label=label)
  for phase in training_phases(log)[1:]:
    ax.axvline(phase["step"], color="C2", linewidth=1.2)
    ax.annotate(
      f" from here: {phase['objective']}",
      (phase["step"], 0.88),
      xycoords=("data", "axes fraction"),
      fontsize=8,
      color="C2",
    )
  config_path = Path(log_path).parent / "config.json"
  vocab = log.get("vocab_size")
  if not vocab and config_path.is_file():
    vocab = json.loads(config_path.read_text())["vocab_size"]
  if vocab:
    ax.axhline(math.log(vocab), color="gray", linestyle=":", label=f"uniform guess, ln {vocab}")
  args = log["args"]
  ax.set_xlabel(f"step (from step 0: batch of {args['batch_size']} chunks x {args['chunk_len']} tokens)")
  for resume in log.get("resumes", []):  # a resume may change the batch shape or the schedule
    r = resume["args"]
    ax.axvline(resume["step"], color="gray", linewidth=0.8)
    ax.annotate(
      f" {r['batch_size']}x{r['chunk_len']}",
      (resume["step"], 0.98),
      xycoords=("data", "axes fraction"),
      va="top",
      fontsize=7,
      color="gray",
    )
  ax.set_ylabel("loss (nats/target token)")
  ax.set_title(f"small T5 ({log['num_params'] / 1e6:.1f}M params) on WordNet text")
  ax.grid(alpha=0.3)
  ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), fontsize=8)
  fig.tight_layout()
  fig.savefig(png_path)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--wordnet_dir", default=None)
  p.add_argument("--out_dir", default="runs/small_t5_smoke/model")
  p.add_argument("--work_dir", default="runs/small_t5_smoke/work")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument(
    "--categories",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="head noun and verb documents with their lexicographer category (tried for the 2026-11-29 "
    "candidate models; the shipped model was trained without)",
  )
  p.add_argument(
    "--init_from",
    default="",
    help="start from this saved model (HF layout: its shape, weights and vocabulary) with a fresh "
    "optimizer, instead of a random initialization (a new phase for a model whose training state is gone)",
  )
  p.add_argument("--vocab_size", type=int, default=8000, help="SentencePiece pieces (+100 sentinels)")
  p.add_argument("--d_model", type=int, default=128)
  p.add_argument("--d_ff", type=int, default=512)
  p.add_argument("--num_heads", type=int, default=4)
  p.add_argument(
    "--num_layers",
    type=int,
    default=4,
    help="encoder layers (and decoder layers unless --num_decoder_layers is given)",
  )
  p.add_argument(
    "--num_decoder_layers", type=int, default=0, help="decoder layers; 0: as many as --num_layers"
  )
  p.add_argument(
    "--objective",
    choices=TRAIN_OBJECTIVES,
    default="span_corruption",
    help="span_corruption (T5's pretraining), then prefix_lm (the LM adaptation of the "
    "t5-*-lm-adapt checkpoints) in a resumed second phase; mixture: both in every batch",
  )
  p.add_argument(
    "--span_fraction",
    type=float,
    default=0.5,
    help="mixture without --mixture: the fraction of each batch that is span corruption",
  )
  p.add_argument(
    "--mixture",
    default="",
    help='objective "mixture": the fraction of each batch per objective, e.g. '
    '"prefix_lm=0.5,word_fill=0.5" (default: span_corruption and prefix_lm by --span_fraction)',
  )
  p.add_argument(
    "--compute_dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="matmul dtype (bfloat16 on a GPU/TPU; params and optimizer stay float32)",
  )
  p.add_argument(
    "--save_dtype",
    choices=("float32", "bfloat16"),
    default="float32",
    help="dtype of the saved model.safetensors",
  )
  p.add_argument(
    "--export_every",
    type=int,
    default=0,
    help="also write the model in the HF layout to work_dir/export every this many steps "
    "(to diagnose it while training goes on); 0: never",
  )
  p.add_argument(
    "--phase_start",
    type=int,
    default=0,
    help="the step where this phase's learning-rate schedule (warm-up, cosine) starts",
  )
  p.add_argument("--chunk_len", type=int, default=128, help="raw tokens per training example")
  p.add_argument("--batch_size", type=int, default=32)
  p.add_argument("--steps", type=int, default=3000)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--warmup_steps", type=int, default=200)
  p.add_argument("--weight_decay", type=float, default=0.01)
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument("--ckpt_every", type=int, default=200)
  p.add_argument("--heldout_batches", type=int, default=4)
  p.add_argument(
    "--heldout_chunk_len",
    type=int,
    default=128,
    help="chunk length of the held-out batches (fixed, whatever the training batches)",
  )
  p.add_argument(
    "--time_budget_min",
    type=float,
    default=58,
    help="stop early (and save) when this many minutes have passed; 0: no limit",
  )
  p.add_argument("--smoke", action="store_true", help="tiny model and few steps: checks the pipeline")
  p.add_argument(
    "--plot",
    default=None,
    help="where the loss-curve PNG goes (default: out_dir/pretrain_loss.png; the shipped model's curve in "
    "experiments/README.md is --plot=experiments/small_t5_pretrain_loss.png)",
  )
  p.add_argument("--plot_only", action="store_true", help="only redraw --plot from out_dir's log")
  if p.parse_known_args(argv)[0].smoke:  # the smoke run's defaults; flags given explicitly still win
    p.set_defaults(
      vocab_size=2000,
      d_model=32,
      d_ff=64,
      num_layers=1,
      steps=30,
      batch_size=8,
      eval_every=10,
      ckpt_every=20,
      warmup_steps=5,
      heldout_batches=1,
    )
  args = p.parse_args(argv)
  if args.objective == "mixture":
    try:
      parse_mixture(args.mixture, args.span_fraction)
    except ValueError as e:  # refused before the corpus is built
      p.error(str(e))
  if args.steps - args.phase_start <= args.warmup_steps:
    p.error(
      f"--steps={args.steps} leaves no room for the schedule: it must exceed --phase_start "
      f"({args.phase_start}) + --warmup_steps ({args.warmup_steps}); raise --steps or lower --warmup_steps"
    )
  if args.plot is None:  # never overwrite another run's curve by default
    args.plot = str(Path(args.out_dir) / "pretrain_loss.png")
  return args


def main(argv=None) -> None:
  host_memory.reuse_freed_memory()  # before JAX runs anything (mpt_jax/host_memory.py)
  args = parse_args(argv)
  t_start = time.time()
  out_dir, work_dir = Path(args.out_dir), Path(args.work_dir)
  if args.plot_only:
    plot_log(out_dir / "pretrain_log.json", Path(args.plot))
    return
  work_dir.mkdir(parents=True, exist_ok=True)
  print(f"args: {vars(args)}", flush=True)

  # -- corpus and vocabulary
  train_docs, heldout_docs = build_corpus(args.wordnet_dir, args.categories)
  print(
    f"corpus: {len(train_docs)} train / {len(heldout_docs)} held-out documents, "
    f"{sum(len(d.split()) for d in train_docs)} train words",
    flush=True,
  )
  tok_dir = work_dir / "tokenizer"
  tok_stamp = tok_dir / "trained_with.json"  # reuse a trained vocabulary only for the same settings
  corpus_hash = hashlib.sha256("\n".join(train_docs).encode("utf-8")).hexdigest()[:16]
  tok_settings = json.dumps(
    {"vocab_size": args.vocab_size, "documents": len(train_docs), "corpus_sha256": corpus_hash}
  )
  if args.init_from:  # continue a saved model: its vocabulary, whatever the corpus settings
    tok_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(args.init_from) / tokenizer_lib.SPIECE, tok_dir / tokenizer_lib.SPIECE)
  elif not tok_stamp.is_file() or tok_stamp.read_text() != tok_settings:
    tokenizer_lib.train_sentencepiece(train_docs, tok_dir, args.vocab_size)
    tok_stamp.write_text(tok_settings)
  tokenizer = tokenizer_lib.load_tokenizer(tok_dir)
  import sentencepiece as spm

  sp = spm.SentencePieceProcessor(model_file=str(tok_dir / tokenizer_lib.SPIECE))
  # The T5 tokenizer's ids are the SentencePiece ids, sentinels on top (<extra_id_0> = the last id):
  # encode the corpus with the fast processor, after checking both agree.
  sentinel_start = tokenizer.convert_tokens_to_ids("<extra_id_0>")
  assert sentinel_start == len(tokenizer) - 1 == sp.get_piece_size() + 99, (sentinel_start, len(tokenizer))
  for doc in train_docs[:50]:
    assert tokenizer(doc)["input_ids"][:-1] == sp.encode(doc), doc
  train_ids = [np.asarray(x, np.int32) for x in sp.encode(train_docs)]
  heldout_ids = [np.asarray(x, np.int32) for x in sp.encode(heldout_docs)]
  word_start = pretrain_objectives.word_starts([sp.id_to_piece(i) for i in range(sp.get_piece_size())])
  mixture = parse_mixture(args.mixture, args.span_fraction) if args.objective == "mixture" else None
  streams = make_streams(args.objective, train_ids, args.chunk_len, args.seed, mixture)
  examples = ", ".join(f"{s.num_chunks} {name} examples" for name, s in streams.items())
  print(
    f"tokens: {sum(map(len, train_ids))} train ({examples} of <= {args.chunk_len}), "
    f"{sum(map(len, heldout_ids))} held-out; vocab {len(tokenizer)}",
    flush=True,
  )
  # Fixed whatever the training batch shape, so that curves stay comparable across resumes.
  heldout = {
    objective: heldout_batches(
      heldout_ids,
      args.heldout_chunk_len,
      HELDOUT_BATCH_SIZE,
      args.heldout_batches,
      sentinel_start,
      args.seed,
      objective,
      word_start,
    )
    for objective in HELDOUT_OBJECTIVES
  }

  # -- model and optimizer
  from mpt_jax.model.t5 import T5

  if args.init_from:  # the saved model's shape and weights; a fresh optimizer (the new phase's schedule)
    from mpt_jax.model.hf import load_pretrained

    loaded, params, _ = load_pretrained(args.init_from)
    config = dataclasses.replace(loaded.config, dtype=args.compute_dtype, dropout_rate=0.0)
    model = T5(config)
  else:
    config = make_config(args, vocab_size=int(math.ceil(len(tokenizer) / 64) * 64))
    model = T5(config)
    example = step_batch(
      streams, 0, argparse.Namespace(**{**vars(args), "batch_size": 2}), sentinel_start, word_start
    )
    init_rng, head_rng = jax.random.split(jax.random.PRNGKey(args.seed))
    params = model.init(init_rng, example["input_ids"], example["input_mask"], example["target_ids"])[
      "params"
    ]
    # HF initializes the untied head with std 1.0, which makes the first logits ~sqrt(d_model) large;
    # t5x uses fan-in scaling (std d_model**-0.5) for the untied head: start from uniform-ish predictions.
    head = params["lm_head"]["kernel"]
    params["lm_head"]["kernel"] = jax.random.normal(head_rng, head.shape, head.dtype) * args.d_model**-0.5
  num_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"model: {config}\nparameters: {num_params} ({num_params * 4 / 2**20:.1f} MiB float32)", flush=True)
  optimizer = make_optimizer(args)
  opt_state = optimizer.init(params)
  train_step, eval_loss = make_steps(model, optimizer)

  log = {
    "args": vars(args),
    "num_params": int(num_params),
    "vocab_size": config.vocab_size,
    "train": [],
    "heldout": [],
    "heldout_shuffled_inputs": [],
  }
  if args.phase_start and not (ckpt := work_dir / "state.pkl").is_file():
    raise SystemExit(f"--phase_start={args.phase_start} continues a run, but {ckpt} does not exist")
  state_path = work_dir / "state.pkl"
  start_step = 0
  if state_path.is_file():
    state = load_state(state_path)
    start_step, params, opt_state, log = state["step"], state["params"], state["opt_state"], state["log"]
    # A resume may change the arguments (e.g. --steps once the throughput is known): keep the record.
    log.setdefault("resumes", []).append({"step": start_step, "args": vars(args)})
    print(f"resumed from {state_path} at step {start_step}", flush=True)
  wall_before = log.get("wall_s", 0.0)  # wall time of earlier (killed) processes of this run
  if args.phase_start > start_step:
    raise SystemExit(f"--phase_start={args.phase_start} is after the checkpoint's step {start_step}")

  def evaluate(step: int) -> str:
    """Held-out losses of both objectives (own and another example's input) into the log."""
    for objective, batches in heldout.items():
      suffix = "" if objective == "span_corruption" else f"_{objective}"  # older logs: span only
      for key, shuffle in ((f"heldout{suffix}", False), (f"heldout{suffix}_shuffled_inputs", True)):
        log.setdefault(key, []).append([step, heldout_loss(eval_loss, params, batches, shuffle)])
    return "; ".join(
      f"held-out {o} {log[k][-1][1]:.4f} (other input {log[k + '_shuffled_inputs'][-1][1]:.4f})"
      for o, k in (
        ("span corruption", "heldout"),
        ("prefix LM", "heldout_prefix_lm"),
        ("word fill", "heldout_word_fill"),
      )
    )

  if start_step == 0:
    print(f"step 0 {evaluate(0)}", flush=True)

  # -- train
  t_train, window = time.time(), []
  step = start_step
  for step in range(start_step, args.steps):
    batch = step_batch(streams, step, args, sentinel_start, word_start)
    params, opt_state, loss, grad_norm = train_step(params, opt_state, batch)
    window.append(float(loss))
    if not np.isfinite(window[-1]):
      raise FloatingPointError(f"loss is {window[-1]} at step {step}")
    done = step + 1
    if done % args.eval_every == 0 or done == args.steps:
      log["train"].append([done, float(np.mean(window))])
      rate = (done - start_step) / (time.time() - t_train)
      print(
        f"step {done}/{args.steps} train loss ({args.objective}) {np.mean(window):.4f}; "
        f"{evaluate(done)}; grad norm {float(grad_norm):.3f} ({rate:.2f} steps/s, "
        f"eta {(args.steps - done) / rate / 60:.1f} min)",
        flush=True,
      )
      window = []
    out_of_time = args.time_budget_min and time.time() - t_start > args.time_budget_min * 60
    if done % args.ckpt_every == 0 or done == args.steps or out_of_time:
      log["wall_s"] = wall_before + time.time() - t_start
      log["steps_done"] = done
      save_state(state_path, done, params, opt_state, log)
    if args.export_every and (done % args.export_every == 0 or done == args.steps):
      save_hf(work_dir / "export", config, params, tok_dir, args.save_dtype)
      (work_dir / "export" / "step.txt").write_text(f"{done}\n")
    if out_of_time:
      print(f"time budget of {args.time_budget_min} min reached at step {done}: stopping", flush=True)
      log["stopped_by_time_budget"] = True
      break

  # -- save the model in the HF layout, with the log, held-out text and the WordNet license
  save_hf(out_dir, config, params, tok_dir, args.save_dtype)
  (out_dir / HELDOUT_FILE).write_text("\n".join(heldout_docs[:64]) + "\n")
  (out_dir / "WORDNET_LICENSE.txt").write_text(wn.WORDNET_LICENSE)

  # -- samples
  samples = {"span_corruption": [], "greedy": [], "prefix_lm": []}
  sample_batch = heldout["span_corruption"][0]
  outputs = greedy_decode(model, params, sample_batch["input_ids"][:6], sample_batch["target_ids"].shape[1])
  print("\nspan-corruption completions of held-out text (input / gold / model):")
  for row, out in enumerate(outputs):
    n_in = int(sample_batch["input_mask"][row].sum())
    n_out = int(sample_batch["target_mask"][row].sum())
    item = {
      "input": tokenizer.decode(sample_batch["input_ids"][row, :n_in]),
      "gold": tokenizer.decode(sample_batch["target_ids"][row, :n_out]),
      "model": tokenizer.decode(out),
    }
    samples["span_corruption"].append(item)
    print(json.dumps(item, indent=1))
  prompts = []
  for doc in heldout_docs[:8]:  # mask the end of each held-out document's first sentence
    first = doc.split(". ")[0].rstrip(".")
    words = first.split()
    cut = max(2, len(words) * 2 // 3)
    prompts.append((" ".join(words[:cut]) + " <extra_id_0>.", " ".join(words[cut:])))
  enc = tokenizer([p for p, _ in prompts], padding=True, return_tensors="np")
  outputs = greedy_decode(model, params, enc["input_ids"].astype(np.int32), 16)
  print("\ngreedy completions of held-out sentences (prompt / gold / model):")
  for (prompt, gold), out in zip(prompts, outputs):
    item = {"prompt": prompt, "gold": gold, "model": tokenizer.decode(out)}
    samples["greedy"].append(item)
    print(json.dumps(item))
  # LM adaptation: plain continuations (no sentinel) of the start of held-out documents.
  starts = [" ".join(doc.split()[:6]) for doc in heldout_docs[8:16]]
  enc = tokenizer(starts, padding=True, return_tensors="np")
  outputs = greedy_decode(model, params, enc["input_ids"].astype(np.int32), 20)
  print("\ngreedy continuations of held-out document starts (input / gold / model):")
  for start, doc, out in zip(starts, heldout_docs[8:16], outputs):
    item = {"input": start, "gold": doc[len(start) :].strip()[:100], "model": tokenizer.decode(out)}
    samples["prefix_lm"].append(item)
    print(json.dumps(item))
  log["samples"] = samples
  log["wall_s"] = wall_before + time.time() - t_start  # corpus, vocabulary, training and samples
  (out_dir / "pretrain_log.json").write_text(json.dumps(log, indent=1) + "\n")
  plot_log(out_dir / "pretrain_log.json", Path(args.plot))
  print(f"\nsaved {out_dir}; wall time {time.time() - t_start:.0f} s", flush=True)


if __name__ == "__main__":
  main()
