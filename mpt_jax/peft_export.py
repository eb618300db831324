"""A learned prompt in PyTorch: export it as a Hugging Face PEFT prompt-tuning adapter, and import one.

  python -m mpt_jax.peft_export RUN/upstream/prompt.npy --to=peft OUT_DIR [--base_model=DIR_OR_HUB_ID]
  mpt-jax export-prompt RUN/upstream/prompt.npy --to=peft OUT_DIR [--base_model=...]

writes OUT_DIR/adapter_config.json (peft_type PROMPT_TUNING, task_type SEQ_2_SEQ_LM, num_virtual_tokens,
token_dim, num_transformer_submodules=1, base_model_name_or_path) and OUT_DIR/adapter_model.safetensors
(`prompt_embeddings`, float32 [P, d_model]), which `peft.PeftModel.from_pretrained(T5ForConditionalGeneration
.from_pretrained(base), OUT_DIR)` loads. num_transformer_submodules=1: PEFT's seq2seq default of 2 would
also prepend virtual tokens to the decoder's input, which our prompt never saw. The prompt's JSON
sidecar is copied beside them (mpt_jax_prompt.json). peft itself is not needed to export.

PEFT prepends its virtual tokens to every encoder input (inputs_embeds = [prompt; tokens], the mask
extended with ones) and scores the target given the input. So it expresses our "prepend" placement in
the direct direction only: a prompt placed after the input ("suffix", "after_padding") or trained in
the channel direction (the encoder reads the label, the decoder scores the input) is refused, with why.

The other way, `--config.init_prompt=ADAPTER_DIR` starts downstream from a PEFT adapter's prompt
(`load_adapter_prompt`): one with num_transformer_submodules=1, or 2 (seq2seq's default) only if asked
to drop its decoder half, which we have nowhere to put: that is refused too.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mpt_jax import paths
from mpt_jax import prompt as prompt_lib

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
WEIGHT_KEY = "prompt_embeddings"  # PEFT's key of a prompt-learning adapter's embedding (tuners_utils.py)
SIDECAR = "mpt_jax_prompt.json"
RUN_RECORD = "run_record.json"  # mpt_jax.results.RUN_RECORD_FILE (not imported: that module is heavy)


def is_adapter_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is a directory holding a PEFT adapter_config.json."""
  path = os.fspath(path)
  return paths.isdir(path) and paths.isfile(paths.join(path, ADAPTER_CONFIG))


def _direction(prompt_path: str, meta: Mapping[str, Any]) -> tuple[str | None, str]:
  """(the direction the prompt was trained in, where that was read): its sidecar's, else the config of
  the run whose workdir holds it (the newest run_record.json of the directories above it)."""
  for key in ("direction", "data.direction"):
    if key in meta:
      return meta[key], f"{prompt_path}'s sidecar"
  directory = paths.parent(os.path.abspath(prompt_path))
  for _ in range(4):  # <workdir>/upstream/prompt.npy, <workdir>/downstream/<task>/prompts/<run>.npy
    record_path = paths.join(directory, RUN_RECORD)
    if paths.isfile(record_path):
      try:
        records = json.loads(paths.read_text(record_path))
        direction = records[-1]["config"]["data"]["direction"]
      except (ValueError, KeyError, IndexError, TypeError):
        break
      return direction, record_path
    parent = paths.parent(directory)
    if parent == directory:
      break
    directory = parent
  return None, "neither the sidecar nor a run_record.json above it names one"


def check_exportable(prompt_path: str, meta: Mapping[str, Any]) -> None:
  """Raises ValueError saying why PEFT cannot express this prompt, if it cannot."""
  placement = meta.get("placement", "prepend")
  if placement != "prepend":
    raise ValueError(
      f"{prompt_path}: placement {placement!r} (from its sidecar) puts the prompt after each input; PEFT's "
      f"prompt tuning always prepends its virtual tokens to the input (inputs_embeds = [prompt; tokens]), "
      f"so in PEFT this prompt would sit where it was never trained. Only placement 'prepend' exports."
    )
  direction, source = _direction(prompt_path, meta)
  if direction == "channel":
    raise ValueError(
      f"{prompt_path}: trained in the channel direction ({source}): the encoder read the label and the "
      f"decoder scored the input, p(input | label). A PEFT model scores the target given the input "
      f"(the direct direction), so it would compute something else with this prompt; only prompts "
      f"trained with data.direction='direct' export."
    )


def _model_shape(base_model: str) -> dict[str, Any]:
  """num_attention_heads, num_layers and d_model of the base model, where its config can be read here
  (a local directory, or a hub id in the cache); else empty (PEFT fills the heads and layers in itself)."""
  from mpt_jax.model import hf

  try:
    config = hf.read_config(hf.resolve_checkpoint(base_model))
  except Exception:  # pylint: disable=broad-except  # offline, unknown id: PEFT reads them at load time
    return {}
  return {
    "num_attention_heads": config["num_heads"],
    "num_layers": config["num_layers"],
    "d_model": config["d_model"],
  }


def adapter_config(num_virtual_tokens: int, token_dim: int, base_model: str | None, **shape) -> dict:
  """The adapter_config.json of a PEFT PromptTuningConfig (its `to_dict()` keys, peft 0.21)."""
  return {
    "task_type": "SEQ_2_SEQ_LM",
    "peft_type": "PROMPT_TUNING",
    "auto_mapping": None,
    "base_model_name_or_path": base_model,
    "revision": None,
    "inference_mode": True,
    "num_virtual_tokens": int(num_virtual_tokens),
    "token_dim": int(token_dim),
    "num_transformer_submodules": 1,
    "num_attention_heads": shape.get("num_attention_heads"),
    "num_layers": shape.get("num_layers"),
    "modules_to_save": None,
    "prompt_tuning_init": "RANDOM",  # how PEFT would initialize a new prompt; the weights replace it
    "prompt_tuning_init_text": None,
    "tokenizer_name_or_path": None,
    "tokenizer_kwargs": None,
  }


def export_prompt(prompt_path: str, out_dir: str, base_model: str | None = None) -> dict[str, str]:
  """Writes the PEFT adapter of a saved prompt (.npy + sidecar) to `out_dir`; returns the files.
  base_model: the T5 it is for (default: the sidecar's `model`)."""
  from safetensors.numpy import save

  prompt, meta = prompt_lib.load_prompt(prompt_path)
  check_exportable(prompt_path, meta)
  base = base_model or meta.get("model")
  if not base:
    raise ValueError(f"{prompt_path}: its sidecar names no model: pass --base_model=DIR_OR_HUB_ID")
  shape = _model_shape(base)
  if "d_model" in shape and shape["d_model"] != prompt.shape[1]:
    raise ValueError(
      f"{prompt_path}: the prompt has d_model {prompt.shape[1]}, base model {base} has {shape['d_model']}"
    )
  paths.makedirs(out_dir)
  files = {
    "config": paths.join(out_dir, ADAPTER_CONFIG),
    "weights": paths.join(out_dir, ADAPTER_WEIGHTS),
    "sidecar": paths.join(out_dir, SIDECAR),
  }
  config = adapter_config(prompt.shape[0], prompt.shape[1], base, **shape)
  paths.write_text(files["config"], json.dumps(config, indent=2) + "\n")
  blob = save({WEIGHT_KEY: np.ascontiguousarray(prompt, np.float32)}, metadata={"format": "pt"})
  paths.write_atomic(files["weights"], lambda f: f.write(blob))
  paths.write_text(files["sidecar"], json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
  return files


def load_adapter_prompt(directory: str, *, d_model: int | None = None) -> tuple[np.ndarray, dict]:
  """(prompt float32 [P, d_model], meta) of a PEFT prompt-tuning adapter directory, checked as
  `prompt.load_prompt` checks a .npy (d_model: the model's)."""
  from safetensors.numpy import load

  config_path = paths.join(directory, ADAPTER_CONFIG)
  weights_path = paths.join(directory, ADAPTER_WEIGHTS)
  try:
    config = json.loads(paths.read_text(config_path))
  except ValueError as error:
    raise ValueError(f"{config_path}: not JSON ({error})") from None
  if config.get("peft_type") != "PROMPT_TUNING":
    raise ValueError(
      f"{config_path}: peft_type {config.get('peft_type')!r}; only a PROMPT_TUNING adapter holds a soft "
      f"prompt to start from"
    )
  if not paths.isfile(weights_path):
    raise FileNotFoundError(f"{directory}: no {ADAPTER_WEIGHTS} (an adapter saved with safe_serialization)")
  try:
    weights = load(paths.read_bytes(weights_path))
  except Exception as error:  # pylint: disable=broad-except  # a truncated or foreign file
    raise ValueError(f"{weights_path}: not a readable safetensors file ({error})") from None
  if WEIGHT_KEY not in weights:
    raise ValueError(f"{weights_path}: no {WEIGHT_KEY!r} tensor (has {sorted(weights)})")
  prompt = np.asarray(weights[WEIGHT_KEY], np.float32)
  tokens, submodules = config.get("num_virtual_tokens"), config.get("num_transformer_submodules") or 1
  if prompt.ndim != 2 or tokens is None or prompt.shape[0] != tokens * submodules:
    raise ValueError(
      f"{weights_path}: {WEIGHT_KEY} has shape {prompt.shape}; {ADAPTER_CONFIG} says {tokens} virtual "
      f"tokens x {submodules} submodules"
    )
  if submodules != 1:
    raise ValueError(
      f"{config_path}: num_transformer_submodules={submodules}: its prompt also prepends {tokens} tokens "
      f"to the decoder's input, which our T5 has no place for; train it in PEFT with "
      f"num_transformer_submodules=1 (the encoder's prompt only) to start from it here"
    )
  if d_model is not None and prompt.shape[1] != d_model:
    raise ValueError(
      f"{weights_path}: prompt d_model {prompt.shape[1]} (base model "
      f"{config.get('base_model_name_or_path')}) does not match this model's d_model {d_model}"
    )
  if not np.all(np.isfinite(prompt)):
    raise ValueError(f"{weights_path}: the prompt has non-finite values")
  meta = {
    "model": config.get("base_model_name_or_path"),
    "placement": "prepend",
    "length": int(prompt.shape[0]),
    "d_model": int(prompt.shape[1]),
    "source": f"PEFT adapter {directory}",
  }
  return prompt, meta


def load_any_prompt(path: str, *, d_model: int | None = None) -> tuple[np.ndarray, dict]:
  """A saved prompt (.npy + sidecar) or a PEFT prompt-tuning adapter directory."""
  if is_adapter_dir(path):
    return load_adapter_prompt(path, d_model=d_model)
  return prompt_lib.load_prompt(path, d_model=d_model)


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
  parser = argparse.ArgumentParser(
    prog="python -m mpt_jax.peft_export",
    description="Export a learned prompt (.npy + sidecar) as a Hugging Face PEFT prompt-tuning adapter.",
  )
  parser.add_argument("prompt", help="a prompt .npy written by mpt_jax (e.g. RUN/upstream/prompt.npy)")
  parser.add_argument("out_dir", help="the adapter directory to write")
  parser.add_argument("--to", choices=("peft",), required=True, help="the format (peft)")
  parser.add_argument(
    "--base_model", default=None, help="the T5 checkpoint it is for (default: the sidecar's model)"
  )
  args = parser.parse_args(argv)
  try:
    files = export_prompt(args.prompt, args.out_dir, args.base_model)
  except (ValueError, FileNotFoundError) as error:
    parser.exit(2, f"{parser.prog}: {error}\n")
  print(f"wrote a PEFT PROMPT_TUNING adapter to {args.out_dir}: {', '.join(files.values())}")
  return files


if __name__ == "__main__":
  main()
