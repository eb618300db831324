"""One process of a multi-process run in tests/test_multiprocess.py: `python -m mpt_jax.main` as it is,
with an audit hook that records what this process writes, renames or removes (the test checks that
only process 0 writes the run's files). Not a test module: the test starts it as a script.

  python tests/multiprocess_worker.py WRITES_JSON [mpt_jax.main flags ...]
"""

from __future__ import annotations

import atexit
import json
import os
import sys

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_CHANGING_EVENTS = {"os.rename", "os.remove", "os.rmdir", "os.mkdir", "shutil.rmtree", "shutil.move"}


def record_writes(out_file: str) -> None:
  """Appends the path of every file opened for writing (and every rename, removal or new directory)
  to a list that is written to `out_file` when the process exits."""
  changed: list[str] = []

  def hook(event: str, args) -> None:
    if event == "open":
      path, mode, flags = args
      writes = (mode is not None and any(c in str(mode) for c in "wax+")) or (
        mode is None and isinstance(flags, int) and flags & _WRITE_FLAGS
      )
      if writes and isinstance(path, (str, bytes, os.PathLike)):
        changed.append(os.path.abspath(os.fsdecode(path)))
    elif event in _CHANGING_EVENTS and args and isinstance(args[0], (str, bytes, os.PathLike)):
      changed.append(os.path.abspath(os.fsdecode(args[0])))

  def dump() -> None:
    with open(out_file, "w", encoding="utf-8") as f:
      json.dump(changed, f)

  atexit.register(dump)
  sys.addaudithook(hook)


if __name__ == "__main__":
  record_writes(sys.argv.pop(1))
  from absl import app, flags

  from mpt_jax import main

  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main.main, flags_parser=main.parse_flags)
