"""Writes tiny random T5 checkpoints in the HF layout, offline, for tests and demos.

  python scripts/make_test_assets.py OUT_DIR

creates OUT_DIR/t5-v1_0-tiny (ReLU, head tied to `shared`, decoder output scaled) and
OUT_DIR/t5-v1_1-tiny (gated-GELU, distinct `lm_head.weight`, no scaling, more decoder than encoder
layers), each with config.json + model.safetensors (from transformers' PyTorch
`T5ForConditionalGeneration.save_pretrained`) + a tiny SentencePiece spiece.model. Needs torch
(requirements-test.txt). Tests call `make_hf_t5` into tmp dirs, so no binary asset is committed.
"""

from __future__ import annotations

import argparse
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# Words the tiny tokenizer must know well: CrossFit-style prefixes, labels and task names.
_WORDS = """the a an of to and in is was it for on that with as by at from this be are or not but
premise hypothesis question answer context sentence label positive negative neutral entailment
contradiction yes no true false good bad great movie film review paraphrase equivalent acceptable
unacceptable glue sst mrpc rte cola qnli superglue boolq tweet eval sentiment emotion hate offensive
classification task source target prompt meta learning model data train dev test example number
one two three four five six seven eight nine ten red green blue cat dog bird city river mountain
who what when where why how which person place time year day night water fire earth light dark
happy sad angry quick slow small large old new first last left right up down""".split()


def tiny_corpus(num_sentences: int = 3000, seed: int = 0) -> list[str]:
  """A deterministic bag of short sentences over `_WORDS` (plus digits and task-name punctuation)."""
  rng = random.Random(seed)
  sentences = []
  for i in range(num_sentences):
    words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
    if i % 7 == 0:
      words.insert(0, f"[{rng.choice(['glue-sst2', 'tweet_eval-hate', 'superglue-rte', 'ag_news'])}]")
    if i % 5 == 0:
      words.append(str(rng.randint(0, 999)))
    if i % 3 == 0:  # CrossFit field prefixes and separators
      words = [
        f"{rng.choice(['premise', 'question', 'context'])}:",
        *words,
        "[SEP]",
        f"{rng.choice(['hypothesis', 'answer', 'label'])}:",
        rng.choice(_WORDS),
      ]
    sentences.append(" ".join(words) + rng.choice([".", "?", "!", ""]))
  return sentences


def make_tokenizer(out_dir: str | os.PathLike, sp_vocab_size: int = 160) -> Path:
  """Trains the tiny SentencePiece model into out_dir/spiece.model (a few seconds)."""
  from mpt_jax.model.tokenizer import train_sentencepiece

  return train_sentencepiece(tiny_corpus(), out_dir, vocab_size=sp_vocab_size)


VERSIONS = {
  # T5 v1.0: ReLU, tied head with d_model**-0.5 scaling, HF's default bucket settings.
  "1.0": dict(
    feed_forward_proj="relu",
    tie=True,
    num_layers=2,
    num_decoder_layers=2,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
  ),
  # T5 v1.1 / LM-adapted: gated-GELU, untied head, no scaling; few buckets and a short max distance
  # so that short test sequences reach the log-spaced buckets; decoder deeper than encoder.
  "1.1": dict(
    feed_forward_proj="gated-gelu",
    tie=False,
    num_layers=2,
    num_decoder_layers=3,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=12,
  ),
}


def make_hf_t5(
  out_dir: str | os.PathLike,
  version: str = "1.1",
  *,
  seed: int = 0,
  d_model: int = 16,
  d_kv: int = 8,
  d_ff: int = 32,
  num_heads: int = 2,
  sp_vocab_size: int = 160,
  tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
  """A tiny random T5 in HF layout (config.json, model.safetensors, spiece.model) at out_dir.

  tokenizer_dir: reuse a spiece.model from there instead of training one. Layer-norm weights are
  randomized too (HF initializes them to 1), so a loader that drops them cannot pass parity tests.
  """
  import shutil

  import torch
  from safetensors.torch import load_file, save_file
  from transformers import T5Config, T5ForConditionalGeneration

  from mpt_jax.model.tokenizer import SPIECE, load_tokenizer

  if version not in VERSIONS:
    raise ValueError(f"version {version!r}: expected one of {sorted(VERSIONS)}")
  spec = dict(VERSIONS[version])
  tie = spec.pop("tie")
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  if tokenizer_dir is not None:
    shutil.copyfile(Path(tokenizer_dir) / SPIECE, out_dir / SPIECE)
  else:
    make_tokenizer(out_dir, sp_vocab_size)
  vocab_size = len(load_tokenizer(out_dir))  # SentencePiece pieces + 100 sentinels

  config = T5Config(
    vocab_size=vocab_size,
    d_model=d_model,
    d_kv=d_kv,
    d_ff=d_ff,
    num_heads=num_heads,
    dropout_rate=0.1,
    tie_word_embeddings=tie,
    decoder_start_token_id=0,
    pad_token_id=0,
    eos_token_id=1,
    **spec,
  )
  torch.manual_seed(seed)
  model = T5ForConditionalGeneration(config)
  with torch.no_grad():
    for name, param in model.named_parameters():
      if name.endswith("layer_norm.weight"):
        param.uniform_(0.5, 1.5)
  model.save_pretrained(out_dir, safe_serialization=True)
  if not tie:
    # transformers 5 always ties lm_head to shared in memory and drops it on save; a real v1.1
    # checkpoint has its own lm_head.weight, which from_pretrained then keeps untied.
    weights_file = out_dir / "model.safetensors"
    tensors = load_file(weights_file)
    generator = torch.Generator().manual_seed(seed + 1)
    # Scale d_model**-0.5 keeps logits O(1), like the tied v1.0 head with its output scaling: float32
    # rounding differences grow with the logits' size.
    tensors["lm_head.weight"] = torch.randn(vocab_size, d_model, generator=generator) * d_model**-0.5
    save_file(tensors, weights_file, metadata={"format": "pt"})
  return out_dir


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  parser.add_argument("out_dir", type=Path)
  args = parser.parse_args(argv)
  tokenizer_dir = args.out_dir / "t5-v1_0-tiny"
  for version, name in (("1.0", "t5-v1_0-tiny"), ("1.1", "t5-v1_1-tiny")):
    path = make_hf_t5(args.out_dir / name, version, tokenizer_dir=tokenizer_dir if version != "1.0" else None)
    print(f"wrote {path}")


if __name__ == "__main__":
  main()
