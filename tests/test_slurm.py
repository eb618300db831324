"""GPU clusters through SLURM: `bash launch.sh slurm` checks the job's flags locally and submits
scripts/slurm/mpt_jax.sbatch (a stand-in sbatch records the call); the sbatch script runs
`srun ... python -m mpt_jax.main --multihost FLAGS` and is requeued on preemption; and two local processes
given SLURM's variables (as srun sets them on one node) join through jax.distributed.initialize()'s own
SLURM detection and reproduce the one-process run bitwise, as tests/test_multiprocess.py does with flags.

Not run here: a real SLURM cluster, GPUs, NCCL, a requeue by SLURM.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import helpers_t5
from mpt_jax import gyms, pipeline
from test_multiprocess import OVERRIDES, _outputs, _reference_config

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "slurm" / "mpt_jax.sbatch"
JOB = [
  "--config=configs/maml_cls2cls.py",
  "--workdir=/shared/runs/maml",
  "--config.data_dir=/shared/crossfit",
]

FAKE_SBATCH = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM/sbatch.log"; echo "Submitted batch job 42"
"""
FAKE_SRUN = """#!/usr/bin/env bash
# srun on one node: the task (its options dropped) runs here, as SLURM_PROCID says
echo "$*" >> "$FAKE_SLURM/srun.log"
while [ "${1:-}" != "${1#--}" ]; do shift; done
exec "$@"
"""


@pytest.fixture
def fake_slurm(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = {**os.environ, "FAKE_SLURM": str(tmp_path), "SBATCH": str(bin_dir / "sbatch")}
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  return tmp_path, env


def slurm(env, *args):
  return subprocess.run(
    ["bash", "launch.sh", "slurm", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
  )


def test_launch_checks_the_flags_then_submits_the_template(fake_slurm):
  root, env = fake_slurm
  done = slurm(env, "--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--sbatch=--qos=high", "--", *JOB)
  assert done.returncode == 0, done.stderr
  assert "job flags: valid" in done.stderr
  (call,) = (root / "sbatch.log").read_text().splitlines()
  assert call == (
    "--nodes=2 --ntasks-per-node=8 --gres=gpu:8 --partition=gpu --qos=high scripts/slurm/mpt_jax.sbatch "
    + " ".join(JOB)
  )
  dry = slurm(env, "--dry-run", "--skip-validation", "--", *JOB)
  assert dry.stdout.startswith(f"{env['SBATCH']} --nodes=1 --ntasks-per-node=8 --gres=gpu:8 scripts/slurm/")


def test_a_config_typo_is_refused_before_sbatch(fake_slurm):
  root, env = fake_slurm
  done = slurm(env, "--", *JOB, "--config.upstream.lrr=1")
  assert done.returncode == 2 and "config.upstream.lrr: no such key" in done.stderr
  assert "nothing was submitted" in done.stderr and not (root / "sbatch.log").exists()
  assert slurm(env, "--", "--config=configs/maml_cls2cls.py").returncode == 2  # no workdir


def test_the_template_requeues_and_runs_one_multihost_process_per_task(fake_slurm):
  root, env = fake_slurm
  text = SCRIPT.read_text()
  for line in (
    "#SBATCH --requeue",
    "#SBATCH --ntasks-per-node=8",
    "#SBATCH --gres=gpu:8",
    "--open-mode=append",
  ):
    assert line in text
  fake_python = root / "bin" / "python"
  fake_python.write_text('#!/usr/bin/env bash\necho "python $*"\n')
  fake_python.chmod(0o755)
  done = subprocess.run(
    ["bash", str(SCRIPT), *JOB],
    cwd=REPO,
    env=env | {"MPT_PYTHON": str(fake_python), "SLURM_SUBMIT_DIR": str(REPO)},
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert done.returncode == 0, done.stderr
  assert (root / "srun.log").read_text().startswith("--kill-on-bad-exit=1 ")
  assert done.stdout.splitlines()[-1] == "python -m mpt_jax.main --multihost " + " ".join(JOB)


def _slurm_job_id() -> str:
  """A job id whose port (jax's SlurmCluster: 61440 + id % 4096) is free here."""
  for _ in range(50):
    with socket.socket() as s:
      port = 61440 + int.from_bytes(os.urandom(2), "big") % 4096
      try:
        s.bind(("localhost", port))
      except OSError:
        continue
    return str(4096 * 30 + port - 61440)
  raise RuntimeError("no free port in 61440-65535")


@pytest.mark.slow
@pytest.mark.usefixtures("fast_compile")
def test_two_processes_given_slurms_variables_reproduce_one_process_bitwise(fake_slurm):
  root, env = fake_slurm
  checkpoint = str(helpers_t5.make_tiny_checkpoint(root / "tiny_t5"))
  data_dir = gyms.data_dir("synthetic", root / "gym")
  reference, multi = root / "reference", root / "multi"
  pipeline.run(_reference_config(checkpoint, data_dir), str(reference))

  flags = [
    "--config=configs/maml_cls2cls.py:tiny",
    f"--workdir={multi}",
    f"--config.model={checkpoint}",
    f"--config.data_dir={data_dir}",
    *(f"--config.{key}={value}" for key, value in OVERRIDES.items()),
  ]
  env = {key: value for key, value in env.items() if not key.startswith("SLURM_")}
  env |= {
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "JAX_PLATFORMS": "cpu",
    "JAX_THREEFRY_PARTITIONABLE": "0",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
    "MPT_PYTHON": sys.executable,
    "SLURM_SUBMIT_DIR": str(REPO),
    # what srun sets for the 2 tasks of a one-node step
    "SLURM_JOB_ID": _slurm_job_id(),
    "SLURM_STEP_NODELIST": "localhost",
    "SLURM_JOB_NODELIST": "localhost",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_NTASKS": "2",
  }
  logs = [open(root / f"{i}.log", "wb") for i in range(2)]
  workers = [
    subprocess.Popen(
      ["bash", str(SCRIPT), *flags],
      cwd=REPO,
      env=env | {"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
      stdout=log,
      stderr=subprocess.STDOUT,
    )
    for i, log in enumerate(logs)
  ]
  deadline = time.monotonic() + 900
  try:
    while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
      if any(w.poll() not in (None, 0) for w in workers):
        break
      time.sleep(1)
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
    for log in logs:
      log.close()
  text = [(root / f"{i}.log").read_text(errors="replace") for i in range(2)]
  assert all(w.returncode == 0 for w in workers), "\n".join(t[-4000:] for t in text)
  assert "process 1 of 2" in text[1]  # joined through SLURM's variables, no coordinator flags

  expected, got = _outputs(reference), _outputs(multi)
  assert sorted(got) == sorted(expected) and len(got) > 4
  for name in expected:
    if name.endswith(".npy"):
      np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    else:
      assert got[name] == expected[name], name
