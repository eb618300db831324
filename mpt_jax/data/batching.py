"""Tokenized tasks, and the batches every algorithm takes (docs/CONTRACTS.md), with static shapes.

- `tokenize_split`: a CrossFit split to token ids. The model input is `" [task] " + input` (the format is
  a parameter); inputs and every gold answer end with EOS and are truncated to fixed lengths (input 512;
  output 64 upstream, 128 for MTL and downstream, as in the study) and right-padded with 0. The result is
  cached as Arrow files (the format of Hugging Face `datasets`' cache files) keyed by a hash of the texts,
  the tokenizer, the format and the lengths, so a second run does not tokenize again.
- Samplers are pure functions of (seed, step) through `np.random.default_rng`, so a resumed run sees
  exactly the batches it would have seen:
    `EpisodeSampler`  meta-learning: T meta-tasks (task, seed) per step; support [T, K, b] from train.tsv
                      (K inner steps of b examples), query [T, q] from dev.tsv; no query for Reptile.
    `EpochSampler`    PT and MTL: shuffled epochs over a pool (one split, or the union of many).
    `GridSampler`     the downstream grid: a leading run axis [R, B], each run on its own seed's train file.
  In training one gold answer is drawn at random per example; evaluation batches keep the order of the
  file, pad the last batch with a mask of the real rows, and point back to every gold (`answers`).
- Length buckets (`LengthBuckets`): splits are stored padded to the spec's maximum lengths, but each batch
  (episode, grid batch, eval batch) is cut to its longest row rounded up to a multiple (e.g. inputs to 64,
  targets to 16), so a short-input task does not pay for 512 positions while a step still compiles only
  for a few shapes. Right padding and masks make the loss independent of the cut (tests/test_prompt.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from mpt_jax import study
from mpt_jax.data.crossfit import Split, TaskData

# T5's special ids (the model protocol's pad_id, eos_id: mpt_jax/model/protocol.py). Tokenized splits are
# cached with them, so they are constants here, not threaded from the model: `check_special_ids` refuses a
# model whose ids differ (it would need them threaded through tokenization and its cache key first).
PAD_ID = 0
EOS_ID = 1
INPUT_FORMAT = " [{task}] {input}"
MAX_INPUT_LENGTH = study.MAX_INPUT_LEN
UPSTREAM_TARGET_LENGTH = study.UPSTREAM_TARGET_LEN  # meta-learning upstream
DOWNSTREAM_TARGET_LENGTH = study.DOWNSTREAM_TARGET_LEN  # MTL upstream and every downstream run
_CACHE_VERSION = 1  # bump when the cached layout or the tokenization rule changes
BATCH_KEYS = ("input_ids", "input_mask", "target_ids", "target_mask")


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """How examples become token ids: the input format and the fixed (truncation = padding) lengths."""

  max_input_len: int = MAX_INPUT_LENGTH
  max_target_len: int = DOWNSTREAM_TARGET_LENGTH
  input_template: str = INPUT_FORMAT  # fields: {task}, {input}
  input_eos: bool = True  # T5 inputs end with EOS (what the tokenizer adds by default)

  def __post_init__(self):
    if self.max_input_len < 2 or self.max_target_len < 2:
      raise ValueError(f"lengths must be at least 2 (a token and EOS): {self}")
    try:
      self.input_template.format(task="t", input="x")
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(
        f"input_template {self.input_template!r} must use only the fields {{task}} and {{input}}: {e!r}"
      ) from None


def check_special_ids(model) -> None:
  """Raises ValueError unless `model` (of the model protocol) pads with PAD_ID and ends with EOS_ID."""
  if (model.pad_id, model.eos_id) != (PAD_ID, EOS_ID):
    raise ValueError(
      f"the model's pad and eos ids are ({model.pad_id}, {model.eos_id}); the tokenized data pads with "
      f"{PAD_ID} and ends with {EOS_ID} (mpt_jax/data/batching.py PAD_ID, EOS_ID)"
    )


def bucket_length(longest: int, multiple: int, maximum: int) -> int:
  """`longest` rounded up to a multiple of `multiple`, at most `maximum` (`multiple` 0: `maximum`)."""
  if multiple <= 0:
    return maximum
  return min(maximum, max(multiple, -(-longest // multiple) * multiple))


@dataclasses.dataclass(frozen=True)
class LengthBuckets:
  """How much of the stored padding a batch keeps: its longest input (target) row rounded up to a
  multiple of `input_multiple` (`target_multiple`), never more than the stored length; 0 keeps it all.

  The lengths a run can compile for are the multiples up to the maximum: with inputs to 512 in steps
  of 64 and targets to 128 in steps of 16, at most 8 x 8 shapes, in practice the few that a setting's
  tasks reach (benchmarks/README.md measures them).
  """

  input_multiple: int = 0
  target_multiple: int = 0

  def __post_init__(self):
    if self.input_multiple < 0 or self.target_multiple < 0:
      raise ValueError(f"length bucket multiples must be >= 0 (0: no bucketing), got {self}")

  def lengths(self, batches: Sequence[Mapping[str, np.ndarray]]) -> tuple[int, int]:
    """(input, target) length that every batch of `batches` is cut to (one shape for all of them)."""
    out = []
    for key, multiple in (("input", self.input_multiple), ("target", self.target_multiple)):
      stored = batches[0][f"{key}_mask"].shape[-1]
      longest = max(int(b[f"{key}_mask"].sum(-1).max(initial=0)) for b in batches)
      out.append(bucket_length(max(longest, 1), multiple, stored))
    return out[0], out[1]

  def trim(self, *batches: Mapping[str, np.ndarray]) -> list[dict]:
    """The batches (contract arrays with any leading dims) cut to one bucket length: the columns cut
    are padding in every row (right padding: a row's length is its mask's sum)."""
    if self.input_multiple == 0 and self.target_multiple == 0:
      return [dict(b) for b in batches]
    input_length, target_length = self.lengths(batches)
    return [
      {
        key: np.ascontiguousarray(b[key][..., : input_length if key.startswith("input") else target_length])
        for key in BATCH_KEYS
      }
      for b in batches
    ]


NO_BUCKETS = LengthBuckets()


@dataclasses.dataclass(frozen=True, eq=False)  # holds arrays: compared by identity
class TokenizedSplit:
  """Token ids of one split (or of a pool of splits), padded to the spec's lengths."""

  task: str
  seed: int | None
  split: str | None
  input_ids: np.ndarray  # [N, L_in] int32, EOS-terminated, right-padded with 0
  input_lengths: np.ndarray  # [N]
  target_ids: np.ndarray  # [G, L_out]: every gold of every example, EOS-terminated
  target_lengths: np.ndarray  # [G]
  gold_offsets: np.ndarray  # [N + 1]: the golds of example i are target rows gold_offsets[i]:[i + 1]
  answers: tuple[tuple[str, ...], ...]  # the golds as text, for evaluation
  num_truncated: int = 0  # inputs cut at max_input_len (worth a log line)

  def __len__(self) -> int:
    return int(self.input_ids.shape[0])

  @property
  def num_golds(self) -> np.ndarray:
    return np.diff(self.gold_offsets)

  @property
  def lengths(self) -> tuple[int, int]:
    return int(self.input_ids.shape[1]), int(self.target_ids.shape[1])


# --- tokenization and its cache --------------------------------------------------------------------------


def tokenizer_fingerprint(tokenizer) -> str:
  """A hash that changes when the tokenizer's vocabulary or rules change (part of the cache key)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is not None:
    state = json.loads(backend.to_str())
    # Truncation and padding there are per-call state that HF sets and resets, not the vocabulary.
    state.pop("truncation", None)
    state.pop("padding", None)
    text = type(tokenizer).__name__ + json.dumps(state, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
  from datasets.fingerprint import Hasher  # pickles the object: works for any tokenizer

  return Hasher.hash(tokenizer)


def _encode(tokenizer, texts: Sequence[str], max_length: int, eos: bool) -> tuple[list[list[int]], int]:
  """Token ids without special tokens, then cut to max_length with EOS last (as HF truncation does)."""
  if not texts:
    return [], 0
  ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
  room = max_length - 1 if eos else max_length
  truncated = sum(len(x) > room for x in ids)
  return [list(x[:room]) + ([EOS_ID] if eos else []) for x in ids], truncated


def _pad(
  rows: Sequence[Sequence[int]] | None, lengths: np.ndarray, values: np.ndarray | None, width: int
) -> np.ndarray:
  """Right-pads ragged rows (given as lists, or as flat values with their lengths) to [N, width]."""
  out = np.full((len(lengths), width), PAD_ID, np.int32)
  if values is None:
    values = np.fromiter((t for row in rows for t in row), np.int32, int(lengths.sum()))
  out[np.arange(width)[None, :] < lengths[:, None]] = values
  return out


def _cache_key(
  task: str, inputs: Sequence[str], answers: Sequence[Sequence[str]], fingerprint: str, spec: TextSpec
) -> str:
  digest = hashlib.sha256()
  header = [_CACHE_VERSION, task, fingerprint, dataclasses.asdict(spec)]
  digest.update(json.dumps(header, sort_keys=True).encode("utf-8"))
  for text, golds in zip(inputs, answers):
    digest.update(json.dumps([text, list(golds)]).encode("utf-8"))
  return digest.hexdigest()[:20]


def _save_arrow(
  path: Path,
  input_rows: list[list[int]],
  target_rows: list[list[int]],
  num_golds: np.ndarray,
  num_truncated: int,
) -> None:
  """One Arrow stream file per split: the format of `datasets`' cache files (`Dataset.from_file` reads it).

  `save_to_disk`/`load_from_disk` cost ~30 ms per split here, more than tokenizing a small CrossFit
  split again; a single memory-mapped file reads in well under a millisecond.
  """
  import pyarrow as pa

  bounds = np.concatenate([[0], np.cumsum(num_golds)])
  golds = [target_rows[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
  table = pa.table(
    {
      "input_ids": pa.array(input_rows, pa.list_(pa.int32())),
      "target_ids": pa.array(golds, pa.list_(pa.list_(pa.int32()))),
    }
  )
  table = table.replace_schema_metadata(
    {"num_truncated": str(num_truncated), "cache_version": str(_CACHE_VERSION)}
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  # Written beside, then renamed: a run killed mid-write leaves no half cache entry behind.
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".arrow")
  try:
    with os.fdopen(fd, "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
      writer.write_table(table)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def _load_arrow(path: Path, spec: TextSpec) -> tuple[np.ndarray, ...] | None:
  import pyarrow as pa

  if not path.is_file():
    return None
  with pa.memory_map(str(path)) as source:
    table = pa.ipc.open_stream(source).read_all()
  inputs = table.column("input_ids").combine_chunks()
  golds = table.column("target_ids").combine_chunks()
  targets = golds.flatten()
  input_lengths = np.asarray(inputs.value_lengths(), np.int64)
  target_lengths = np.asarray(targets.value_lengths(), np.int64)
  num_golds = np.asarray(golds.value_lengths(), np.int64)
  num_truncated = int(table.schema.metadata[b"num_truncated"])
  return (
    _pad(None, input_lengths, np.asarray(inputs.flatten(), np.int32), spec.max_input_len),
    input_lengths,
    _pad(None, target_lengths, np.asarray(targets.flatten(), np.int32), spec.max_target_len),
    target_lengths,
    num_golds,
    num_truncated,
  )


def tokenize_split(
  split: Split,
  tokenizer,
  spec: TextSpec = TextSpec(),
  cache_dir: str | os.PathLike | None = None,
  fingerprint: str | None = None,
) -> TokenizedSplit:
  """Token ids of every input (formatted with the task name) and of every gold answer of a split.

  With `cache_dir`, the ids are kept as Arrow files under a key of (texts, tokenizer, spec): a second
  call with the same key reads them back and does not call the tokenizer.
  """
  inputs = [spec.input_template.format(task=split.task, input=text) for text in split.inputs]
  num_golds = np.asarray([len(golds) for golds in split.answers], np.int64)
  cached = path = None
  if cache_dir is not None:
    fingerprint = fingerprint or tokenizer_fingerprint(tokenizer)
    key = _cache_key(split.task, inputs, split.answers, fingerprint, spec)
    path = Path(cache_dir) / split.task / f"{split.seed}_{split.split}_{key}.arrow"
    cached = _load_arrow(path, spec)
  if cached is None:
    input_rows, num_truncated = _encode(tokenizer, inputs, spec.max_input_len, spec.input_eos)
    target_rows, _ = _encode(
      tokenizer, [g for golds in split.answers for g in golds], spec.max_target_len, eos=True
    )
    if path is not None:
      _save_arrow(path, input_rows, target_rows, num_golds, num_truncated)
    input_lengths = np.asarray([len(r) for r in input_rows], np.int64)
    target_lengths = np.asarray([len(r) for r in target_rows], np.int64)
    cached = (
      _pad(input_rows, input_lengths, None, spec.max_input_len),
      input_lengths,
      _pad(target_rows, target_lengths, None, spec.max_target_len),
      target_lengths,
      num_golds,
      num_truncated,
    )
  input_ids, input_lengths, target_ids, target_lengths, cached_golds, num_truncated = cached
  if not np.array_equal(cached_golds, num_golds):
    raise RuntimeError(f"cache entry {path} does not match {split.path}; delete the cache directory")
  return TokenizedSplit(
    split.task,
    split.seed,
    split.split,
    input_ids,
    input_lengths.astype(np.int32),
    target_ids,
    target_lengths.astype(np.int32),
    np.concatenate([[0], np.cumsum(num_golds)]).astype(np.int64),
    tuple(split.answers),
    int(num_truncated),
  )


def tokenize_tasks(
  tasks: Mapping[str, TaskData],
  tokenizer,
  spec: TextSpec = TextSpec(),
  cache_dir: str | os.PathLike | None = None,
) -> dict[tuple[str, int, str], TokenizedSplit]:
  """Every split that was read, by (task, seed, split)."""
  fingerprint = tokenizer_fingerprint(tokenizer) if cache_dir is not None else None
  return {
    (task, seed, name): tokenize_split(split, tokenizer, spec, cache_dir, fingerprint)
    for task, data in tasks.items()
    for (seed, name), split in data.splits.items()
  }


def channel_form(data: TokenizedSplit) -> TokenizedSplit:
  """The noisy-channel form of a classification split (Min et al. 2022, "Noisy Channel Language Model
  Prompting for Few-Shot Text Classification"): each example's gold label becomes its input and its input
  its target, so that a model trained on it learns p(input | prompt, label). Exact on the token ids: both
  sides are EOS-terminated and right-padded already. `answers` stay the labels, what predictions are
  compared with. Every example needs exactly one gold (a classification split); others are refused."""
  golds = data.num_golds
  if len(data) and not np.all(golds == 1):
    bad = int(np.flatnonzero(golds != 1)[0])
    raise ValueError(
      f"task {data.task!r} (seed {data.seed}, split {data.split}): the channel form needs exactly one gold "
      f"answer per example (a classification split); example {bad} has {int(golds[bad])}"
    )
  return dataclasses.replace(
    data,
    input_ids=data.target_ids,
    input_lengths=data.target_lengths,
    target_ids=data.input_ids,
    target_lengths=data.input_lengths,
    gold_offsets=np.arange(len(data) + 1, dtype=np.int64),
  )


def pad_lengths(data: TokenizedSplit, input_len: int, target_len: int) -> TokenizedSplit:
  """The split with its id arrays right-padded to `input_len` / `target_len` (never cut): splits in the
  direct and the channel form side by side in one upstream pool or episode need one shape."""
  l_in, l_out = data.lengths
  if input_len < l_in or target_len < l_out:
    raise ValueError(
      f"pad_lengths cannot cut {data.task!r} from ({l_in}, {l_out}) to ({input_len}, {target_len})"
    )
  return dataclasses.replace(
    data,
    input_ids=np.pad(data.input_ids, ((0, 0), (0, input_len - l_in))),
    target_ids=np.pad(data.target_ids, ((0, 0), (0, target_len - l_out))),
  )


def concat_splits(splits: Sequence[TokenizedSplit], task: str = "mixture") -> TokenizedSplit:
  """One pool of many splits (MTL: the train and dev files of every source task and seed)."""
  if not splits:
    raise ValueError("no splits to pool")
  _check_same_lengths(splits)
  offsets, start = [np.zeros(1, np.int64)], 0
  for s in splits:
    offsets.append(s.gold_offsets[1:] + start)
    start += int(s.gold_offsets[-1])
  return TokenizedSplit(
    task,
    None,
    None,
    np.concatenate([s.input_ids for s in splits]),
    np.concatenate([s.input_lengths for s in splits]),
    np.concatenate([s.target_ids for s in splits]),
    np.concatenate([s.target_lengths for s in splits]),
    np.concatenate(offsets),
    tuple(a for s in splits for a in s.answers),
    sum(s.num_truncated for s in splits),
  )


def source_pool(
  tokenized: Mapping[tuple[str, int, str], TokenizedSplit],
  tasks: Sequence[str],
  seeds: Sequence[int],
  splits: Sequence[str] = ("train", "dev"),
) -> TokenizedSplit:
  """The MTL pool: the union of the given splits of every task and seed (the study: train + dev)."""
  missing = [(t, s, n) for t in tasks for s in seeds for n in splits if (t, s, n) not in tokenized]
  if missing:
    raise KeyError(f"not tokenized: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
  return concat_splits([tokenized[(t, s, n)] for t in tasks for s in seeds for n in splits])


def _check_same_lengths(splits: Sequence[TokenizedSplit]) -> None:
  lengths = {s.lengths for s in splits}
  if len(lengths) > 1:
    raise ValueError(
      f"splits tokenized with different lengths {sorted(lengths)}: a batch needs one "
      f"static shape; tokenize them with the same TextSpec"
    )


# --- batches ---------------------------------------------------------------------------------------------


def make_batch(data: TokenizedSplit, examples: np.ndarray, golds: np.ndarray | None = None) -> dict:
  """The contract batch of `examples` (any shape S) -> arrays [*S, L]; `golds` picks each one's gold

  (an index into the example's golds; None: the first gold). An example without a gold (a kept
  CrossFit line without an answer, evaluation only) gets an empty target: all padding, mask 0.
  """
  examples = np.asarray(examples)
  has_gold = data.num_golds[examples] > 0
  rows = data.gold_offsets[examples] + (0 if golds is None else np.asarray(golds))
  rows = np.where(has_gold, rows, 0)
  input_lengths = data.input_lengths[examples]
  l_in, l_out = data.lengths
  if len(data.target_ids):
    target_ids, target_lengths = data.target_ids[rows], data.target_lengths[rows]
  else:  # every example of the split lacks a gold
    target_ids, target_lengths = np.zeros((*rows.shape, l_out), np.int32), np.zeros(rows.shape, np.int32)
  target_lengths = np.where(has_gold, target_lengths, 0)
  return {
    "input_ids": data.input_ids[examples],
    "input_mask": (np.arange(l_in) < input_lengths[..., None]).astype(np.int32),
    "target_ids": np.where(has_gold[..., None], target_ids, PAD_ID).astype(np.int32),
    "target_mask": (np.arange(l_out) < target_lengths[..., None]).astype(np.int32),
  }


def _rng(seed: int, stream: int, *counters: int) -> np.random.Generator:
  # Distinct streams for distinct uses, so that e.g. epoch e's shuffle and step e's golds are unrelated.
  return np.random.default_rng([int(seed), stream, *map(int, counters)])


def random_golds(rng: np.random.Generator, data: TokenizedSplit, examples: np.ndarray) -> np.ndarray:
  """One gold per example, uniformly among its golds (training)."""
  return rng.integers(0, data.num_golds[examples])


def _check_trainable(data: TokenizedSplit) -> None:
  without = int(np.sum(data.num_golds == 0))
  if without:
    raise ValueError(
      f"{data.task} (seed {data.seed}, {data.split}): {without} example(s) without a gold "
      f"answer cannot be trained on; read training files without keep_empty_answers"
    )


def draw_examples(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
  """`count` example indices out of `n`: without replacement when the file is big enough, else whole
  shuffled passes over the file, so that no example is drawn twice before every one was drawn once."""
  if n <= 0:
    raise ValueError("cannot draw from an empty split")
  passes = -(-count // n)
  return np.concatenate([rng.permutation(n) for _ in range(passes)])[:count]


@dataclasses.dataclass(frozen=True, eq=False)
class MetaTask:
  """One (task, seed): support examples from its train file, query examples from its dev file."""

  task: str
  seed: int
  support: TokenizedSplit
  query: TokenizedSplit | None = None


def meta_tasks(
  tokenized: Mapping[tuple[str, int, str], TokenizedSplit],
  tasks: Sequence[str],
  seeds: Sequence[int],
  with_query: bool = True,
) -> list[MetaTask]:
  """Every (task, seed) of the source tasks, in a fixed order."""
  missing = [
    (t, s, n)
    for t in tasks
    for s in seeds
    for n in (("train", "dev") if with_query else ("train",))
    if (t, s, n) not in tokenized
  ]
  if missing:
    raise KeyError(f"not tokenized: {missing[:10]}{' ...' if len(missing) > 10 else ''}")
  return [
    MetaTask(t, s, tokenized[(t, s, "train")], tokenized[(t, s, "dev")] if with_query else None)
    for t in tasks
    for s in seeds
  ]


@dataclasses.dataclass(frozen=True)
class EpisodeSampler:
  """Meta-batches: T meta-tasks per step; support [T, K, b, L], query [T, q, L] (none when q is None)."""

  meta_tasks: tuple[MetaTask, ...]
  tasks_per_step: int  # T
  inner_steps: int  # K
  inner_batch_size: int  # b: examples per inner step
  query_size: int | None  # q; None for Reptile
  seed: int = 0
  buckets: LengthBuckets = NO_BUCKETS  # support and query are cut to one length

  def __post_init__(self):
    object.__setattr__(self, "meta_tasks", tuple(self.meta_tasks))
    if not self.meta_tasks:
      raise ValueError("EpisodeSampler needs at least one meta-task")
    if min(self.tasks_per_step, self.inner_steps, self.inner_batch_size) < 1 or (
      self.query_size is not None and self.query_size < 1
    ):
      raise ValueError(
        f"sizes must be positive: T={self.tasks_per_step} K={self.inner_steps} "
        f"b={self.inner_batch_size} q={self.query_size}"
      )
    missing = [(m.task, m.seed) for m in self.meta_tasks if self.query_size and m.query is None]
    if missing:
      raise ValueError(f"query examples asked for, but no dev split for {missing[:5]}")
    for m in self.meta_tasks:
      _check_trainable(m.support)
      if self.query_size and m.query is not None:
        _check_trainable(m.query)
    _check_same_lengths(
      [m.support for m in self.meta_tasks] + [m.query for m in self.meta_tasks if m.query is not None]
    )

  def task_indices(self, step: int) -> np.ndarray:
    """Which meta-tasks the step uses: distinct ones while there are enough."""
    return draw_examples(_rng(self.seed, 0, step), len(self.meta_tasks), self.tasks_per_step)

  def __call__(self, step: int, rows: slice | None = None) -> dict:
    """The step's meta-batch, or only its tasks `rows` (a process's share of them in a multi-process run).
    Every task's arrays are built (host memory only) and the whole meta-batch is cut to its length
    bucket before `rows` are taken, so that each process's share has the same shape and each task the
    examples it gets in the whole batch."""
    rng = _rng(self.seed, 1, step)
    supports, queries = [], []
    for t in self.task_indices(step):
      task = self.meta_tasks[t]
      shape = (self.inner_steps, self.inner_batch_size)
      examples = draw_examples(rng, len(task.support), int(np.prod(shape))).reshape(shape)
      supports.append(make_batch(task.support, examples, random_golds(rng, task.support, examples)))
      if self.query_size is not None:
        examples = draw_examples(rng, len(task.query), self.query_size)
        queries.append(make_batch(task.query, examples, random_golds(rng, task.query, examples)))
    episode = {"support": _stack(supports)}
    if self.query_size is not None:
      episode["query"] = _stack(queries)
    trimmed = dict(zip(episode, self.buckets.trim(*episode.values())))
    if rows is None:
      return trimmed
    return {name: {k: v[rows] for k, v in part.items()} for name, part in trimmed.items()}


def _stack(batches: Sequence[dict]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in BATCH_KEYS}


@dataclasses.dataclass(frozen=True)
class EpochSampler:
  """Batches [B, L] of shuffled epochs over a pool. The examples form one stream, epoch after epoch
  (epoch e is a permutation drawn from (seed, e)); step s takes its positions s*B .. s*B+B-1, so every
  batch is full and every example is seen once per epoch, whatever N and B."""

  data: TokenizedSplit
  batch_size: int
  seed: int = 0
  buckets: LengthBuckets = NO_BUCKETS

  def __post_init__(self):
    if self.batch_size < 1 or len(self.data) == 0:
      raise ValueError(f"EpochSampler needs a positive batch size and examples ({self.data.task})")
    _check_trainable(self.data)

  @property
  def steps_per_epoch(self) -> float:
    return len(self.data) / self.batch_size

  def steps_for_epochs(self, epochs: float) -> int:
    """Steps that cover `epochs` passes over the pool (the last batch may run into the next epoch)."""
    return -(-int(round(epochs * len(self.data))) // self.batch_size)

  def examples(self, step: int) -> np.ndarray:
    n = len(self.data)
    positions = step * self.batch_size + np.arange(self.batch_size)
    epochs = positions // n
    out = np.empty(self.batch_size, np.int64)
    for epoch in np.unique(epochs):
      order = _rng(self.seed, 2, epoch).permutation(n)
      here = epochs == epoch
      out[here] = order[positions[here] % n]
    return out

  def __call__(self, step: int, rows: slice | None = None) -> dict:
    """The step's batch, or only its examples `rows` (a process's share in a multi-process run)."""
    examples = self.examples(step)
    golds = random_golds(_rng(self.seed, 3, step), self.data, examples)
    # The whole batch is cut to its bucket first, so that every process's share has the same shape.
    batch = self.buckets.trim(make_batch(self.data, examples, golds))[0]
    return batch if rows is None else {k: v[rows] for k, v in batch.items()}


@dataclasses.dataclass(frozen=True)
class GridSampler:
  """The downstream grid: run r (a seed x lr pair) trains on its own seed's train file; batches
  [R, B, L]. Runs that share a sampling seed see the same batches (as separate runs of the study do).
  All runs' batches of a step are cut to one bucket length (one shape for the vmapped step).

  label_set: the task's labels (token ids and mask [C, L], `decode.Candidates`), carried by every batch as
  "label_ids" / "label_mask" [R, C, L] for a label-choice objective (`model.loss.label_choice_loss`)."""

  samplers: tuple[EpochSampler, ...]
  buckets: LengthBuckets = NO_BUCKETS
  label_set: tuple[np.ndarray, np.ndarray] | None = None

  @classmethod
  def create(
    cls,
    train_by_seed: Mapping[int, TokenizedSplit],
    run_seeds: Sequence[int],
    batch_size: int,
    sampling_seeds: Sequence[int] | None = None,
    buckets: LengthBuckets = NO_BUCKETS,
    label_set: tuple[np.ndarray, np.ndarray] | None = None,
  ) -> GridSampler:
    missing = sorted({s for s in run_seeds if s not in train_by_seed})
    if missing:
      raise KeyError(f"no train split for the run seed(s) {missing}; have {sorted(train_by_seed)}")
    sampling_seeds = run_seeds if sampling_seeds is None else sampling_seeds
    if len(sampling_seeds) != len(run_seeds):
      raise ValueError("one sampling seed per run")
    _check_same_lengths([train_by_seed[s] for s in run_seeds])
    return cls(
      tuple(EpochSampler(train_by_seed[s], batch_size, int(z)) for s, z in zip(run_seeds, sampling_seeds)),
      buckets,
      None if label_set is None else tuple(np.asarray(a, np.int32) for a in label_set),
    )

  def __call__(self, step: int, runs: Sequence[int] | None = None) -> dict:
    """The batches of every run, or of the runs `runs` (indices; a process's share of a padded grid,
    `parallel.RunLayout.local`), cut to the whole grid's length bucket (one shape in every process)."""
    batch = self.buckets.trim(_stack([sampler(step) for sampler in self.samplers]))[0]
    if self.label_set is not None:
      label_ids, label_mask = self.label_set
      num_runs = len(self.samplers)
      batch["label_ids"] = np.broadcast_to(label_ids, (num_runs, *label_ids.shape))
      batch["label_mask"] = np.broadcast_to(label_mask, (num_runs, *label_mask.shape))
    return batch if runs is None else {k: v[np.asarray(runs, int)] for k, v in batch.items()}


# --- evaluation ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class EvalBatch:
  batch: dict  # contract arrays [B, L] (or [R, B, L]); targets are the first gold
  mask: np.ndarray  # [B] (or [R, B]) 1 for a real example, 0 for padding
  indices: np.ndarray  # example index of each row in its split, -1 for padding


def _eval_batch(data: TokenizedSplit, start: int, batch_size: int) -> EvalBatch:
  indices = np.arange(start, start + batch_size)
  real = indices < len(data)
  # Padding rows repeat the batch's first example (example 0 once the split is done) so that the model
  # sees ordinary inputs and the batch's longest input is a real one, as in the reference's shorter last
  # batch (the "after_padding" prompt starts after it); the mask drops them.
  batch = make_batch(data, np.where(real, indices, start if start < len(data) else 0))
  return EvalBatch(batch, real.astype(np.int32), np.where(real, indices, -1))


def eval_batches(
  data: TokenizedSplit, batch_size: int, buckets: LengthBuckets = NO_BUCKETS
) -> Iterator[EvalBatch]:
  """The whole split in file order, ceil(N / B) batches of B rows, the last one padded."""
  for start in range(0, len(data), batch_size):
    part = _eval_batch(data, start, batch_size)
    yield dataclasses.replace(part, batch=buckets.trim(part.batch)[0])


def grid_eval_batches(
  splits: Sequence[TokenizedSplit], batch_size: int, buckets: LengthBuckets = NO_BUCKETS
) -> Iterator[EvalBatch]:
  """Eval batches with a leading run axis: run r walks through `splits[r]`; a run whose split is shorter
  gets fully masked batches once it is done."""
  _check_same_lengths(splits)
  longest = max(len(s) for s in splits)
  for start in range(0, longest, batch_size):
    parts = [_eval_batch(s, start, batch_size) for s in splits]
    yield EvalBatch(
      buckets.trim(_stack([p.batch for p in parts]))[0],
      np.stack([p.mask for p in parts]),
      np.stack([p.indices for p in parts]),
    )
