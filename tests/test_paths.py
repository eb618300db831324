"""The path layer (mpt_jax/paths.py): local paths and URLs alike, and a whole run whose every path is a
gs:// URL reaching it: data_dir, model and init_prompt read, the workdir's files written, orbax given the
URL, and no URL ever handed to open() / os / shutil (which would silently make a local `gs:` folder).

Offline: gs:// is served by a local directory (fsspec's DirFileSystem registered for the gs protocol,
as gcsfs would be); orbax's checkpoints, which reach GCS through tensorstore rather than fsspec, are
mapped onto the same directory at `checkpoints.orbax_directory`, the one place orbax gets a path.
"""

from __future__ import annotations

import builtins
import io
import json
import os
import re
import shutil
import sys

import numpy as np
import pytest
import fsspec  # noqa: F401 (loads fsspec.registry)
from fsspec.implementations.dirfs import DirFileSystem
from fsspec.implementations.local import LocalFileSystem

import helpers_t5
from mpt_jax import checkpoints, config as config_lib, gyms, paths, pipeline, prompt as prompt_lib

pytestmark = pytest.mark.usefixtures("fast_compile")  # tiny models: compiling dominates (tests/helpers_t5.py)

URL_LIKE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:/")


@pytest.fixture
def bucket(tmp_path, monkeypatch):
  """gs:// backed by the local directory returned (gs://b/x is <it>/b/x)."""
  root = tmp_path / "gcs"
  root.mkdir()

  class FakeGCS(DirFileSystem):
    protocol = ("gs", "gcs")
    cachable = False

    def __init__(self, *args, **kwargs):  # gcsfs' options (project, finalize_on_close) mean nothing here
      super().__init__(path=str(root), fs=LocalFileSystem())

  for protocol in FakeGCS.protocol:
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, protocol, FakeGCS)
  monkeypatch.setenv("MPT_JAX_CACHE", str(tmp_path / "machine_cache"))
  return root


@pytest.fixture
def os_refuses_urls(monkeypatch):
  """open(), io.open, os and shutil file functions raise when given a URL (or a URL mangled by pathlib,
  'gs:/b/x'): whatever reads or writes a URL must go through mpt_jax/paths.py."""

  def guard(where, function):
    def guarded(path, *args, **kwargs):
      if isinstance(path, (str, os.PathLike)):
        text = os.fspath(path)
        if isinstance(text, str) and URL_LIKE.match(text):
          raise AssertionError(f"{where}({text!r}): a URL reached the OS, not mpt_jax/paths.py")
      return function(path, *args, **kwargs)

    return guarded

  for module, names in (
    (builtins, ["open"]),
    (io, ["open"]),
    (os, ["makedirs", "mkdir", "listdir", "scandir", "replace", "remove", "stat"]),
    (os.path, ["exists", "isdir", "isfile"]),
    (shutil, ["rmtree", "move", "copyfile"]),
  ):
    for name in names:
      monkeypatch.setattr(module, name, guard(f"{module.__name__}.{name}", getattr(module, name)))


def test_the_guard_catches_a_url_given_to_the_os(os_refuses_urls):
  for call in (lambda: open("gs://b/x"), lambda: os.makedirs("gs://b/x"), lambda: os.path.exists("gs:/b/x")):
    with pytest.raises(AssertionError, match="a URL reached the OS"):
      call()


@pytest.mark.parametrize("where", ["local", "url"])
def test_files_and_directories_local_or_url(where, bucket, tmp_path, os_refuses_urls):
  base = str(tmp_path / "local") if where == "local" else "gs://b/base"
  backing = tmp_path / "local" if where == "local" else bucket / "b" / "base"
  d = paths.join(base, "d")
  paths.makedirs(d)
  paths.write_text(paths.join(d, "a.json"), '{"x": 1}')
  paths.write_atomic(paths.join(d, "b.npy"), lambda f: np.save(f, np.arange(3)))
  assert json.loads((backing / "d" / "a.json").read_text()) == {"x": 1}  # it landed where it should
  assert paths.listdir(d) == ["a.json", "b.npy"] and paths.isdir(d) and paths.isfile(paths.join(d, "a.json"))
  assert np.load(io.BytesIO(paths.read_bytes(paths.join(d, "b.npy")))).tolist() == [0, 1, 2]
  assert paths.name(d) == "d" and paths.parent(paths.join(d, "a.json")) == d
  paths.move(d, paths.join(base, "e"))
  assert paths.listdir(base) == ["e"] and not paths.exists(d)
  paths.remove(paths.join(base, "e"), recursive=True)
  paths.remove(paths.join(base, "never"), recursive=True)  # nothing there: nothing to do
  assert paths.listdir(base) == []
  assert paths.absolute(base) == (base if where == "url" else os.path.abspath(base))


def test_a_url_file_cannot_be_appended_to(bucket):
  with pytest.raises(ValueError, match="cannot append"):
    paths.open_file("gs://b/log.jsonl", "a")


def test_local_copy_of_a_url_directory_is_made_once(bucket, tmp_path):
  (bucket / "b" / "model" / "sub").mkdir(parents=True)
  (bucket / "b" / "model" / "config.json").write_text("{}")
  (bucket / "b" / "model" / "sub" / "w.bin").write_bytes(b"\x01\x02")
  local = paths.local_copy("gs://b/model", "models")
  assert local.startswith(str(tmp_path / "machine_cache"))
  assert open(os.path.join(local, "sub", "w.bin"), "rb").read() == b"\x01\x02"
  (bucket / "b" / "model" / "config.json").write_text('{"changed": 1}')
  assert paths.local_copy("gs://b/model", "models") == local  # cached: not fetched again
  assert paths.local_copy(str(tmp_path)) == str(tmp_path)  # a local path is its own copy
  with pytest.raises(FileNotFoundError, match="gs://b/nothing does not exist"):
    paths.local_copy("gs://b/nothing")


def test_a_local_mirror_resumes_from_and_uploads_to_its_url(bucket):
  (bucket / "b" / "logs").mkdir(parents=True)
  (bucket / "b" / "logs" / "metrics.jsonl").write_text("1\n")
  mirror = paths.LocalMirror("gs://b/logs")
  with open(os.path.join(mirror.local, "metrics.jsonl"), "a") as f:
    f.write("2\n")
  assert (bucket / "b" / "logs" / "metrics.jsonl").read_text() == "1\n"  # not before upload()
  mirror.upload()
  assert (bucket / "b" / "logs" / "metrics.jsonl").read_text() == "1\n2\n"


def test_the_config_checks_url_files_through_the_path_layer(bucket):
  config = config_lib.base_config("maml", "synth_mini", "tiny")
  config.gym, config.model = "synthetic", "gs://b/no_model"
  config.init_prompt, config.cache_dir = "gs://b/no_prompt.npy", "gs://b/cache"
  with pytest.raises(config_lib.ConfigError) as error:
    config_lib.validate(config)
  text = str(error.value)
  assert "config.init_prompt='gs://b/no_prompt.npy': no such file" in text
  assert "config.model='gs://b/no_model': no such checkpoint directory" in text
  assert "config.cache_dir='gs://b/cache': must be a local path" in text


def test_a_run_with_every_path_a_url(bucket, tmp_path, monkeypatch, os_refuses_urls):
  """data_dir, model, init_prompt and workdir on gs://: the run reads and writes only through the path
  layer (the guard), its files land in the bucket, a rerun finds them there and recomputes nothing."""
  from mpt_jax.model import hf, tokenizer as tokenizer_lib

  # The bucket's contents, put there as a user's `gsutil cp -r` would.
  ckpt = tmp_path / "tiny_t5"
  helpers_t5.make_tokenizer_dir(ckpt)
  model, params = helpers_t5.tiny_t5("1.1", vocab_size=len(tokenizer_lib.load_tokenizer(ckpt)))
  hf.save_checkpoint(ckpt, model.config, params, tokenizer_lib.load_tokenizer(ckpt))
  shutil.copytree(ckpt, bucket / "b" / "models" / "tiny_t5")
  shutil.copytree(gyms.data_dir("synthetic", tmp_path / "gym"), bucket / "b" / "data")
  init = np.random.default_rng(0).normal(size=(4, model.config.d_model)).astype(np.float32)
  prompt_lib.save_prompt("gs://b/prompts/init.npy", init, {"model": "tiny"})

  seen_by_orbax = []

  def to_bucket(directory):
    seen_by_orbax.append(directory)
    assert directory.startswith("gs://b/run/")
    return str(bucket / directory[len("gs://") :])

  monkeypatch.setattr(checkpoints, "orbax_directory", to_bucket)
  monkeypatch.chdir(tmp_path / "gym")  # where a URL handed to the OS would make a 'gs:' folder

  config = config_lib.base_config("mtl", "synth_mini", "tiny")
  config.data_dir, config.model, config.init_prompt = (
    "gs://b/data",
    "gs://b/models/tiny_t5",
    "gs://b/prompts/init.npy",
  )
  config.prompt.length, config.dropout_rate = 4, 0.0
  config.downstream.max_epochs, config.downstream.batch_size = 1, 16
  summary = pipeline.run(config, "gs://b/run")
  task = "synth-sentiment_d"
  assert list(summary["tasks"]) == [task]

  run = bucket / "b" / "run"
  for name in (
    "results.json",
    "results.md",
    "results.csv",
    "results.png",
    "run_record.json",
    f"downstream/{task}/results.json",
    f"downstream/{task}/dev_curve.json",
    f"downstream/{task}/fingerprint.json",
    f"downstream/{task}/prompts/seed100_lr0.5.npy",
    f"downstream/{task}/logs/metrics.jsonl",
  ):
    assert (run / name).is_file(), name
  assert seen_by_orbax and all(d == f"gs://b/run/downstream/{task}/checkpoints" for d in seen_by_orbax)
  assert not (run / "downstream" / task / "checkpoints").exists()  # removed when the grid finished
  assert (run / "downstream" / task / "logs" / "metrics.jsonl").read_text().count("\n") >= 1
  assert not os.path.exists("gs:")  # nothing went to a local folder named after the URL
  first = (run / f"downstream/{task}/results.json").stat().st_mtime_ns
  again = pipeline.run(config, "gs://b/run")
  assert (run / f"downstream/{task}/results.json").stat().st_mtime_ns == first
  assert again["tasks"][task]["test_scores"] == summary["tasks"][task]["test_scores"]
  assert len(json.loads((run / "run_record.json").read_text())) == 2
