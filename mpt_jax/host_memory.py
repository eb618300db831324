"""How the process's C allocator treats freed memory: kept for reuse, so a step does not fault in its pages.

Every call of a compiled step on the CPU backend allocates its temporaries (1.7 GiB at the T5-small
shape of benchmarks/bench_steps.py) and frees them when it returns. glibc's defaults give big blocks
back to the kernel: blocks over the mmap threshold are unmapped on free, and a thread's own heap is
deleted once empty. The next call then touches fresh pages, one minor page fault (and a zeroed page)
per 4 KiB: 440,000 faults per T5-small PT step, whose time falls to 0.85x without them on the Xeon
machines here (`python -m benchmarks.bench_host_memory`, benchmarks/results/host_memory.md).

`reuse_freed_memory()` sets glibc's malloc (mallopt) to one arena, no mmap and no trimming: freed
memory stays in the process and the next step reuses the same pages. The cost is that the resident
size does not shrink after a peak; a training process holds it again at the next step anyway.
`MPT_HOST_MALLOC=system` keeps glibc's defaults.

It must run before JAX's runtime starts its threads (a thread keeps the arena it was first given, and
a late call leaves the faults as they were): the entry points call it first, before any computation.
Elsewhere than glibc (macOS, musl) it does nothing and says so.
"""

from __future__ import annotations

import ctypes
import os
import sys

ENV = "MPT_HOST_MALLOC"  # "reuse" (default) or "system"
POLICIES = ("reuse", "system")

# glibc's <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# (parameter, value): one arena for every thread; never mmap a block; never trim the heap's top
# (-1 is SIZE_MAX as glibc reads the int).
_REUSE = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))

_applied: str | None = None


def _glibc():
  """The process's C library when it is glibc (it has gnu_get_libc_version and mallopt), else None."""
  try:
    libc = ctypes.CDLL(None)
    libc.gnu_get_libc_version.restype = ctypes.c_char_p
    libc.gnu_get_libc_version()
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return libc
  except (AttributeError, OSError):
    return None


def _jax_started() -> bool:
  """Whether JAX's runtime (and so its threads) has started in this process."""
  xla_bridge = sys.modules.get("jax._src.xla_bridge")
  started = getattr(xla_bridge, "backends_are_initialized", None)
  return bool(started and started())


def reuse_freed_memory() -> str:
  """Applies the policy `MPT_HOST_MALLOC` names (default "reuse") once per process; returns what is in
  force: "reuse", "system", "system (not glibc)" or "system (JAX had started)". Call it before JAX
  runs anything."""
  global _applied
  if _applied is not None:
    return _applied
  policy = os.environ.get(ENV, "reuse").strip().lower() or "reuse"
  if policy not in POLICIES:
    raise ValueError(f"{ENV}={os.environ[ENV]!r}: expected one of {', '.join(POLICIES)}")
  if policy == "system":
    _applied = "system"
    return _applied
  libc = _glibc()
  if libc is None:
    _applied = "system (not glibc)"
    return _applied
  if _jax_started():  # too late to matter (see above); say so rather than half-apply
    return "system (JAX had started)"
  for parameter, value in _REUSE:
    if libc.mallopt(parameter, value) != 1:
      raise OSError(f"mallopt({parameter}, {value}) failed; set {ENV}=system to keep glibc's defaults")
  _applied = "reuse"
  return _applied
