"""mpt_jax/host_memory.py: with the policy set before JAX starts, a compiled step's temporaries are
reused from call to call (no page faults after the first call); the opt-out and bad values."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A step whose temporary (the [8192, 2048] float32 product, 64 MiB: over glibc's largest mmap threshold,
# 32 MiB, so glibc's defaults unmap it on free) XLA must allocate every call; the minor page faults of
# calls 3-5, after two calls that fault the memory in.
_CHILD = """
import json, resource, sys
from mpt_jax import host_memory
policy = host_memory.reuse_freed_memory()
import jax, jax.numpy as jnp
step = jax.jit(lambda a, b: jnp.sum(jnp.tanh(a @ b) @ b.T))
a, b = jnp.ones((8192, 16), jnp.float32) / 16, jnp.ones((16, 2048), jnp.float32) / 2048
for _ in range(2):
  step(a, b).block_until_ready()
faults = []
for _ in range(3):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  step(a, b).block_until_ready()
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps(dict(policy=policy, faults=faults, again=host_memory.reuse_freed_memory())))
"""


def _child(policy: str | None, code: str = _CHILD) -> dict:
  env = {k: v for k, v in os.environ.items() if k != "MPT_HOST_MALLOC"}
  if policy is not None:
    env["MPT_HOST_MALLOC"] = policy
  env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  done = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False, timeout=300
  )
  assert done.returncode == 0, done.stderr[-2000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_reuse_keeps_a_steps_temporaries_without_page_faults():
  result = _child(None)  # the default
  assert result["policy"] == result["again"] == "reuse"
  # the 64 MiB temporary is 16384 pages: faulting it in again would show thousands per call
  assert max(result["faults"]) < 500, result


def test_system_leaves_the_allocator_alone():
  result = _child("system")
  assert result["policy"] == "system"


def test_a_call_after_jax_started_says_it_came_too_late():
  late = """
import json, jax, jax.numpy as jnp
jnp.ones(3).block_until_ready()
from mpt_jax import host_memory
print(json.dumps(dict(policy=host_memory.reuse_freed_memory())))
"""
  assert _child(None, late)["policy"] in ("system (JAX had started)", "system (not glibc)")


def test_a_bad_value_names_the_variable():
  env = {**os.environ, "MPT_HOST_MALLOC": "tcmalloc", "PYTHONPATH": str(REPO)}
  code = "from mpt_jax import host_memory; host_memory.reuse_freed_memory()"
  done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)
  assert done.returncode != 0
  assert "MPT_HOST_MALLOC='tcmalloc': expected one of reuse, system" in done.stderr
