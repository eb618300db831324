"""The one path layer: every file mpt-jax reads or writes goes through here, local path or URL alike.

A path is a string: a local path, or a URL of any fsspec filesystem (`gs://bucket/run`, `s3://...`,
`memory://...`; gs:// needs `gcsfs` installed on the machine that uses it). Local paths go to the OS
(so local runs behave as before: atomic writes by rename, appends); URLs go to fsspec, never to
`open()` / `os.path` (which would silently make a local directory named `gs:`).

Object stores have no rename and no append: a URL file is written whole, in one `write_*` call (an
object appears whole when its upload completes, so writes there are atomic too). Orbax (checkpoints)
and the TensorBoard/JSONL logs have their own ways: orbax takes the URL itself; the logs are written
under a local staging directory and uploaded (`LocalMirror`).
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable
from typing import IO, Any

_URL = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def is_url(path: str | os.PathLike) -> bool:
  """True for `scheme://...` other than file://."""
  match = _URL.match(os.fspath(path))
  return bool(match) and match.group(1) != "file"


def _local(path: str | os.PathLike) -> str:
  path = os.fspath(path)
  return path[len("file://") :] if path.startswith("file://") else path


def _fs(url: str):
  import fsspec  # deferred: only URLs need it

  return fsspec.core.url_to_fs(url)


def join(path: str | os.PathLike, *parts: str) -> str:
  path = os.fspath(path)
  if is_url(path):
    return posixpath.join(path, *parts)
  return os.path.join(_local(path), *parts)


def parent(path: str | os.PathLike) -> str:
  path = os.fspath(path).rstrip("/")
  return posixpath.dirname(path) if is_url(path) else os.path.dirname(_local(path))


def name(path: str | os.PathLike) -> str:
  return posixpath.basename(os.fspath(path).rstrip("/"))


def absolute(path: str | os.PathLike) -> str:
  """A URL unchanged; a local path made absolute (~ expanded)."""
  path = os.fspath(path)
  return path if is_url(path) else os.path.abspath(os.path.expanduser(_local(path)))


def exists(path: str | os.PathLike) -> bool:
  if is_url(path):
    fs, p = _fs(os.fspath(path))
    return fs.exists(p)
  return os.path.exists(_local(path))


def isfile(path: str | os.PathLike) -> bool:
  if is_url(path):
    fs, p = _fs(os.fspath(path))
    return fs.isfile(p)
  return os.path.isfile(_local(path))


def isdir(path: str | os.PathLike) -> bool:
  if is_url(path):
    fs, p = _fs(os.fspath(path))
    return fs.isdir(p)
  return os.path.isdir(_local(path))


def makedirs(path: str | os.PathLike) -> None:
  """Creates the directory and its parents (object stores: a no-op where directories are implicit)."""
  if is_url(path):
    fs, p = _fs(os.fspath(path))
    fs.makedirs(p, exist_ok=True)
  else:
    os.makedirs(_local(path), exist_ok=True)


def listdir(path: str | os.PathLike) -> list[str]:
  """The names (not paths) of a directory's entries, sorted."""
  if is_url(path):
    fs, p = _fs(os.fspath(path))
    return sorted(name(entry) for entry in fs.ls(p, detail=False))
  return sorted(os.listdir(_local(path)))


def remove(path: str | os.PathLike, *, recursive: bool = False) -> None:
  """Deletes a file (or a directory tree with recursive=True); nothing when it does not exist."""
  if is_url(path):
    fs, p = _fs(os.fspath(path))
    if fs.exists(p):
      fs.rm(p, recursive=recursive)
  elif recursive:
    shutil.rmtree(_local(path), ignore_errors=True)
  elif os.path.lexists(_local(path)):
    os.remove(_local(path))


def move(source: str | os.PathLike, target: str | os.PathLike) -> None:
  """Moves a file or a directory tree (on an object store: copies it, then deletes the source)."""
  if is_url(source) or is_url(target):
    fs, s = _fs(os.fspath(source))
    _, t = _fs(os.fspath(target))
    fs.mv(s, t, recursive=True)
  else:
    shutil.move(_local(source), _local(target))


def open_file(path: str | os.PathLike, mode: str = "r", **kwargs) -> IO[Any]:
  """A file object, text (encoding utf-8 unless given) or binary ('b' in mode). On a URL, write modes
  upload on close, and append is refused (object stores cannot append)."""
  if "b" not in mode:
    kwargs.setdefault("encoding", "utf-8")
  if is_url(path):
    if "a" in mode or "+" in mode:
      raise ValueError(f"{os.fspath(path)}: mode {mode!r}: an object store cannot append or update a file")
    fs, p = _fs(os.fspath(path))
    return fs.open(p, mode, **kwargs)
  return open(_local(path), mode, **kwargs)  # noqa: SIM115 (the caller closes it)


def read_bytes(path: str | os.PathLike) -> bytes:
  with open_file(path, "rb") as f:
    return f.read()


def read_text(path: str | os.PathLike) -> str:
  with open_file(path, "r") as f:
    return f.read()


def write_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
  """Writes a file whole or not at all: `write(binary file object)`. Local: a temporary file renamed
  over `path`; a URL: one upload. OSErrors name the file."""
  path = os.fspath(path)
  if is_url(path):
    try:
      with open_file(path, "wb") as f:
        write(f)
    except OSError as error:
      raise OSError(error.errno, f"writing {path}: {error.strerror or error}") from error
    return
  path = _local(path)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      write(f)
    os.replace(tmp, path)
  except OSError as error:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise OSError(error.errno, f"writing {path}: {error.strerror or error}") from error


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
  write_atomic(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
  write_atomic(path, lambda f: f.write(text.encode("utf-8")))


# --- local copies of remote files ----------------------------------------------------------------


def cache_root() -> str:
  """Where local copies of URLs go: $MPT_JAX_CACHE, else <tmp>/mpt_jax_cache."""
  return os.environ.get("MPT_JAX_CACHE") or os.path.join(tempfile.gettempdir(), "mpt_jax_cache")


def local_copy(path: str | os.PathLike, what: str = "files") -> str:
  """A local path holding the same files: `path` itself when local, else a copy of the URL's file or
  directory tree under `cache_root()`, made once (for readers that need the OS: the tokenizer,
  safetensors' memory map)."""
  path = os.fspath(path)
  if not is_url(path):
    return _local(path)
  key = hashlib.sha256(path.encode()).hexdigest()[:16]
  target = os.path.join(cache_root(), what, f"{name(path) or 'root'}-{key}")
  done = target + ".complete"
  if not os.path.exists(done):
    fs, p = _fs(path)
    if not fs.exists(p):
      raise FileNotFoundError(f"{path} does not exist")
    shutil.rmtree(target, ignore_errors=True)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if fs.isdir(p):
      os.makedirs(target)
      for entry in fs.find(p):
        local = os.path.join(target, *posixpath.relpath(entry, p.rstrip("/")).split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        fs.get_file(entry, local)
    else:
      fs.get_file(p, target)
    with open(done, "w") as f:
      f.write(path + "\n")
  return target


class LocalMirror:
  """A local directory standing for `path`: for writers that need the OS (TensorBoard's event files, a
  JSONL log appended to). Local `path`: the directory itself, nothing to upload. URL: a staging
  directory, seeded with the URL's existing files (a resumed run appends), whose files `upload()`
  copies to the URL whole."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    if not is_url(self.path):
      self.local = _local(self.path)
      os.makedirs(self.local, exist_ok=True)
      return
    self.local = tempfile.mkdtemp(prefix="mpt_jax_mirror_")
    fs, p = _fs(self.path)
    if fs.isdir(p):
      for entry in fs.ls(p, detail=False):
        if fs.isfile(entry):
          fs.get_file(entry, os.path.join(self.local, name(entry)))

  def upload(self) -> None:
    if not is_url(self.path):
      return
    fs, p = _fs(self.path)
    fs.makedirs(p, exist_ok=True)
    for entry in sorted(os.listdir(self.local)):
      local = os.path.join(self.local, entry)
      if os.path.isfile(local):
        fs.put_file(local, posixpath.join(p, entry))
