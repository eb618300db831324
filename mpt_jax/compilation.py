"""Compile each step once across processes: JAX's persistent compilation cache, on by default.

A run points JAX's cache at a directory under its cache directory before it compiles anything
(`config.compilation_cache_dir`, default `<cache_dir>/compiled`), so a resumed run, the same run again
and the next method of `experiments/run_setting.py` (whose methods share one cache directory) read
their compiled steps from disk instead of compiling them again (116 s for a T5-large MAML step on an
H200). The cache key is the lowered program with the devices, the compiler's version and its flags, so
a changed shape, model or config compiles anew: nothing stale is loaded. As JAX's guide warns, the
cache holds executable code: keep it in a directory only you can write.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache

HIT_EVENT = "/jax/compilation_cache/cache_hits"
MISS_EVENT = "/jax/compilation_cache/cache_misses"


def enable_persistent_cache(
  directory: str | os.PathLike, *, min_compile_time_secs: float | None = None
) -> str:
  """Compiled programs that took at least `min_compile_time_secs` to compile are kept in (and read
  from) `directory` (None: JAX's own setting, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS, 1 s unless
  set). Call before compiling; a later call with another directory moves the cache there (one process
  may run several workdirs). Returns the absolute directory."""
  directory = os.path.abspath(os.fspath(directory))
  os.makedirs(directory, exist_ok=True)
  if jax.config.jax_compilation_cache_dir != directory:
    jax.config.update("jax_compilation_cache_dir", directory)
    # JAX opens its cache once per process, at the first compilation: make it open this directory.
    compilation_cache.reset_cache()
  if min_compile_time_secs is not None:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  return directory


def disable_persistent_cache() -> None:
  if jax.config.jax_compilation_cache_dir is not None:
    jax.config.update("jax_compilation_cache_dir", None)
    compilation_cache.reset_cache()


@dataclasses.dataclass
class CacheEvents:
  """Persistent-cache lookups seen while `count_cache_events` was open."""

  hits: int = 0
  misses: int = 0


@contextlib.contextmanager
def count_cache_events() -> Iterator[CacheEvents]:
  """Counts the persistent cache's hits (a compilation loaded from disk) and misses (compiled, then
  written) inside the block, from JAX's monitoring events."""
  events = CacheEvents()

  def listener(event: str, **kwargs) -> None:
    del kwargs
    if event == HIT_EVENT:
      events.hits += 1
    elif event == MISS_EVENT:
      events.misses += 1

  jax.monitoring.register_event_listener(listener)
  try:
    yield events
  finally:
    jax.monitoring.unregister_event_listener(listener)
