"""Soft prompts: initializers and export/import.

Initializers follow google-research/prompt-tuning (`prompts.py`): each builder returns a small function
`init(rng, shape) -> float32 [P, d_model]`, so configs pick one by name and every method (PT, MTL,
MAML, FoMAML, Reptile) starts from the same kind of prompt.

- `task_names`: the reference study's init. Row i is the mean token embedding of the i-th task name
  ("_" and "-" read as spaces; tokens without EOS); the remaining rows are embeddings of token ids
  sampled from the most frequent vocabulary ids. With more names than rows, the first names fill it.
- `sampled_vocab`: every row from that frequent-vocabulary sample.
- `uniform`: U[-scale, scale] (prompt-tuning's random-uniform init uses 0.5).
- `label_words`: the first rows are the mean embeddings of the class label words (e.g. "positive",
  "negative"), the rest from the frequent-vocabulary sample.
- `token`: every row is the embedding of one vocabulary token (EOS by default): a prompt that adds no
  words to the input, so it starts near the frozen model without a prompt (experiments/README.md,
  "A prompt that starts near no prompt").

"The 5000 most frequent ids": the study counted them on C4. Without those counts we use that
SentencePiece (unigram) vocabularies are ordered by piece score, which tracks frequency: the frequent
ids are the first `num_candidates` ids after the special tokens (pad 0, eos 1, unk 2), excluding the
`<extra_id_*>` sentinels at the top of the vocabulary.

`save_prompt` / `load_prompt` store a prompt as `.npy` plus a `.json` sidecar (model, d_model, length,
placement, ... whatever `meta` holds), and check it fits the model on the way back.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax import paths

Initializer = Callable[[jax.Array, tuple[int, int]], jax.Array]

INITS = ("task_names", "vocab", "uniform", "label_words", "token")  # config.prompt.init
DEFAULT_INIT_TOKEN = "</s>"  # config.prompt.init_token's default: the EOS piece of T5's vocabulary
NUM_SPECIAL_TOKENS = 3  # T5: pad 0, eos 1, unk 2
FREQUENT_VOCAB = 5000


def token_embedding(frozen_params, model=None) -> jax.Array:
  """The token embedding [V, d_model] (float32) of a frozen params tree: the model's
  (`token_embedding` of the model protocol, mpt_jax/model/protocol.py), T5's without one."""
  if model is not None:
    return model.token_embedding(frozen_params)
  from mpt_jax.model import t5  # deferred: config.py imports this module and needs no flax

  return t5.token_embedding(frozen_params)


def frequent_id_range(
  tokenizer=None, num_candidates: int = FREQUENT_VOCAB, vocab_size: int | None = None
) -> tuple[int, int]:
  """[first, end) of the ids treated as the most frequent: after the special tokens, before the
  sentinels (end is capped by the SentencePiece vocabulary size or `vocab_size`)."""
  limit = vocab_size
  if tokenizer is not None:
    sentinels = [i for token, i in tokenizer.get_vocab().items() if token.startswith("<extra_id_")]
    pieces = min(sentinels) if sentinels else len(tokenizer)
    limit = pieces if limit is None else min(limit, pieces)
  if limit is None:
    raise ValueError("frequent_id_range needs a tokenizer or vocab_size")
  end = min(NUM_SPECIAL_TOKENS + num_candidates, limit)
  if end <= NUM_SPECIAL_TOKENS:
    raise ValueError(f"no ordinary token ids to sample below {limit}")
  return NUM_SPECIAL_TOKENS, end


def uniform(scale: float = 0.5) -> Initializer:
  def init(rng, shape):
    return jax.random.uniform(rng, shape, jnp.float32, -scale, scale)

  return init


def _sample_rows(rng, embedding, num_rows: int, id_range: tuple[int, int]):
  first, end = id_range
  candidates = end - first
  ids = first + jax.random.choice(rng, candidates, (num_rows,), replace=num_rows > candidates)
  return embedding[ids]


def sampled_vocab(embedding, *, tokenizer=None, num_candidates: int = FREQUENT_VOCAB) -> Initializer:
  """Rows = embeddings of ids sampled (without replacement while possible) from the frequent ids."""
  embedding = jnp.asarray(embedding, jnp.float32)
  id_range = frequent_id_range(tokenizer, num_candidates, vocab_size=embedding.shape[0])

  def init(rng, shape):
    _check_shape(shape, embedding)
    return _sample_rows(rng, embedding, shape[0], id_range)

  return init


def mean_token_embedding(embedding, tokenizer, text: str) -> jax.Array:
  """Mean embedding of the tokens of `text` (no EOS)."""
  ids = tokenizer(text, add_special_tokens=False).input_ids
  if not ids:
    raise ValueError(f"{text!r} tokenizes to nothing; cannot initialize a prompt row from it")
  return jnp.mean(jnp.asarray(embedding, jnp.float32)[jnp.asarray(ids)], axis=0)


def _rows_then_vocab(
  embedding, tokenizer, texts: Sequence[str], num_candidates: int, what: str, keep_first: bool = False
) -> Initializer:
  """keep_first: more texts than rows fill the prompt with the first ones (else: an error)."""
  embedding = jnp.asarray(embedding, jnp.float32)
  head = jnp.stack([mean_token_embedding(embedding, tokenizer, t) for t in texts]) if texts else None
  id_range = frequent_id_range(tokenizer, num_candidates, vocab_size=embedding.shape[0])

  def init(rng, shape):
    _check_shape(shape, embedding)
    rows = head
    if rows is not None and rows.shape[0] > shape[0]:
      if not keep_first:
        raise ValueError(f"{rows.shape[0]} {what} do not fit a prompt of {shape[0]} rows")
      rows = rows[: shape[0]]
    num_head = 0 if rows is None else rows.shape[0]
    rest = _sample_rows(rng, embedding, shape[0] - num_head, id_range)
    return rest if rows is None else jnp.concatenate([rows, rest], axis=0)

  return init


def task_names(
  embedding, tokenizer, names: Sequence[str], *, num_candidates: int = FREQUENT_VOCAB
) -> Initializer:
  """The reference study's init: row i = mean embedding of names[i] ("_", "-" as spaces), then
  frequent-vocabulary samples. PT passes the target task's own name; upstream methods the source
  tasks' names. More names than rows (the `random` setting: 114 names, 100 rows): the first names fill
  the prompt, as the reference's `getpromptembedding` did."""
  texts = [name.replace("_", " ").replace("-", " ") for name in names]
  return _rows_then_vocab(embedding, tokenizer, texts, num_candidates, "task names", keep_first=True)


def label_words(
  embedding, tokenizer, words: Sequence[str], *, num_candidates: int = FREQUENT_VOCAB
) -> Initializer:
  """Rows = mean embeddings of the class label words, then frequent-vocabulary samples."""
  return _rows_then_vocab(embedding, tokenizer, list(words), num_candidates, "label words")


def vocabulary_id(tokenizer, token: str) -> int:
  """The id of `token`, one piece of the tokenizer's vocabulary (config.prompt.init_token)."""
  token_id = tokenizer.get_vocab().get(token)
  if token_id is None:
    raise ValueError(
      f"prompt.init_token={token!r} is not a piece of the tokenizer's vocabulary; give one piece, "
      f"e.g. {DEFAULT_INIT_TOKEN!r} (EOS) or a word piece such as '\u2581the'"
    )
  return token_id


def repeated_token(embedding, tokenizer, token: str = DEFAULT_INIT_TOKEN) -> Initializer:
  """Every row = the embedding of `token`, one piece of the tokenizer's vocabulary (e.g. "</s>")."""
  embedding = jnp.asarray(embedding, jnp.float32)
  token_id = vocabulary_id(tokenizer, token)
  if token_id >= embedding.shape[0]:
    raise ValueError(
      f"prompt.init_token={token!r} has id {token_id}, beyond the {embedding.shape[0]} embeddings"
    )
  row = embedding[token_id]

  def init(rng, shape):
    del rng  # every row the same: nothing is sampled
    _check_shape(shape, embedding)
    return jnp.tile(row[None], (shape[0], 1))

  return init


def initializer(
  init: str,
  embedding,
  tokenizer,
  *,
  names: Sequence[str] = (),
  words: Sequence[str] = (),
  token: str = DEFAULT_INIT_TOKEN,
  num_candidates: int = FREQUENT_VOCAB,
) -> Initializer:
  """The initializer `init` (one of INITS, config.prompt.init), given what it reads: the task `names`
  (task_names), the label `words` (label_words), the `token` (token), and how many frequent ids the
  sampled rows come from (`num_candidates`; task_names, vocab, label_words)."""
  builders = {
    "task_names": lambda: task_names(embedding, tokenizer, names, num_candidates=num_candidates),
    "vocab": lambda: sampled_vocab(embedding, tokenizer=tokenizer, num_candidates=num_candidates),
    "uniform": lambda: uniform(),
    "label_words": lambda: label_words(embedding, tokenizer, list(words), num_candidates=num_candidates),
    "token": lambda: repeated_token(embedding, tokenizer, token),
  }
  if init not in builders:
    raise ValueError(f"prompt init {init!r}: expected one of {INITS}")
  return builders[init]()


def configured_prompt(
  prompt_config, embedding, tokenizer, task_names: Sequence[str], seed: int
) -> np.ndarray:
  """The prompt of a config's `prompt` section (its init, length, label words, token and vocab_top_k):
  [length, d_model] rows of `embedding`'s space, drawn with PRNGKey(seed); task_names for "task_names"."""
  p = prompt_config
  init = initializer(
    p.init,
    embedding,
    tokenizer,
    names=task_names,
    words=p.label_words,
    token=p.init_token,
    num_candidates=p.vocab_top_k,
  )
  return np.asarray(init(jax.random.PRNGKey(seed), (p.length, embedding.shape[1])))


def _check_shape(shape, embedding):
  if len(shape) != 2 or shape[1] != embedding.shape[1]:
    raise ValueError(f"prompt shape {tuple(shape)}: expected (length, d_model={embedding.shape[1]})")


# --- export / import ---------------------------------------------------------------------------------


def _files(path: str | os.PathLike) -> tuple[str, str]:
  """(<stem>.npy, <stem>.json) of a prompt path given with either suffix or none (local or URL)."""
  path = os.fspath(path)
  stem = next((path[: -len(s)] for s in (".npy", ".json") if path.endswith(s)), path)
  return stem + ".npy", stem + ".json"


def save_prompt(path: str | os.PathLike, prompt, meta: dict | None = None) -> str:
  """Writes `<path>.npy` (float32 [P, d_model]) and `<path>.json` (meta + d_model and length), each
  atomically (a killed or failed write leaves the previous file or none, never half of one); `path`
  may be a URL (mpt_jax/paths.py)."""
  array = np.asarray(jax.device_get(prompt), np.float32)
  if array.ndim != 2:
    raise ValueError(f"a prompt is [length, d_model]; got shape {array.shape}")
  npy, sidecar = _files(path)
  meta = dict(meta or {})
  meta.update(length=int(array.shape[0]), d_model=int(array.shape[1]))
  paths.makedirs(paths.parent(npy))
  paths.write_atomic(npy, lambda f: np.save(f, array))
  paths.write_text(sidecar, json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
  return npy


def load_prompt(path: str | os.PathLike, *, d_model: int | None = None) -> tuple[np.ndarray, dict]:
  """(prompt float32 [P, d_model], meta) from `save_prompt` files; d_model: the model's, checked."""
  npy, sidecar = _files(path)
  if not paths.isfile(npy):
    raise FileNotFoundError(f"prompt file {npy} does not exist")
  try:
    prompt = np.load(io.BytesIO(paths.read_bytes(npy)), allow_pickle=False)
    meta = json.loads(paths.read_text(sidecar)) if paths.isfile(sidecar) else {}
  except (ValueError, OSError, EOFError) as error:  # a truncated or foreign file
    raise ValueError(
      f"{npy}: not a readable prompt ({type(error).__name__}: {error}); a prompt is a "
      f"float [length, d_model] .npy written by mpt_jax (upstream/prompt.npy)"
    ) from None
  if prompt.ndim != 2 or not np.issubdtype(prompt.dtype, np.floating):
    raise ValueError(f"{npy}: a prompt is a float [length, d_model] array; got {prompt.dtype} {prompt.shape}")
  for key, actual in (("length", prompt.shape[0]), ("d_model", prompt.shape[1])):
    if key in meta and meta[key] != actual:
      raise ValueError(f"{npy}: array {key} {actual} disagrees with {paths.name(sidecar)} ({meta[key]})")
  if d_model is not None and prompt.shape[1] != d_model:
    raise ValueError(
      f"{npy}: prompt d_model {prompt.shape[1]} (from model {meta.get('model', '?')}) "
      f"does not match this model's d_model {d_model}; a prompt only transfers "
      f"between models of the same width."
    )
  if not np.all(np.isfinite(prompt)):
    raise ValueError(f"{npy}: the prompt has non-finite values (a diverged run's?)")
  return prompt.astype(np.float32), meta
