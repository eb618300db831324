"""T5's pretraining objectives in NumPy: span corruption, then prefix LM (the "LM adaptation").

Span corruption, as in t5.data.preprocessors.span_corruption: a chunk of `tokens_length` tokens gets round(15%) of its tokens marked as noise, grouped in spans of mean
length 3; each noise span is replaced in the input by one sentinel (<extra_id_0>, <extra_id_1>, ... =
ids vocab-1, vocab-2, ... of the T5 tokenizer), and the target lists the sentinels each followed by the
tokens it hides. Example: "The cat sat on the mat" -> input "The <X> on the <Y>", target
"<X> cat sat <Y> mat".
Segmentation follows T5's `random_spans_noise_mask` (the chunk starts with a non-noise span).

Prefix LM, as in t5.data.preprocessors.prefix_lm: the chunk is cut at a uniformly random point; the input
is the part before, the target the part after. This is the objective of the "LM-adapted" T5 checkpoints
(google/t5-*-lm-adapt, Lester et al. 2021) that prompt tuning uses: a span-corruption-only model starts
every output with a sentinel (<extra_id_0>), so any plain-text target costs it tens of nats on its first
token and a soft prompt has to unlearn that before it can learn the task.
"""

from __future__ import annotations

import numpy as np


def span_counts(
  length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
  """(noise tokens, noise spans) of a chunk of `length` tokens, as T5 counts them."""
  num_noise_tokens = int(np.round(length * noise_density))
  num_noise_tokens = min(max(num_noise_tokens, 1), length - 1)
  num_noise_spans = max(int(np.round(num_noise_tokens / mean_noise_span_length)), 1)
  return num_noise_tokens, num_noise_spans


def corrupted_lengths(
  tokens_length: int, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> tuple[int, int]:
  """(input length, target length), EOS included, of a full chunk: pad batches to these."""
  noise, spans = span_counts(tokens_length, noise_density, mean_noise_span_length)
  return tokens_length - noise + spans + 1, noise + spans + 1


def _random_segmentation(num_items: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
  """Lengths of `num_segments` non-empty segments that partition `num_items`, uniformly at random."""
  first_in_segment = np.zeros(num_items, dtype=np.int64)
  first_in_segment[1:] = rng.permutation(np.arange(num_items - 1) < num_segments - 1)
  segment_id = np.cumsum(first_in_segment)
  return np.bincount(segment_id, minlength=num_segments)


def random_spans_noise_mask(
  length: int, rng: np.random.Generator, noise_density: float = 0.15, mean_noise_span_length: float = 3.0
) -> np.ndarray:
  """Boolean [length]: True where a token is noise. Alternates non-noise and noise spans."""
  num_noise_tokens, num_noise_spans = span_counts(length, noise_density, mean_noise_span_length)
  noise_lengths = _random_segmentation(num_noise_tokens, num_noise_spans, rng)
  nonnoise_lengths = _random_segmentation(length - num_noise_tokens, num_noise_spans, rng)
  interleaved = np.stack([nonnoise_lengths, noise_lengths], axis=1).reshape(-1)
  span_starts = np.cumsum(interleaved)[:-1]
  span_start_indicator = np.zeros(length, dtype=np.int64)
  span_start_indicator[span_starts] = 1
  return np.cumsum(span_start_indicator) % 2 == 1


def _replace_spans_with_sentinels(tokens: np.ndarray, mask: np.ndarray, first_sentinel: int) -> np.ndarray:
  """Each run of masked tokens becomes one sentinel (first_sentinel, first_sentinel - 1, ...)."""
  previous = np.concatenate([[False], mask[:-1]])
  first_of_span = mask & ~previous
  sentinels = first_sentinel + 1 - np.cumsum(first_of_span)
  out = np.where(first_of_span, sentinels, tokens)
  return out[~(mask & previous)]


def span_corrupt(
  tokens: np.ndarray,
  rng: np.random.Generator,
  sentinel_start: int,
  eos_id: int = 1,
  noise_density: float = 0.15,
  mean_noise_span_length: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
  """(input ids, target ids) of one chunk, each ending with EOS. `sentinel_start` is <extra_id_0>'s id."""
  tokens = np.asarray(tokens)
  mask = random_spans_noise_mask(len(tokens), rng, noise_density, mean_noise_span_length)
  inputs = _replace_spans_with_sentinels(tokens, mask, sentinel_start)
  targets = _replace_spans_with_sentinels(tokens, ~mask, sentinel_start)
  return np.append(inputs, eos_id), np.append(targets, eos_id)


def prefix_lm(
  tokens: np.ndarray, rng: np.random.Generator, eos_id: int = 1, max_target_tokens: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
  """(input ids, target ids) of one chunk of at least 2 tokens, each ending with EOS: cut at a uniformly
  random point, so that both parts are non-empty and the target has at most max_target_tokens tokens
  (None: any cut in [1, len - 1], as T5's prefix_lm; a cap spends less compute on long targets and
  matches prompt tuning's use, long inputs and short outputs)."""
  tokens = np.asarray(tokens)
  if len(tokens) < 2:
    raise ValueError(f"prefix_lm needs a chunk of at least 2 tokens, got {len(tokens)}")
  if max_target_tokens is not None and max_target_tokens < 1:
    raise ValueError(f"max_target_tokens must be at least 1, got {max_target_tokens}")
  lowest = 1 if max_target_tokens is None else max(1, len(tokens) - max_target_tokens)
  cut = int(rng.integers(lowest, len(tokens)))
  return np.append(tokens[:cut], eos_id), np.append(tokens[cut:], eos_id)


def next_words(
  tokens: np.ndarray, rng: np.random.Generator, eos_id: int = 1, num_tokens: int = 4
) -> tuple[np.ndarray, np.ndarray]:
  """(input ids, target ids), each ending with EOS: a chunk of at least 2 tokens cut at a uniformly random
  point (as prefix_lm), the target only the next `num_tokens` tokens after the cut (fewer at the chunk's
  end). A prefix LM whose every target token sits right after its input: a decoder cannot predict them
  from its own prefix, only by reading where the input stops (what a prompt-tuned label needs)."""
  tokens = np.asarray(tokens)
  if len(tokens) < 2:
    raise ValueError(f"next_words needs a chunk of at least 2 tokens, got {len(tokens)}")
  if num_tokens < 1:
    raise ValueError(f"num_tokens must be at least 1, got {num_tokens}")
  cut = int(rng.integers(1, len(tokens)))
  return np.append(tokens[:cut], eos_id), np.append(tokens[cut : cut + num_tokens], eos_id)


def word_fill(
  tokens: np.ndarray,
  word_start: np.ndarray,
  rng: np.random.Generator,
  sentinel_start: int,
  eos_id: int = 1,
  max_words: int = 3,
  max_target_tokens: int = 12,
) -> tuple[np.ndarray, np.ndarray]:
  """(input ids, target ids), each ending with EOS: 1 to `max_words` consecutive whole words of a document
  (uniform count, uniform position; at least one word stays visible) are replaced in the input by one
  sentinel (<extra_id_0> = `sentinel_start`), and the target is the hidden words alone, at most
  `max_target_tokens` tokens (a longer span hides only its first that many). `word_start[id]` says whether
  piece `id` opens a word (SentencePiece's leading "▁"); a document's first token always does.

  A cloze whose answer is a word of the corpus: unlike span corruption (whose targets open with a
  sentinel) and prefix LM (whose first target token is often a generic "." or "is"), the decoder's first
  token is a content word that only the input determines, which is what a prompt-tuned label needs."""
  tokens = np.asarray(tokens)
  starts = np.flatnonzero(np.asarray(word_start)[tokens])
  starts = np.union1d([0], starts) if len(tokens) else starts
  if len(starts) < 2:
    raise ValueError(f"word_fill needs a document of at least 2 words, got {len(starts)}")
  if max_words < 1 or max_target_tokens < 1:
    raise ValueError(
      f"max_words and max_target_tokens must be at least 1, got {max_words}, {max_target_tokens}"
    )
  bounds = np.append(starts, len(tokens))
  count = int(rng.integers(1, min(max_words, len(starts) - 1) + 1))
  first = int(rng.integers(0, len(starts) - count + 1))
  begin, end = int(bounds[first]), int(bounds[first + count])
  end = min(end, begin + max_target_tokens)
  inputs = np.concatenate([tokens[:begin], [sentinel_start], tokens[end:], [eos_id]])
  return inputs.astype(tokens.dtype), np.append(tokens[begin:end], eos_id)


def word_starts(pieces: list[str]) -> np.ndarray:
  """[vocab] bool: which SentencePiece pieces open a word (start with "▁"), for word_fill."""
  return np.array([piece.startswith("▁") for piece in pieces], bool)


def prefix_lm_lengths(tokens_length: int, max_target_tokens: int | None = None) -> tuple[int, int]:
  """Padded (input, target) lengths that hold any prefix_lm split of a chunk (EOS included)."""
  targets = tokens_length - 1 if max_target_tokens is None else min(max_target_tokens, tokens_length - 1)
  return tokens_length, targets + 1


def pad_batch(pairs: list[tuple[np.ndarray, np.ndarray]], input_len: int, target_len: int) -> dict:
  """Right-pads (input, target) pairs into the batch dict of docs/CONTRACTS.md (pad id 0)."""
  batch = {
    name: np.zeros((len(pairs), n), np.int32)
    for name, n in (
      ("input_ids", input_len),
      ("input_mask", input_len),
      ("target_ids", target_len),
      ("target_mask", target_len),
    )
  }
  for row, (inputs, targets) in enumerate(pairs):
    if len(inputs) > input_len or len(targets) > target_len:
      raise ValueError(
        f"example {row} is longer ({len(inputs)}, {len(targets)}) than the padded "
        f"lengths ({input_len}, {target_len})"
      )
    batch["input_ids"][row, : len(inputs)] = inputs
    batch["input_mask"][row, : len(inputs)] = 1
    batch["target_ids"][row, : len(targets)] = targets
    batch["target_mask"][row, : len(targets)] = 1
  return batch
