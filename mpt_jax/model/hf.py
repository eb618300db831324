"""HF T5 checkpoints <-> our linen T5: `load_pretrained` (local dir or hub id) and `save_checkpoint`.

A checkpoint is a directory with config.json (model_type "t5"), the weights in one of
model.safetensors, model.safetensors.index.json (+ shards), flax_model.msgpack, pytorch_model.bin
(+ .index.json shards; needs torch), and spiece.model for the tokenizer. Weights are read into the
torch naming and layout (`encoder.block.0.layer.0.SelfAttention.q.weight`, Linear as [out, in]), then
mapped one-to-one onto our parameter tree (`encoder/block_0/layer_0/SelfAttention/q/kernel`, [in, out]).

Head tying: transformers 5 always ties `lm_head` to `shared` in memory and drops it on save, but a
T5 v1.1 / LM-adapted checkpoint holds its own `lm_head.weight`. So the checkpoint decides: a distinct
`lm_head.weight` means an untied head (used as is); only `shared.weight` means the head is `shared`.
The d_model**-0.5 output scaling comes from config.json (`scale_decoder_outputs` in transformers 5
files, `tie_word_embeddings` in older ones; see `T5Config.from_hf_dict`).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax import paths
from mpt_jax.model.t5 import DTYPES, T5, T5Config, stack_blocks, unstack_blocks
from mpt_jax.model.tokenizer import SPIECE, load_tokenizer

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
FLAX_MSGPACK = "flax_model.msgpack"
PYTORCH_BIN = "pytorch_model.bin"
PYTORCH_INDEX = "pytorch_model.bin.index.json"

# Tensors a T5 checkpoint may hold that our tree does not need: the stacks' copies of `shared`, and a
# cross-attention bias table some old checkpoints carry but T5 never uses (HF ignores it as well).
_IGNORED = re.compile(
  r"^(encoder|decoder)\.embed_tokens\.weight$"
  r"|^decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight$"
)
_HUB_ALLOW = [CONFIG, SPIECE, "tokenizer_config.json", "special_tokens_map.json"]


def load_pretrained(
  name_or_path: str | os.PathLike,
  dtype: str = "float32",
  *,
  revision: str = "main",
  remat: bool = False,
  scan_layers: bool = False,
  on_host: bool = False,
):
  """-> (model, frozen_params, tokenizer) from a local checkpoint directory or a hub id.

  dtype: "float32" or "bfloat16", the dtype the frozen params are kept and computed in (the prompt,
  the loss and the logits stay float32). remat: rematerialize each block (saves memory for MAML).
  scan_layers: the model scans over its blocks, whose params are then stacked (`t5.stack_blocks`).
  on_host: keep the params as numpy arrays in host memory, to be placed on a mesh part by part
  (`parallel.place_frozen`: no device ever holds more than its part of a T5-XXL); else they are put
  on the default device. revision: the hub revision (branch, tag or commit) of a hub id.
  """
  if dtype not in DTYPES:
    raise ValueError(f"load_pretrained dtype={dtype!r}: expected one of {DTYPES}")
  path = resolve_checkpoint(name_or_path, revision)
  hf_config = read_config(path)
  tensors = read_weights(path)
  config, params = params_from_hf(
    hf_config, tensors, dtype=dtype, remat=remat, scan_layers=scan_layers, source=str(path)
  )
  return T5(config), (params if on_host else jax.device_put(params)), load_tokenizer(path)


def looks_local(name: str) -> bool:
  """Paths, not hub ids ("org/name" or "name"): absolute, ./ ../ ~, or more than one '/'."""
  return (
    os.path.isabs(name)
    or name.startswith((".", "~"))
    or name.count("/") > 1
    or "\\" in name
    or name.endswith("/")
  )


def _hub_offline() -> bool:
  flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("TRANSFORMERS_OFFLINE", ""))
  return any(flag.strip().lower() in ("1", "true", "yes", "on") for flag in flags)


def _hub_cache_dir() -> str | None:
  """The hub cache as the environment names it now (huggingface_hub reads it once, at import)."""
  if os.environ.get("HF_HUB_CACHE"):
    return os.path.expanduser(os.environ["HF_HUB_CACHE"])
  if os.environ.get("HF_HOME"):
    return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
  return None


class CheckpointNotFound(FileNotFoundError):
  """config.model names no checkpoint this machine can read (no such directory; a hub id that is not
  cached here and cannot be downloaded): the user's to fix, said in full (mpt_jax.main: one FATAL line)."""


_SNAPSHOT = re.compile(r"[0-9a-f]{40}")
# Hub ids resolved by this process: one snapshot per (id, revision, cache) for the whole run, so that every
# stage fingerprints and loads the same weights even if the revision moves on the hub meanwhile.
_RESOLVED: dict[tuple, Path] = {}


def snapshot_commit(path: str | os.PathLike) -> str | None:
  """The hub commit a checkpoint directory is a snapshot of (`.../models--ORG--NAME/snapshots/<commit>`,
  as `resolve_checkpoint` gives for a hub id), or None for any other directory (its content is not
  hashed: a local copy is known by its path)."""
  path = Path(os.fspath(path))
  if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
    return path.name if _SNAPSHOT.fullmatch(path.name) else None
  return None


def download_hint(name: str, revision: str = "main") -> str:
  """How to get a hub checkpoint onto a machine without the hub, and run from it."""
  return (
    f"download it where the hub is reachable: `hf download {name} --revision {revision} "
    f"--local-dir DIR` (huggingface_hub's CLI), copy DIR here and pass --config.model=DIR; or run once "
    f"with network access (and without HF_HUB_OFFLINE=1) to fill the hub cache"
  )


def resolve_checkpoint(name_or_path: str | os.PathLike, revision: str = "main") -> Path:
  """The local directory of a checkpoint: the path itself, a local copy of a URL's directory
  (mpt_jax/paths.py), or a hub id's (cached or fresh) snapshot of `revision` (a branch, tag or commit;
  `snapshot_commit` of the result names the commit).

  Fails fast, never waiting on an unreachable hub: a path that looks local is never looked up on the
  hub, and with HF_HUB_OFFLINE=1 only the local hub cache is consulted. Raises CheckpointNotFound.
  """
  name = os.fspath(name_or_path)
  if paths.is_url(name):  # gs://...: copied once to a local cache (the tokenizer and safetensors read files)
    if not paths.isdir(name):
      raise CheckpointNotFound(
        f"{name}: no such checkpoint directory (a model URL names a directory holding {CONFIG}, the "
        f"weights and {SPIECE})"
      )
    return Path(paths.local_copy(name, "models"))
  path = Path(name).expanduser()
  if path.exists():
    if not path.is_dir():
      raise NotADirectoryError(
        f"{path} is a file; pass the checkpoint directory holding {CONFIG}, the weights and {SPIECE}."
      )
    return path
  if isinstance(name_or_path, os.PathLike) or looks_local(name):
    raise CheckpointNotFound(
      f"checkpoint directory {path} does not exist. To use a hub checkpoint "
      f"pass its id (e.g. google/t5-large-lm-adapt) with network access, or "
      f"download it first."
    )
  if not isinstance(revision, str) or not revision.strip():
    raise ValueError(f"hub revision {revision!r}: expected a branch, tag or commit hash (a string)")
  offline, cache_dir = _hub_offline(), _hub_cache_dir()
  key = (name, revision, cache_dir, offline)
  if key in _RESOLVED and _RESOLVED[key].is_dir():
    return _RESOLVED[key]
  from huggingface_hub import snapshot_download
  from huggingface_hub.errors import HFValidationError

  try:
    path = _download(snapshot_download, name, revision, cache_dir, local_files_only=offline)
  except HFValidationError as error:
    raise CheckpointNotFound(
      f"{name!r} is neither an existing directory nor a valid hub id ({error})."
    ) from None
  except Exception as error:  # noqa: BLE001 (hub errors are many: offline, 404, gated, network)
    where = (
      "the hub is offline here (HF_HUB_OFFLINE=1) with no copy of it in the hub cache"
      if offline
      else f"the hub download failed ({type(error).__name__}: {_first_line(error)})"
    )
    raise CheckpointNotFound(
      f"model {name!r} (revision {revision!r}) is not a local directory and {where}; "
      f"{download_hint(name, revision)}."
    ) from None
  _RESOLVED[key] = path
  return path


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  return text.splitlines()[0] if text else "no message"


def _download(snapshot_download, repo_id: str, revision: str, cache_dir, local_files_only: bool) -> Path:
  """Downloads config, tokenizer and one weight format (safetensors first) of a hub repo's revision."""
  formats = (
    ["*.safetensors", SAFETENSORS_INDEX],
    [FLAX_MSGPACK],
    [PYTORCH_BIN, "pytorch_model-*.bin", PYTORCH_INDEX],
  )
  for weights in formats:
    path = Path(
      snapshot_download(
        repo_id,
        revision=revision,
        cache_dir=cache_dir,
        allow_patterns=_HUB_ALLOW + weights,
        local_files_only=local_files_only,
      )
    )
    if _weight_files(path):
      return path
  raise FileNotFoundError(f"hub repo {repo_id} has no {SAFETENSORS}, {FLAX_MSGPACK} or {PYTORCH_BIN}")


def read_config(path: Path) -> dict:
  file = Path(path) / CONFIG
  if not file.is_file():
    raise FileNotFoundError(
      f"{file}: no {CONFIG} in this checkpoint directory (an HF T5 checkpoint "
      f"has config.json, weights and {SPIECE})."
    )
  try:
    hf_config = json.loads(file.read_text())
  except json.JSONDecodeError as error:
    raise ValueError(f"{file}: not valid JSON ({error})") from None
  if hf_config.get("model_type") != "t5":
    raise ValueError(
      f"{file}: model_type is {hf_config.get('model_type')!r}, not 't5'; mpt_jax runs "
      f"T5 encoder-decoders only (t5, t5-v1_1, t5-lm-adapt, flan-t5 checkpoints)."
    )
  return hf_config


def _weight_files(path: Path) -> list[Path]:
  return [
    path / name
    for name in (SAFETENSORS, SAFETENSORS_INDEX, FLAX_MSGPACK, PYTORCH_BIN, PYTORCH_INDEX)
    if (path / name).is_file()
  ]


def read_weights(path: Path) -> dict[str, np.ndarray]:
  """All tensors of the checkpoint as host numpy arrays, in torch naming and layout."""
  path = Path(path)
  if (path / SAFETENSORS).is_file():
    return _read_safetensors([path / SAFETENSORS])
  if (path / SAFETENSORS_INDEX).is_file():
    return _read_safetensors(_shards(path / SAFETENSORS_INDEX))
  if (path / FLAX_MSGPACK).is_file():
    return _read_flax_msgpack(path / FLAX_MSGPACK)
  if (path / PYTORCH_BIN).is_file():
    return _read_torch([path / PYTORCH_BIN])
  if (path / PYTORCH_INDEX).is_file():
    return _read_torch(_shards(path / PYTORCH_INDEX))
  raise FileNotFoundError(
    f"{path}: no weights found; expected one of {SAFETENSORS}, "
    f"{SAFETENSORS_INDEX}, {FLAX_MSGPACK}, {PYTORCH_BIN}, {PYTORCH_INDEX}."
  )


def _shards(index_file: Path) -> list[Path]:
  weight_map = json.loads(index_file.read_text()).get("weight_map")
  if not weight_map:
    raise ValueError(f"{index_file}: no weight_map")
  shards = [index_file.parent / name for name in sorted(set(weight_map.values()))]
  missing = [str(s) for s in shards if not s.is_file()]
  if missing:
    raise FileNotFoundError(f"{index_file} names shard files that are missing: {missing}")
  return shards


def _read_safetensors(files: list[Path]) -> dict[str, np.ndarray]:
  from safetensors import safe_open

  tensors = {}
  # framework="flax": numpy has no bfloat16; we then take the arrays to host numpy (ml_dtypes).
  # This process's own CPU (in a multi-process run jax.devices("cpu")[0] may be another host's).
  with jax.default_device(jax.local_devices(backend="cpu")[0]):
    for file in files:
      try:
        with safe_open(str(file), framework="flax") as f:
          for key in f.keys():
            tensors[key] = np.asarray(f.get_tensor(key))
      except Exception as error:  # noqa: BLE001 (safetensors raises its own error types, without the path)
        raise ValueError(
          f"{file}: unreadable safetensors file ({type(error).__name__}: {error}); a "
          f"truncated download? Download the checkpoint again."
        ) from None
  return tensors


def _read_flax_msgpack(file: Path) -> dict[str, np.ndarray]:
  """HF Flax T5 layout (block/0/layer/0/.../kernel [in, out]) -> torch naming and layout."""
  from flax import serialization
  from flax.traverse_util import flatten_dict

  flat = flatten_dict(serialization.msgpack_restore(file.read_bytes()), sep=".")
  tensors = {}
  for key, value in flat.items():
    value = np.asarray(value)
    stem, leaf = key.rsplit(".", 1)
    if leaf == "kernel":
      value = value.T
    tensors[f"{stem}.weight"] = value
  return tensors


def _read_torch(files: list[Path]) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ImportError(
      f"{files[0]} is a PyTorch pickle and reading it needs torch, which is not installed. Either "
      f"`pip install torch` (CPU is enough), or convert the checkpoint once to safetensors where "
      f"torch is available: `from transformers import T5ForConditionalGeneration as M; "
      f"M.from_pretrained(DIR).save_pretrained(DIR)` (writes {SAFETENSORS})."
    ) from None
  tensors = {}
  for file in files:
    state = torch.load(str(file), map_location="cpu", weights_only=True)
    for key, value in state.items():
      tensors[key] = value.float().numpy() if value.is_floating_point() else value.numpy()
  return tensors


def hf_name(path: tuple[str, ...]) -> str:
  """Our param path -> the torch tensor name (`block_0` -> `block.0`, kernel/embedding -> weight)."""
  parts = []
  for part in path:
    match = re.fullmatch(r"(block|layer)_(\d+)", part)
    if match:
      parts.extend(match.groups())
    elif part in ("kernel", "embedding"):
      parts.append("weight")
    else:
      parts.append(part)
  return ".".join(parts)


def _is_kernel(path: tuple[str, ...]) -> bool:
  return path[-1] == "kernel"


def params_from_hf(
  hf_config: Mapping,
  tensors: Mapping[str, np.ndarray],
  *,
  dtype: str = "float32",
  remat: bool = False,
  scan_layers: bool = False,
  source: str = "checkpoint",
):
  """(T5Config, params) from a config.json dict and torch-named tensors; every error names the tensor.

  The tensors map one-to-one onto the per-layer tree; with scan_layers its blocks are then stacked. The
  params are host (numpy) arrays of the compute dtype."""
  tensors = dict(tensors)
  if "shared.weight" not in tensors:
    for alias in ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight"):
      if alias in tensors:
        tensors["shared.weight"] = tensors[alias]
        break
  head = tensors.get("lm_head.weight")
  untied = head is not None and not (
    "shared.weight" in tensors
    and head.shape == tensors["shared.weight"].shape
    and np.array_equal(head, tensors["shared.weight"])
  )
  if head is not None and not untied:
    del tensors["lm_head.weight"]  # a saved copy of shared: the head is tied
  try:
    config = T5Config.from_hf_dict(
      hf_config, dtype=dtype, remat=remat, tie_word_embeddings=not untied, scan_layers=scan_layers
    )
  except (ValueError, TypeError) as error:
    raise ValueError(f"{source}/{CONFIG}: {error}") from None
  model = T5(config.replace(scan_layers=False))  # the checkpoint's layout: one entry per block
  ids = jnp.zeros((1, 2), jnp.int32)
  expected = jax.eval_shape(model.init, jax.random.PRNGKey(0), ids, ids, ids)["params"]
  target_dtype = np.dtype(config.compute_dtype)  # bfloat16: ml_dtypes' numpy type
  used = set()

  def take(path_keys, leaf):
    path = tuple(p.key for p in path_keys)
    name = hf_name(path)
    if name not in tensors:
      raise ValueError(
        f"{source}: tensor {name} is missing (expected shape "
        f"{_torch_shape(path, leaf.shape)} for a T5 with this {CONFIG})."
      )
    value = tensors[name]
    if _is_kernel(path):
      value = value.T
    if value.shape != leaf.shape:
      raise ValueError(
        f"{source}: tensor {name} has shape {_torch_shape(path, value.shape)}, expected "
        f"{_torch_shape(path, leaf.shape)} from {CONFIG} (d_model={config.d_model}, "
        f"d_kv={config.d_kv}, num_heads={config.num_heads}, d_ff={config.d_ff}, "
        f"vocab_size={config.vocab_size})."
      )
    used.add(name)
    if value.dtype != target_dtype:  # through float32: any float dtype to any other
      value = value.astype(np.float32, copy=False).astype(target_dtype)
    return value

  params = jax.tree_util.tree_map_with_path(take, expected)
  unexpected = sorted(k for k in tensors if k not in used and not _IGNORED.match(k))
  if unexpected:
    warnings.warn(
      f"{source}: {len(unexpected)} tensors are not part of a T5ForConditionalGeneration "
      f"and were ignored: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}",
      stacklevel=2,
    )
  return config, stack_blocks(params) if config.scan_layers else params


def _torch_shape(path, shape) -> tuple[int, ...]:
  return tuple(reversed(shape)) if _is_kernel(path) else tuple(shape)


def params_to_hf(params, dtype: str = "float32") -> dict[str, np.ndarray]:
  """Our params (per-layer or scanned layout) -> torch-named, torch-layout numpy tensors of `dtype` (the
  inverse of params_from_hf)."""
  if dtype not in DTYPES:
    raise ValueError(f"params_to_hf dtype={dtype!r}: expected one of {DTYPES}")
  params = unstack_blocks(params)
  tensors = {}

  def put(path_keys, leaf):
    path = tuple(p.key for p in path_keys)
    value = np.asarray(jnp.asarray(leaf, dtype))
    tensors[hf_name(path)] = np.ascontiguousarray(value.T if _is_kernel(path) else value)

  jax.tree_util.tree_map_with_path(put, params)
  return tensors


def save_checkpoint(
  directory: str | os.PathLike, config: T5Config, params, tokenizer=None, *, dtype: str = "float32"
) -> Path:
  """Writes an HF T5 checkpoint (config.json, model.safetensors, spiece.model) that both
  `load_pretrained` and transformers' `T5ForConditionalGeneration.from_pretrained` read.

  tokenizer: a transformers T5 tokenizer read from a spiece.model (that file is copied), a path to a
  spiece.model or to a directory holding one, or None (then load_pretrained will ask for spiece.model).
  dtype: of the written weights, "float32" or "bfloat16" (half the file; Google's T5 checkpoints were
  trained and released in bfloat16). `load_pretrained` casts them to the dtype it is asked for.
  """
  import shutil

  from safetensors.numpy import save_file

  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / CONFIG).write_text(json.dumps(config.to_hf_dict(), indent=2, sort_keys=True) + "\n")
  # metadata format=pt: transformers refuses safetensors files without a known format tag.
  save_file(params_to_hf(params, dtype), str(directory / SAFETENSORS), metadata={"format": "pt"})
  if tokenizer is not None:
    # A transformers 5 T5Tokenizer saves only tokenizer.json; we keep the SentencePiece model it was
    # read from, which is what load_tokenizer (and every transformers version) reads.
    source = (
      getattr(tokenizer, "vocab_file", None) if not isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    )
    if source is None:
      raise ValueError(
        "save_checkpoint: this tokenizer has no vocab_file (SentencePiece model) to "
        "save; pass the path of its spiece.model instead."
      )
    source = Path(source)
    source = source / SPIECE if source.is_dir() else source
    if not source.is_file():
      raise FileNotFoundError(f"tokenizer {source}: no such SentencePiece model file")
    if source.resolve() != (directory / SPIECE).resolve():
      shutil.copyfile(source, directory / SPIECE)
  return directory
