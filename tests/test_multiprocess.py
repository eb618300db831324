"""Two processes joined by `jax.distributed` (gloo collectives on CPU) run MAML upstream and the
downstream grid of a tiny T5 as one job, and end with the prompts and results of a single-process run
on as many devices: what a TPU pod slice's hosts or a SLURM job's tasks do, on one machine.

Each worker process has one CPU device, so the 2-device mesh spans both; the reference run (this
process, tests/conftest.py's 2 simulated devices) runs the same per-device programs, so the results
are bitwise equal. The training job runs as a SLURM job step does (scripts/slurm/mpt_jax.sbatch under a
stand-in srun, the processes joined by jax.distributed.initialize()'s own SLURM detection), each task
`python -m mpt_jax.main --multihost` unchanged (tests/multiprocess_worker.py adds an audit hook that
records what each process writes). The explicit flags of a TPU pod's hosts (--coordinator_address,
--num_processes, --process_id, a local coordinator) join the two processes of the held-workdir test.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import helpers_t5
from mpt_jax import config as config_lib, gyms, lease, pipeline
from test_slurm import SCRIPT, fake_slurm_env

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("fast_compile")]

REPO = Path(__file__).resolve().parents[1]
TASK = "synth-sentiment_d"
NUM_PROCESSES = 2
# The keys the workers get on the command line; the reference run sets the same ones.
OVERRIDES = {
  "setting": "synth_mini",
  "upstream.num_steps": 4,
  "upstream.checkpoint_every": 2,
  "downstream.num_steps": 4,
  "downstream.max_epochs": 0,
}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _reference_config(checkpoint: str, data_dir: str):
  config = config_lib.base_config("maml", "synth_mini", "tiny")
  config.model, config.data_dir = checkpoint, data_dir
  for key, value in OVERRIDES.items():
    *parents, name = key.split(".")
    node = config
    for parent in parents:
      node = node[parent]
    node[name] = value
  return config


def _worker_env(base: dict[str, str]) -> dict[str, str]:
  return {
    **base,
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
    "JAX_PLATFORMS": "cpu",
    # As tests/conftest.py and the fast_compile fixture set them for the reference run.
    "JAX_THREEFRY_PARTITIONABLE": "0",
    "JAX_DISABLE_MOST_OPTIMIZATIONS": "1",
  }


def _job_flags(checkpoint: str, data_dir: str, workdir: Path) -> list[str]:
  return [
    "--config=configs/maml_cls2cls.py:tiny",
    f"--workdir={workdir}",
    f"--config.model={checkpoint}",
    f"--config.data_dir={data_dir}",
    *(f"--config.{key}={value}" for key, value in OVERRIDES.items()),
  ]


def _multihost_flags(checkpoint: str, data_dir: str, workdir: Path) -> list[str]:
  """mpt_jax.main's flags for one process of the local NUM_PROCESSES-process job (without --process_id)."""
  return [
    "--multihost",
    f"--coordinator_address=localhost:{_free_port()}",
    f"--num_processes={NUM_PROCESSES}",
    *_job_flags(checkpoint, data_dir, workdir),
  ]


def _launch(
  command: Callable[[int], list[str]], env: Callable[[int], dict[str, str]], log_paths: list[Path]
) -> list[subprocess.Popen]:
  """Process i runs command(i) in env(i) from the repository root, stdout and stderr into log_paths[i]."""
  workers = []
  for i, path in enumerate(log_paths):
    with open(path, "wb") as log:  # the child keeps its own copy of the descriptor
      workers.append(subprocess.Popen(command(i), cwd=REPO, env=env(i), stdout=log, stderr=subprocess.STDOUT))
  return workers


def _wait_for(workers: list[subprocess.Popen], log_paths: list[Path]) -> list[str]:
  """Waits for every worker; one that fails leaves the others waiting on a collective for minutes, so
  they are stopped at once. Returns the logs; fails the test with them if any worker failed."""
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
  logs = [path.read_text(errors="replace") for path in log_paths]
  failed = [i for i, worker in enumerate(workers) if worker.returncode != 0]
  assert not failed, "\n".join(
    f"--- process {i} (exit {workers[i].returncode}):\n{logs[i][-5000:]}" for i in failed
  )
  return logs


def _outputs(workdir: Path) -> dict[str, object]:
  """The run's prompts (arrays) and results (JSON) by path, for comparison across runs."""
  task_dir = workdir / "downstream" / TASK
  out = {"upstream/prompt.npy": np.load(workdir / "upstream" / "prompt.npy")}
  for path in sorted((task_dir / "prompts").glob("*.npy")):
    out[str(path.relative_to(workdir))] = np.load(path)
  for name in ("downstream/" + TASK + "/results.json", "downstream/" + TASK + "/dev_curve.json"):
    out[name] = json.loads((workdir / name).read_text())
  return out


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, fast_compile):
  """The one-process run on 2 simulated devices that every multi-process run must equal bitwise."""
  root = tmp_path_factory.mktemp("multiprocess_reference")
  checkpoint = str(helpers_t5.make_tiny_checkpoint(root / "tiny_t5"))
  data_dir = gyms.data_dir("synthetic", root / "gym")
  pipeline.run(_reference_config(checkpoint, data_dir), str(root / "reference"))
  return checkpoint, data_dir, _outputs(root / "reference")


def _assert_bitwise_equal(got: dict[str, object], expected: dict[str, object]) -> None:
  assert sorted(got) == sorted(expected) and len(got) > 4
  for name in expected:
    if name.endswith(".npy"):
      np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    else:
      assert got[name] == expected[name], name


def _python_with_audit_hook(path: Path, writes_dir: Path) -> Path:
  """An executable for MPT_PYTHON: scripts/slurm/mpt_jax.sbatch runs `$MPT_PYTHON -m mpt_jax.main FLAGS`;
  this runs tests/multiprocess_worker.py (mpt_jax.main with the audit hook) with FLAGS instead, recording
  task SLURM_PROCID's writes in writes_dir/<SLURM_PROCID>.json."""
  worker = REPO / "tests" / "multiprocess_worker.py"
  path.write_text(
    "#!/usr/bin/env bash\n"
    '[ "$1 $2" = "-m mpt_jax.main" ] || { echo "expected -m mpt_jax.main, got $*" >&2; exit 2; }\n'
    f'shift 2; exec "{sys.executable}" "{worker}" "{writes_dir}/$SLURM_PROCID.json" "$@"\n'
  )
  path.chmod(0o755)
  return path


def test_two_processes_joined_by_slurms_variables_train_as_one_and_only_process_0_writes_the_runs_files(
  tmp_path, reference_run
):
  """The SLURM template under a stand-in srun: its 2 tasks join through SLURM's variables alone (no
  coordinator flags; those are the held-workdir test's below), train as one process on 2 devices would,
  bitwise, and only process 0 writes the run's own files."""
  checkpoint, data_dir, expected = reference_run
  multi, writes = tmp_path / "multi", tmp_path / "writes"
  writes.mkdir()
  env = {key: value for key, value in fake_slurm_env(tmp_path).items() if not key.startswith("SLURM_")}
  env = _worker_env(env) | {
    "MPT_PYTHON": str(_python_with_audit_hook(tmp_path / "python", writes)),
    "SLURM_SUBMIT_DIR": str(REPO),
    # what srun sets for the 2 tasks of a one-node step
    "SLURM_JOB_ID": _slurm_job_id(),
    "SLURM_STEP_NODELIST": "localhost",
    "SLURM_JOB_NODELIST": "localhost",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_NTASKS": str(NUM_PROCESSES),
  }
  log_paths = [tmp_path / f"{i}.log" for i in range(NUM_PROCESSES)]
  workers = _launch(
    lambda i: ["bash", str(SCRIPT), *_job_flags(checkpoint, data_dir, multi)],
    lambda i: env | {"SLURM_PROCID": str(i), "SLURM_LOCALID": str(i)},
    log_paths,
  )
  logs = _wait_for(workers, log_paths)
  assert "process 1 of 2" in logs[1] and "over 2 processes" in logs[0]
  _assert_bitwise_equal(_outputs(multi), expected)
  logged = [json.loads(line)["step"] for line in open(multi / "upstream" / "logs" / "metrics.jsonl")]
  assert logged == [1, 2, 3, 4]  # one writer: each step logged once

  # Process 1 wrote nothing of the run's own files; it took part in the orbax checkpoints (which
  # every process saves together) and wrote tokenization cache entries (atomically, the same bytes).
  changed = [Path(p) for p in json.load(open(writes / "1.json"))]
  in_workdir = [p.relative_to(multi) for p in changed if p.is_relative_to(multi)]
  assert in_workdir, "the audit hook saw none of process 1's checkpoint writes"
  # (The workdir itself: its cache directories are made with their parents, e.g. the compiled steps'.)
  in_workdir = [p for p in in_workdir if p != Path(".")]
  assert all(p.parts[0] == "cache" or "checkpoints" in p.parts for p in in_workdir), in_workdir
  primary = json.load(open(writes / "0.json"))  # the hook sees the primary's writes (written atomically)
  assert any(p.startswith(str(multi / "upstream" / "prompt.npy")) for p in primary)


def test_a_held_workdir_stops_both_processes_with_exit_75(tmp_path):
  """Another job holds the workdir's lease: the primary refuses and tells process 1 (parallel.primary_says),
  so both exit 75 with one FATAL line instead of process 1 waiting for the primary at the next sync."""
  checkpoint = str(helpers_t5.make_tiny_checkpoint(tmp_path / "tiny_t5"))
  data_dir = gyms.data_dir("synthetic", tmp_path / "gym")
  workdir = tmp_path / "held"
  workdir.mkdir()
  other = {"host": "tpu-w-0", "pid": 4242, "start": "2026-12-06T12:00:00Z", "heartbeat_s": time.time() + 600}
  (workdir / lease.FILE).write_text(json.dumps(other))
  flags = _multihost_flags(checkpoint, data_dir, workdir)
  log_paths = [tmp_path / f"{i}.log" for i in range(NUM_PROCESSES)]
  env = _worker_env(dict(os.environ))
  workers = _launch(
    lambda i: [sys.executable, "-m", "mpt_jax.main", *flags, f"--process_id={i}"], lambda i: env, log_paths
  )
  try:
    codes = [worker.wait(timeout=600) for worker in workers]
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.kill()
        worker.wait()
  logs = [path.read_text(errors="replace") for path in log_paths]
  assert codes == [75, 75], "\n".join(f"--- process {i}:\n{log[-3000:]}" for i, log in enumerate(logs))
  for log in logs:
    (fatal,) = [line for line in log.splitlines() if line.startswith("FATAL")]
    assert fatal.startswith(f"FATAL WorkdirBusy: workdir {workdir} is in use by another job (host tpu-w-0")
    assert "Traceback" not in log
  assert (
    sorted(os.listdir(workdir)) == [lease.FILE] and json.loads((workdir / lease.FILE).read_text()) == other
  )


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
