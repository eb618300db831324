"""Another job's moves on a lease this process holds (mpt_jax/lease.py), for the tests that lose one."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mpt_jax import lease


def until_lost(held: lease.Lease, take_over) -> None:
  """Calls `take_over()` (another job's move on `held`'s lease.json) until `held`'s heartbeat has seen it.

  Once is not enough: a beat that read its own lease just before may write it back right after (a read
  and a write, not one atomic step), as a real takeover meets it too; there the other job's settle
  read-back (lease.take) refuses, and the other job's own heartbeat rewrites its lease. Here the move is
  simply repeated, as that heartbeat would."""
  deadline = time.monotonic() + 60
  while not held.lost and time.monotonic() < deadline:
    take_over()
    time.sleep(0.05)
  assert held.lost, "the heartbeat did not see the other job's move"


def lose(held: lease.Lease, **fields) -> None:
  """Another job (host tpu-w-9, pid 777, token 'other', plus `fields`) takes `held`'s workdir over;
  returns once `held`'s heartbeat has seen it."""
  record = json.loads(Path(held.path).read_text())
  other = json.dumps(record | {"host": "tpu-w-9", "pid": 777, "token": "other"} | fields)
  until_lost(held, lambda: Path(held.path).write_text(other))
