"""Test-wide settings: offline hub, CPU JAX with 2 simulated devices (for the sharded-step tests); the
shared fixtures of tests/helpers_t5.py (tiny checkpoints and tokenizer, fast compilation)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# PyTorch (the parity references) on tiny models: one thread avoids oversubscribing the cores XLA uses.
os.environ.setdefault("OMP_NUM_THREADS", "1")
if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"
  ).strip()

# One persistent compilation cache for the whole test run (both xdist workers inherit the controller's
# directory): the many tiny pipeline runs of the suite compile the same steps, and a program compiled by one
# test is loaded by the next instead of compiled again (the cache is keyed by the program, its devices and
# the compiler's flags: the same executable either way). `bash launch.sh test` gives each run a new one.
if "MPT_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["MPT_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="mpt-jax-test-compiled-")
  atexit.register(shutil.rmtree, os.environ["MPT_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

# Tests use tiny models, where compiling dominates. The non-partitionable threefry compiles dropout's
# random bits about 3x faster on CPU (measured); the programs under test are otherwise the same.
import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", False)
jax.config.update("jax_compilation_cache_dir", os.environ["MPT_COMPILATION_CACHE_DIR"])

# Fixtures every test module may use by name (defined in helpers_t5, registered here).
from helpers_t5 import fast_compile, hf_t5_v10_dir, hf_t5_v11_dir, tiny_tokenizer_dir  # noqa: E402,F401
