"""T5 SentencePiece tokenizers: loading one from a directory, and training a small one offline.

Trap (measured): `T5Tokenizer(vocab_file=...)` in transformers 5 silently ignores the file and gives a
104-token all-unk vocabulary; `T5Tokenizer.from_pretrained(dir)` with `dir/spiece.model` works.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

SPIECE = "spiece.model"


def load_tokenizer(path: str | os.PathLike):
  """The T5 tokenizer of a local directory holding `spiece.model`, or of a hub id (online only)."""
  from transformers import T5Tokenizer  # deferred: transformers is slow to import

  path = Path(path)
  if path.is_dir():
    if not (path / SPIECE).is_file():
      raise FileNotFoundError(
        f"{path}: no {SPIECE} in this directory; a T5 checkpoint directory needs its SentencePiece "
        f"model (save it with tokenizer.save_pretrained(dir), or train one with "
        f"mpt_jax.model.tokenizer.train_sentencepiece)."
      )
    return T5Tokenizer.from_pretrained(str(path))
  return T5Tokenizer.from_pretrained(str(path))


def train_sentencepiece(
  texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int, model_type: str = "unigram"
) -> Path:
  """Trains a T5-style SentencePiece model (pad=0, eos=1, unk=2, no bos) and writes out_dir/spiece.model.

  The T5 tokenizer adds 100 `<extra_id_*>` sentinels on top, so its length is vocab_size + 100.
  """
  import sentencepiece as spm

  buffer = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(texts),
    model_writer=buffer,
    vocab_size=vocab_size,
    model_type=model_type,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    character_coverage=1.0,
    hard_vocab_limit=False,
    num_threads=1,
    minloglevel=2,
  )
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  (out_dir / SPIECE).write_bytes(buffer.getvalue())
  return out_dir / SPIECE
