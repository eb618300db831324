"""Shared fixtures for tests that need a tiny T5.

Two kinds:
- `tiny_t5(version)`: (model, frozen_params) of a random tiny T5 built directly in JAX (no torch,
  milliseconds): for algorithm tests. `random_batch` gives a batch in the docs/CONTRACTS.md layout.
- `make_hf_t5_dir(out_dir, version)`: a tiny random transformers (PyTorch) T5 saved with
  save_pretrained + a tiny spiece.model, i.e. a checkpoint directory that `load_pretrained` reads:
  for loader / parity / end-to-end tests. Needs torch. The session-scoped pytest fixtures
  `hf_t5_v10_dir` and `hf_t5_v11_dir` build each once per session (tests/conftest.py registers them:
  a test takes them by name).
- `fast_compile`: a module-scoped fixture that turns XLA optimizations off while a module runs.

Versions: "1.0" = ReLU, tied head, scaled decoder output; "1.1" = gated-GELU, untied head, no scaling,
3 decoder layers over 2 encoder layers.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from mpt_jax.model.t5 import T5, T5Config, init_params

REPO = Path(__file__).resolve().parents[1]

TINY_VOCAB = 64


def tiny_config(version: str = "1.1", **overrides) -> T5Config:
  """A tiny T5Config (d_model 16, 2 heads of 8, 2 encoder layers) in the flavour of `version`."""
  if version == "1.0":
    base = dict(
      feed_forward_proj="relu",
      tie_word_embeddings=True,
      scale_decoder_outputs=True,
      num_layers=2,
      num_decoder_layers=2,
    )
  elif version == "1.1":
    base = dict(
      feed_forward_proj="gated-gelu",
      tie_word_embeddings=False,
      scale_decoder_outputs=False,
      num_layers=2,
      num_decoder_layers=3,
      relative_attention_num_buckets=8,
      relative_attention_max_distance=12,
    )
  else:
    raise ValueError(f"version {version!r}: expected '1.0' or '1.1'")
  base.update(vocab_size=TINY_VOCAB, d_model=16, d_kv=8, d_ff=32, num_heads=2, dropout_rate=0.1)
  base.update(overrides)
  return T5Config(**base)


def tiny_t5(version: str = "1.1", seed: int = 0, **overrides):
  """(model, frozen_params) of a random tiny T5, built without torch.

  The vocabulary has TINY_VOCAB=64 ids; to feed text of the tiny tokenizer pass
  vocab_size=len(tokenizer) (260). Other overrides: any T5Config field (num_layers=1, remat=True,
  dtype="bfloat16", dropout_rate=0.0, ...).
  """

  model = T5(tiny_config(version, **overrides))
  return model, init_params(model, seed)


def random_batch(
  seed: int,
  batch: int = 4,
  input_length: int = 10,
  target_length: int = 5,
  vocab_size: int = TINY_VOCAB,
  min_input: int = 2,
  min_target: int = 1,
):
  """A right-padded batch (pad 0, EOS 1 at each sequence's end) with random lengths, as numpy int32."""
  rng = np.random.default_rng(seed)

  def sequences(length, min_length):
    ids = np.zeros((batch, length), np.int32)
    mask = np.zeros((batch, length), np.int32)
    for i in range(batch):
      n = int(rng.integers(min_length, length + 1))
      ids[i, : n - 1] = rng.integers(3, vocab_size, n - 1)
      ids[i, n - 1] = 1
      mask[i, :n] = 1
    return ids, mask

  input_ids, input_mask = sequences(input_length, min_input)
  target_ids, target_mask = sequences(target_length, min_target)
  return {
    "input_ids": input_ids,
    "input_mask": input_mask,
    "target_ids": target_ids,
    "target_mask": target_mask,
  }


def _assets_module():
  """scripts/make_test_assets.py, imported by path (scripts/ is not a package)."""
  spec = importlib.util.spec_from_file_location("make_test_assets", REPO / "scripts" / "make_test_assets.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def make_tokenizer_dir(out_dir: str | os.PathLike) -> Path:
  """out_dir/spiece.model: a tiny SentencePiece model (160 pieces; 260 with the T5 sentinels)."""
  _assets_module().make_tokenizer(out_dir)
  return Path(out_dir)


def make_tiny_checkpoint(out_dir: str | os.PathLike) -> Path:
  """A tiny random v1.1 checkpoint (config.json, model.safetensors, spiece.model) written by our own
  `hf.save_checkpoint`, without torch: a `config.model` for end-to-end runs. One encoder layer and two
  decoder layers: depths that differ (so loading reads num_decoder_layers), and a tiny pipeline run
  compiles in about 2/3 of the time of tiny_config's 2 + 3 (26 s against 38 s for a MAML run of
  tests/test_multiprocess.py's reference; its steps' compilation dominates every end-to-end test)."""
  from mpt_jax.model import hf, tokenizer as tokenizer_lib

  make_tokenizer_dir(out_dir)
  tokenizer = tokenizer_lib.load_tokenizer(out_dir)
  model, params = tiny_t5("1.1", vocab_size=len(tokenizer), num_layers=1, num_decoder_layers=2)
  hf.save_checkpoint(out_dir, model.config, params, tokenizer)
  return Path(out_dir)


FAKE_HUB_ID = "fake/tiny-t5"
FAKE_MAIN_COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAKE_OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def write_fake_hub(cache: str | os.PathLike, checkpoint, repo_id: str = FAKE_HUB_ID, refs=None) -> Path:
  """A hub cache in the layout huggingface_hub writes, models--ORG--NAME/{refs/<ref>, snapshots/<commit>/},
  holding copies of `checkpoint` (refs: {ref: commit}; default main and `other`). Read it offline with
  HF_HUB_CACHE=cache and HF_HUB_OFFLINE=1."""
  import shutil

  refs = refs or {"main": FAKE_MAIN_COMMIT, "other": FAKE_OTHER_COMMIT}
  repo = Path(cache) / ("models--" + repo_id.replace("/", "--"))
  (repo / "refs").mkdir(parents=True, exist_ok=True)
  for ref, commit in refs.items():
    shutil.copytree(checkpoint, repo / "snapshots" / commit, dirs_exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
  return Path(cache)


def make_hf_t5_dir(out_dir: str | os.PathLike, version: str = "1.1", **kwargs) -> Path:
  """A tiny random transformers T5 checkpoint directory (see scripts/make_test_assets.py)."""
  return _assets_module().make_hf_t5(out_dir, version, **kwargs)


@pytest.fixture(scope="module")
def fast_compile():
  """XLA optimizations off for one test module (`pytestmark = pytest.mark.usefixtures(
  "fast_compile")`): compiling dominates tiny-model tests and takes about half as long this way;
  results are the same programs' up to float rounding."""
  import jax

  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def _session_tokenizer_dir(tmp_path_factory) -> Path:
  """One tiny spiece.model per pytest session, shared by the fixtures below."""
  path = tmp_path_factory.getbasetemp() / "tiny_spiece"
  if not (path / "spiece.model").is_file():
    make_tokenizer_dir(path)
  return path


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory) -> Path:
  """A directory holding only the tiny spiece.model."""
  return _session_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def hf_t5_v10_dir(tmp_path_factory) -> Path:
  pytest.importorskip("torch")
  return make_hf_t5_dir(
    tmp_path_factory.mktemp("t5-v1_0-tiny"), "1.0", tokenizer_dir=_session_tokenizer_dir(tmp_path_factory)
  )


@pytest.fixture(scope="session")
def hf_t5_v11_dir(tmp_path_factory) -> Path:
  pytest.importorskip("torch")
  return make_hf_t5_dir(
    tmp_path_factory.mktemp("t5-v1_1-tiny"), "1.1", tokenizer_dir=_session_tokenizer_dir(tmp_path_factory)
  )


_REFERENCE_PAIRS = {}


def load_reference_pair(request, version: str):
  """(our model, our params, tokenizer, transformers' PyTorch reference model) of the tiny `version`
  checkpoint fixture, loaded once per session (parity and decoding tests compare the two)."""
  from transformers import T5ForConditionalGeneration

  from mpt_jax.model.hf import load_pretrained

  if version not in _REFERENCE_PAIRS:
    path = request.getfixturevalue("hf_t5_v10_dir" if version == "1.0" else "hf_t5_v11_dir")
    model, params, tokenizer = load_pretrained(path)
    reference = T5ForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    _REFERENCE_PAIRS[version] = (model, params, tokenizer, reference)
  return _REFERENCE_PAIRS[version]
