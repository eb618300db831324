"""Shared pieces of the data tests: fixture paths, a tiny SentencePiece T5 tokenizer, a counting proxy."""

from __future__ import annotations

import hashlib
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
CROSSFIT_FIXTURES = FIXTURES / "crossfit"
BROKEN_FIXTURES = FIXTURES / "crossfit_broken"


def fixture_texts() -> list[str]:
  """Every line of the valid fixtures, with task-name prefixes: the tokenizer's training corpus."""
  texts = []
  for path in sorted(CROSSFIT_FIXTURES.rglob("*.tsv")):
    task = path.parent.name
    for line in path.read_text(encoding="utf-8").splitlines():
      fields = line.split("\t")
      texts.append(f" [{task}] {fields[0]}")
      texts.extend(fields[1:])
  return texts


def tiny_tokenizer(out_dir: Path):
  """A real T5 tokenizer (transformers) over a ~200-piece SentencePiece model trained on the fixtures."""
  from mpt_jax.model.tokenizer import load_tokenizer, train_sentencepiece

  train_sentencepiece(fixture_texts() * 3, out_dir, vocab_size=200)
  return load_tokenizer(out_dir)


class CountingTokenizer:
  """Passes calls to a tokenizer and counts them (to show a cache hit does not tokenize again)."""

  def __init__(self, tokenizer):
    self._tokenizer = tokenizer
    self.calls = 0

  def __call__(self, *args, **kwargs):
    self.calls += 1
    return self._tokenizer(*args, **kwargs)

  def __getattr__(self, name):
    return getattr(self._tokenizer, name)


def tree_hash(root: Path) -> str:
  """A hash of every file's relative path and bytes under root."""
  digest = hashlib.sha256()
  for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
    digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
  return digest.hexdigest()
