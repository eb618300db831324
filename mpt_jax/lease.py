"""One job per workdir: a lease file in the workdir (`lease.json`, local or a URL through mpt_jax/paths.py).

The primary process takes it before its first write into the workdir (`pipeline.run`) and releases it at
the end. It names the holder (host, pid, start, command) and carries a heartbeat that a daemon thread
refreshes every `MPT_LEASE_HEARTBEAT_S` seconds (30). A second job on the same workdir refuses at once
(`WorkdirBusy`, one line naming the holder and how to take over), unless the lease is stale: its
heartbeat older than `MPT_LEASE_STALE_S` seconds (180: a preempted VM's job, a killed process), or its
holder a process of this host that is gone; a stale lease is taken with a log line. `MPT_LEASE_FORCE=1`
takes it whatever it says (only when that job is surely gone).

Taking is checked: a local lease is created with O_EXCL (two jobs started at once: one wins), and any
other take (a stale lease, a URL) is read back after a short pause (`MPT_LEASE_SETTLE_S`, 1 s; an object store has no exclusive
create), so of two jobs that took a stale lease at once, the one whose write was overwritten refuses.
`pipeline.run` is what `watch` (launch.sh tpu) and a SLURM requeue rely on: a relaunch beside a
surviving job stops at once instead of mixing checkpoints.

A lease can still be lost: this job stalled past `MPT_LEASE_STALE_S` (a frozen VM, a stopped process) and
another job took the workdir over, or someone forced it. The heartbeat that finds another job's token in
`lease.json` records it on the `Lease` and stops refreshing; `check(path)`, called before every
checkpoint save (mpt_jax/checkpoints.py) and every results file written (mpt_jax/results.py), then
raises `LeaseLost` instead of writing beside the other job. From the command line both are one FATAL line
and exit 75 (EX_TEMPFAIL: another job has the workdir; the same command later may run), which the
launchers retry (mpt_jax/main.py).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid

from absl import logging

from mpt_jax import paths

FILE = "lease.json"


class WorkdirBusy(ValueError):
  """Another job holds the workdir's lease (main prints it in one line, no traceback, and exits 75). Not a
  fingerprint.WorkdirConflict (a mistake to fix, exit 1): the same command later may run; and this module
  stays below fingerprint's config imports, as checkpoints.py and results.py import it."""


class LeaseLost(WorkdirBusy):
  """Another job took this job's lease over while it ran: nothing more is written (exit 75 too)."""


def _env_float(name: str, default: float) -> float:
  value = os.environ.get(name, "")
  try:
    return float(value) if value else default
  except ValueError:
    raise ValueError(f"${name}={value!r}: expected a number of seconds") from None


def stale_after_s() -> float:
  return _env_float("MPT_LEASE_STALE_S", 180.0)


def _identity(token: str, started: float) -> dict:
  return {
    "host": socket.gethostname(),
    "pid": os.getpid(),
    "start": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
    "started_s": started,
    "heartbeat_s": time.time(),
    "token": token,
    "command": " ".join(sys.argv)[:500],
  }


def read(workdir: str, strict: bool = False) -> dict | None:
  """The lease in `workdir`, None when there is none (an unreadable one reads as very old; `strict`: the
  error is raised instead, as the heartbeat wants: a storage hiccup is not another job's lease)."""
  path = paths.join(workdir, FILE)
  try:
    return json.loads(paths.read_text(path))
  except FileNotFoundError:
    return None
  except (OSError, ValueError):  # half-written or corrupt: nobody can be shown to hold it
    if strict:
      raise
    return {"host": "?", "pid": -1, "start": "?", "heartbeat_s": 0.0, "token": ""}


def _pid_gone(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OSError):
    return False
  return False


def stale_reason(holder: dict, now: float | None = None) -> str | None:
  """Why `holder`'s lease may be taken (a log line's words), None while it is held."""
  age = (time.time() if now is None else now) - float(holder.get("heartbeat_s", 0.0))
  if age > stale_after_s():
    return f"its heartbeat is {age:.0f} s old (more than MPT_LEASE_STALE_S={stale_after_s():.0f})"
  if holder.get("host") == socket.gethostname():
    pid = int(holder.get("pid", -1))
    if pid == os.getpid():
      return "it is this process's own, left by an earlier run"
    if _pid_gone(pid):
      return f"its process {pid} on this host is gone"
  return None


def describe(holder: dict) -> str:
  age = time.time() - float(holder.get("heartbeat_s", 0.0))
  return (
    f"host {holder.get('host')} pid {holder.get('pid')}, started {holder.get('start')}, "
    f"heartbeat {age:.0f} s ago"
  )


def _busy(workdir: str, holder: dict) -> WorkdirBusy:
  return WorkdirBusy(
    f"workdir {workdir} is in use by another job ({describe(holder)}; {paths.join(workdir, FILE)}): "
    f"wait for it to end, or stop it; its lease is taken over by itself once its heartbeat is "
    f"{stale_after_s():.0f} s old (MPT_LEASE_STALE_S), or now with MPT_LEASE_FORCE=1 (only if that "
    f"job is gone: two jobs on one workdir corrupt its checkpoints)"
  )


class Lease:
  """A taken lease: refreshes its heartbeat until `release()`."""

  def __init__(self, workdir: str, token: str, started: float):
    self.workdir, self.token, self.started = workdir, token, started
    self.path = paths.join(workdir, FILE)
    self.lost = False  # whether the heartbeat found the lease another job's (or removed)
    self.lost_to: dict | None = None  # the lease as it found it then (None: lease.json removed)
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._beat, name="mpt-lease-heartbeat", daemon=True)
    self._thread.start()

  def _write(self) -> None:
    paths.write_text(self.path, json.dumps(_identity(self.token, self.started), indent=1))

  def _beat(self) -> None:
    interval = _env_float("MPT_LEASE_HEARTBEAT_S", 30.0)
    while not self._stop.wait(interval):
      try:
        holder = read(self.workdir, strict=True)
        if holder is None or holder.get("token") != self.token:
          self.lost, self.lost_to = True, holder
          logging.error(
            "lease of %s lost to %s: another job took this workdir over; this job stops at its next "
            "checkpoint or results write (LeaseLost)",
            self.workdir,
            "nobody" if holder is None else describe(holder),
          )
          return
        self._write()
      except (OSError, ValueError) as error:  # a transient storage error: the next beat tries again
        logging.warning("lease heartbeat of %s failed: %s", self.workdir, error)

  def release(self) -> None:
    self._stop.set()
    self._thread.join(timeout=10)
    try:
      holder = read(self.workdir)
      if holder is not None and holder.get("token") == self.token:
        paths.remove(self.path)
    except OSError as error:
      logging.warning("could not release the lease %s: %s", self.path, error)

  def check(self, path: str) -> None:
    """Raises LeaseLost when the heartbeat found the lease taken by another job (before writing `path`)."""
    if not self.lost:
      return
    if self.lost_to is not None:
      what = f"another job ({describe(self.lost_to)}; {self.path}) took it over"
    else:
      what = f"{self.path} was removed (by another job that took it over and ended, or by hand)"
    raise LeaseLost(
      f"lease of workdir {self.workdir} lost: {what} while this job ran (its heartbeat stalled past "
      f"MPT_LEASE_STALE_S, or MPT_LEASE_FORCE was used); stopped before writing {path}, so that the two "
      f"jobs' work does not mix. If that job still runs, let it finish (the same command afterwards "
      f"reuses its work); if it is gone, rerun this command"
    )


_HELD: dict[str, Lease] = {}


def _within(path: str, workdir: str) -> bool:
  path, workdir = paths.absolute(path).rstrip("/"), paths.absolute(workdir).rstrip("/")
  return path == workdir or path.startswith(workdir + "/")


def check(path: str) -> None:
  """Before a write to `path`: raises LeaseLost when the lease of a workdir holding `path`, taken by this
  process, has been taken over by another job. Nothing when this process holds no such lease (another
  process of a multi-process job, a write outside any run's workdir)."""
  for workdir, held in list(_HELD.items()):
    if _within(str(path), workdir):
      held.check(str(path))


def _create_local(path: str, text: str) -> bool:
  """Creates `path` only if it does not exist (True when this call made it)."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w", encoding="utf-8") as f:
    f.write(text)
  return True


def take(workdir: str) -> Lease:
  """Takes the workdir's lease (making the workdir), or raises WorkdirBusy naming its holder."""
  if workdir in _HELD:
    return _HELD[workdir]
  paths.makedirs(workdir)
  path = paths.join(workdir, FILE)
  token, started = uuid.uuid4().hex, time.time()
  text = json.dumps(_identity(token, started), indent=1)
  force = os.environ.get("MPT_LEASE_FORCE", "") not in ("", "0")
  local = path[len("file://") :] if path.startswith("file://") else path
  created = not paths.is_url(path) and _create_local(local, text)
  if not created:
    holder = read(workdir)
    if holder is not None:
      reason = "MPT_LEASE_FORCE is set" if force else stale_reason(holder)
      if reason is None:
        raise _busy(workdir, holder)
      logging.warning("taking over the lease of %s from %s: %s", workdir, describe(holder), reason)
    paths.write_text(path, text)
  if not created:  # overwritten (no exclusive create there): read back after a pause; a later write wins
    time.sleep(_env_float("MPT_LEASE_SETTLE_S", 1.0))
    holder = read(workdir)
    if holder is None or holder.get("token") != token:
      raise _busy(workdir, holder or {"host": "?", "pid": "?", "start": "?", "heartbeat_s": 0.0})
  logging.info("lease of %s taken (%s)", workdir, path)
  _HELD[workdir] = lease = Lease(workdir, token, started)
  return lease


def release(workdir: str) -> None:
  """Releases this process's lease of `workdir` (nothing when it holds none)."""
  lease = _HELD.pop(workdir, None)
  if lease is not None:
    lease.release()
