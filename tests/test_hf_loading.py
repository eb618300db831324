"""Checkpoint loading and writing: every weight format, the config semantics of transformers 4 and 5,
the tokenizer, and one clear error for each kind of bad input."""

from __future__ import annotations

import builtins
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import helpers_t5
from mpt_jax.model import hf
from mpt_jax.model.hf import load_pretrained, save_checkpoint
from mpt_jax.model.t5 import T5Config
from mpt_jax.model.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates


def _copy(src, dst, weights=True):
  """A copy of a checkpoint dir; without the weights when weights=False."""
  dst.mkdir(parents=True)
  for name in ("config.json", "spiece.model") + (("model.safetensors",) if weights else ()):
    shutil.copyfile(src / name, dst / name)
  return dst


def _same_tree(a, b):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def v11(hf_t5_v11_dir):
  return load_pretrained(hf_t5_v11_dir)


def test_tokenizer_loads_from_a_directory_and_round_trips(tiny_tokenizer_dir):
  tokenizer = load_tokenizer(tiny_tokenizer_dir)
  assert len(tokenizer) == 160 + 100  # SentencePiece pieces + <extra_id_*> sentinels
  text = "premise: the old cat was happy [SEP] hypothesis: a dog"
  ids = tokenizer(text).input_ids
  assert ids[-1] == 1 and tokenizer.unk_token_id not in ids
  assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_config_reads_both_transformers_generations():
  base = {"model_type": "t5", "d_model": 16, "vocab_size": 40}
  # transformers 4 files: tie_word_embeddings carries the v1.1 "untied, unscaled" meaning.
  old_v11 = T5Config.from_hf_dict({**base, "tie_word_embeddings": False, "feed_forward_proj": "gated-gelu"})
  assert not old_v11.tie_word_embeddings and not old_v11.scale_decoder_outputs
  old_v10 = T5Config.from_hf_dict(base)
  assert old_v10.tie_word_embeddings and old_v10.scale_decoder_outputs
  # transformers 5 files: tie forced True, the scaling kept in scale_decoder_outputs.
  new_v11 = T5Config.from_hf_dict({**base, "tie_word_embeddings": True, "scale_decoder_outputs": False})
  assert not new_v11.scale_decoder_outputs
  # The checkpoint's own lm_head decides the tying when the loader knows it.
  assert not T5Config.from_hf_dict(base, tie_word_embeddings=False).tie_word_embeddings
  assert T5Config.from_hf_dict({**base, "num_layers": 3}).num_decoder_layers == 3
  with pytest.raises(ValueError, match="'bart', not 't5'"):
    T5Config.from_hf_dict({"model_type": "bart"})
  with pytest.raises(ValueError, match="feed_forward_proj='gated-silu'"):
    T5Config.from_hf_dict({**base, "feed_forward_proj": "gated-silu"})
  round_trip = T5Config.from_hf_dict(new_v11.to_hf_dict())
  assert round_trip == new_v11


def test_every_weight_format_loads_the_same_params(hf_t5_v11_dir, v11, tmp_path):
  torch = pytest.importorskip("torch")
  _, params, _ = v11
  tensors = load_file(hf_t5_v11_dir / "model.safetensors")

  sharded = _copy(hf_t5_v11_dir, tmp_path / "sharded", weights=False)
  names = sorted(tensors)
  shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
  for file, keys in shards.items():
    save_file({k: tensors[k] for k in keys}, sharded / file, metadata={"format": "pt"})
  (sharded / "model.safetensors.index.json").write_text(
    json.dumps({"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}})
  )

  flax_dir = _copy(hf_t5_v11_dir, tmp_path / "flax", weights=False)
  nested = {}
  for name, value in tensors.items():  # HF Flax layout: block/0/..., Linear as kernel [in, out]
    *parents, owner, _ = name.split(".")
    node = nested
    for part in (*parents, owner):
      node = node.setdefault(part, {})
    if owner in ("shared", "relative_attention_bias"):
      node["embedding"] = value
    elif owner.endswith("layer_norm"):
      node["weight"] = value
    else:
      node["kernel"] = value.T
  from flax import serialization

  (flax_dir / "flax_model.msgpack").write_bytes(serialization.msgpack_serialize(nested))

  torch_dir = _copy(hf_t5_v11_dir, tmp_path / "torch", weights=False)
  torch.save({k: torch.tensor(v) for k, v in tensors.items()}, torch_dir / "pytorch_model.bin")

  for path in (sharded, flax_dir, torch_dir):
    _, loaded, _ = load_pretrained(path)
    _same_tree(loaded, params)


def test_pytorch_bin_without_torch_says_how_to_convert(hf_t5_v11_dir, tmp_path, monkeypatch):
  path = _copy(hf_t5_v11_dir, tmp_path / "bin", weights=False)
  (path / "pytorch_model.bin").write_bytes(b"not read")
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch" or name.startswith("torch."):
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match=r"pytorch_model.bin is a PyTorch pickle.*torch.*safetensors"):
    load_pretrained(path)


def test_missing_directory_is_named(tmp_path):
  for missing in (tmp_path / "no_such_checkpoint", "./runs/no_such_checkpoint"):
    with pytest.raises(FileNotFoundError, match="no_such_checkpoint does not exist"):
      load_pretrained(missing)


def test_hub_id_offline_without_cache_fails_fast(tmp_path, monkeypatch):
  import huggingface_hub.constants

  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_cache"))
  with pytest.raises(hf.CheckpointNotFound) as caught:
    load_pretrained("google/t5-large-lm-adapt")
  message = str(caught.value)
  assert "\n" not in message  # mpt_jax.main prints it as one FATAL line
  assert "model 'google/t5-large-lm-adapt' (revision 'main')" in message and "HF_HUB_OFFLINE=1" in message
  assert "`hf download google/t5-large-lm-adapt --revision main --local-dir DIR`" in message
  assert "--config.model=DIR" in message


# --- the hub: a fake hub cache in the layout huggingface_hub writes, read offline ---------------------------

HUB_ID, MAIN_COMMIT, OTHER_COMMIT = (
  helpers_t5.FAKE_HUB_ID,
  helpers_t5.FAKE_MAIN_COMMIT,
  helpers_t5.FAKE_OTHER_COMMIT,
)
write_fake_hub = helpers_t5.write_fake_hub


@pytest.fixture(scope="module")
def hub_checkpoint(tmp_path_factory):
  """A tiny checkpoint (config.json, model.safetensors, spiece.model), written without torch."""
  return helpers_t5.make_tiny_checkpoint(tmp_path_factory.mktemp("hub_tiny_t5"))


@pytest.fixture
def fake_hub(tmp_path, monkeypatch, hub_checkpoint):
  """HF_HUB_CACHE naming a fake hub cache of HUB_ID, offline; yields the cache directory."""
  cache = write_fake_hub(tmp_path / "hub", hub_checkpoint)
  monkeypatch.setenv("HF_HUB_CACHE", str(cache))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return cache


def test_a_hub_id_resolves_to_the_snapshot_of_its_revision(fake_hub, tmp_path, monkeypatch, hub_checkpoint):
  snapshots = fake_hub / "models--fake--tiny-t5" / "snapshots"
  main = hf.resolve_checkpoint(HUB_ID)
  assert main == snapshots / MAIN_COMMIT and hf.snapshot_commit(main) == MAIN_COMMIT
  for revision in ("other", OTHER_COMMIT):  # a branch, or the commit itself
    assert hf.resolve_checkpoint(HUB_ID, revision) == snapshots / OTHER_COMMIT
  model, params, tokenizer = load_pretrained(HUB_ID, revision="other")
  assert model.config.d_model == hf.read_config(hub_checkpoint)["d_model"] and len(tokenizer) > 100
  assert hf.snapshot_commit(hub_checkpoint) is None  # a directory: known by its path
  # HF_HOME names the cache too (HF_HOME/hub), as huggingface_hub reads it.
  monkeypatch.delenv("HF_HUB_CACHE")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
  write_fake_hub(tmp_path / "home" / "hub", hub_checkpoint, refs={"main": OTHER_COMMIT})
  assert hf.snapshot_commit(hf.resolve_checkpoint(HUB_ID)) == OTHER_COMMIT


def test_a_revision_not_in_the_cache_says_how_to_download_it(fake_hub):
  with pytest.raises(hf.CheckpointNotFound) as caught:
    hf.resolve_checkpoint(HUB_ID, "v2")
  message = str(caught.value)
  assert "\n" not in message and "model 'fake/tiny-t5' (revision 'v2')" in message
  assert (
    "`hf download fake/tiny-t5 --revision v2 --local-dir DIR`" in message and "--config.model=DIR" in message
  )


def test_the_hub_commit_is_recorded_and_fingerprinted(fake_hub, tmp_path, hub_checkpoint):
  from mpt_jax import config as config_lib, fingerprint, pipeline, results

  config = config_lib.base_config("pt", "cls2cls")
  config.model = HUB_ID
  record = results.run_record(config, tmp_path / "run", model=pipeline.model_record(config))
  assert record["model"] == {
    "model": HUB_ID,
    "revision": "main",
    "path": str(fake_hub / "models--fake--tiny-t5" / "snapshots" / MAIN_COMMIT),
    "commit": MAIN_COMMIT,
  }
  assert json.loads((tmp_path / "run" / "run_record.json").read_text())[-1]["model"]["commit"] == MAIN_COMMIT
  keys = pipeline.upstream_fingerprint(config, {})
  assert keys[fingerprint.MODEL_SNAPSHOT] == MAIN_COMMIT and "model_revision" not in keys
  # A local directory has no hub commit.
  local = config_lib.base_config("pt", "cls2cls")
  local.model = str(hub_checkpoint)
  assert pipeline.model_record(local)["commit"] is None
  assert pipeline.upstream_fingerprint(local, {})[fingerprint.MODEL_SNAPSHOT] is None


def test_a_workdir_made_with_one_snapshot_refuses_another(fake_hub, tmp_path):
  from mpt_jax import config as config_lib, fingerprint, pipeline

  config = config_lib.base_config("pt", "cls2cls")
  config.model = HUB_ID
  stage = tmp_path / "downstream" / "task"
  made = pipeline.task_fingerprint(config, "task", _NoData(), None)
  fingerprint.Record(made).save(str(stage))
  (stage / "results.json").write_text("{}")  # work a rerun would reuse
  check = lambda keys: fingerprint.check_stage(str(stage), keys, what=str(stage), fix="Use a fresh --workdir")
  config.model_revision = MAIN_COMMIT  # the same commit, pinned: accepted
  assert check(pipeline.task_fingerprint(config, "task", _NoData(), None)).problem is None
  config.model_revision = "other"
  problem = check(pipeline.task_fingerprint(config, "task", _NoData(), None)).problem
  assert f"(model snapshot): {MAIN_COMMIT!r} -> {OTHER_COMMIT!r}" in problem
  assert f"--config.model_revision={MAIN_COMMIT}" in problem
  # A record written before the commit was recorded is accepted under any (and keeps its hash).
  old = {k: v for k, v in made.items() if k != fingerprint.MODEL_SNAPSHOT}
  assert fingerprint.differences(old, pipeline.task_fingerprint(config, "task", _NoData(), None)) == []


class _NoData:
  splits = {}


def test_model_revision_must_be_a_string(hub_checkpoint):
  from mpt_jax import config as config_lib

  config = config_lib.base_config("pt", "synth_mini", "tiny")
  config.gym, config.model = "synthetic", str(hub_checkpoint)
  with config.ignore_type():
    config.model_revision = 3
  with pytest.raises(config_lib.ConfigError, match=r"config.model_revision=3: expected a hub revision"):
    config_lib.validate(config)


def test_config_that_is_not_t5_is_rejected(hf_t5_v11_dir, tmp_path):
  path = _copy(hf_t5_v11_dir, tmp_path / "bart")
  config = json.loads((path / "config.json").read_text())
  (path / "config.json").write_text(json.dumps({**config, "model_type": "bart"}))
  with pytest.raises(ValueError, match=r"config.json: model_type is 'bart', not 't5'"):
    load_pretrained(path)


def test_wrong_shape_and_missing_tensor_are_named(hf_t5_v11_dir, tmp_path):
  tensors = load_file(hf_t5_v11_dir / "model.safetensors")
  name = "encoder.block.1.layer.0.SelfAttention.k.weight"
  wrong = _copy(hf_t5_v11_dir, tmp_path / "wrong", weights=False)
  save_file({**tensors, name: tensors[name][:, :-1].copy()}, wrong / "model.safetensors")
  with pytest.raises(ValueError, match=rf"{name} has shape \(16, 15\), expected \(16, 16\)"):
    load_pretrained(wrong)

  name = "decoder.block.2.layer.2.layer_norm.weight"
  missing = _copy(hf_t5_v11_dir, tmp_path / "missing", weights=False)
  save_file({k: v for k, v in tensors.items() if k != name}, missing / "model.safetensors")
  with pytest.raises(ValueError, match=rf"{name} is missing"):
    load_pretrained(missing)


def test_missing_weights_and_tokenizer_are_named(hf_t5_v11_dir, tmp_path):
  no_weights = _copy(hf_t5_v11_dir, tmp_path / "no_weights", weights=False)
  with pytest.raises(FileNotFoundError, match="no weights found; expected one of model.safetensors"):
    load_pretrained(no_weights)
  no_spiece = _copy(hf_t5_v11_dir, tmp_path / "no_spiece")
  (no_spiece / "spiece.model").unlink()
  with pytest.raises(FileNotFoundError, match="no spiece.model"):
    load_pretrained(no_spiece)
  (no_spiece / "config.json").unlink()
  with pytest.raises(FileNotFoundError, match="no config.json"):
    load_pretrained(no_spiece)


def test_unexpected_tensors_warn(hf_t5_v11_dir, tmp_path):
  tensors = load_file(hf_t5_v11_dir / "model.safetensors")
  path = _copy(hf_t5_v11_dir, tmp_path / "extra", weights=False)
  save_file({**tensors, "classifier.dense.weight": np.zeros((2, 16), np.float32)}, path / "model.safetensors")
  with pytest.warns(UserWarning, match="classifier.dense.weight"):
    load_pretrained(path)


def test_bfloat16_loading(hf_t5_v11_dir, v11):
  with pytest.raises(ValueError, match="dtype='float16'"):
    load_pretrained(hf_t5_v11_dir, dtype="float16")
  model, params, _ = load_pretrained(hf_t5_v11_dir, dtype="bfloat16")
  assert model.config.dtype == "bfloat16"
  _same_tree(params, jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), v11[1]))


@pytest.mark.parametrize("version", ["1.0", "1.1"])
def test_saved_checkpoint_reloads_here_and_in_transformers(version, request, tmp_path):
  torch = pytest.importorskip("torch")
  from transformers import T5ForConditionalGeneration

  source = request.getfixturevalue("hf_t5_v10_dir" if version == "1.0" else "hf_t5_v11_dir")
  model, params, tokenizer = load_pretrained(source)
  saved = save_checkpoint(tmp_path / "saved", model.config, params, tokenizer)
  assert (saved / "spiece.model").is_file()
  reloaded_model, reloaded, _ = load_pretrained(saved)
  assert reloaded_model.config == model.config
  _same_tree(reloaded, params)

  # transformers reads our files with the same meaning (tying, output scaling, weights).
  reference = T5ForConditionalGeneration.from_pretrained(saved, attn_implementation="eager").eval()
  input_ids = np.array([[5, 17, 30, 1], [8, 1, 0, 0]], np.int32)
  input_mask = (input_ids > 0).astype(np.int32)
  input_mask[:, 0] = 1
  decoder_input_ids = np.array([[0, 7, 9], [0, 4, 1]], np.int32)
  with torch.no_grad():
    expected = reference(
      input_ids=torch.tensor(input_ids, dtype=torch.long),
      attention_mask=torch.tensor(input_mask, dtype=torch.long),
      decoder_input_ids=torch.tensor(decoder_input_ids, dtype=torch.long),
    ).logits
  ours = jax.jit(model.apply)({"params": params}, input_ids, input_mask, decoder_input_ids)
  np.testing.assert_allclose(np.asarray(ours), expected.numpy(), atol=1e-5, rtol=0)


def test_hub_name_heuristic():
  assert not hf.looks_local("google/t5-large-lm-adapt") and not hf.looks_local("t5-small")
  assert hf.looks_local("/data/t5") and hf.looks_local("./t5") and hf.looks_local("a/b/c")
