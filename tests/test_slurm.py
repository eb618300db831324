"""GPU clusters through SLURM: `bash launch.sh slurm` checks the job's flags locally and submits
scripts/slurm/mpt_jax.sbatch (a stand-in sbatch records the call); the sbatch script runs
`srun ... python -m mpt_jax.main --multihost FLAGS` and is requeued on preemption. That two local processes
given SLURM's variables (as srun sets them on one node) join through jax.distributed.initialize()'s own
SLURM detection and reproduce the one-process run bitwise is tested in tests/test_multiprocess.py, beside
the flag-joined processes, against the same reference run.

Not run here: a real SLURM cluster, GPUs, NCCL, a requeue by SLURM.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

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


def fake_slurm_env(root: Path) -> dict[str, str]:
  """This environment with stand-in sbatch and srun (under ROOT/bin) that log to ROOT."""
  bin_dir = root / "bin"
  bin_dir.mkdir()
  for name, text in (("sbatch", FAKE_SBATCH), ("srun", FAKE_SRUN)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = {**os.environ, "FAKE_SLURM": str(root), "SBATCH": str(bin_dir / "sbatch")}
  env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
  return env


@pytest.fixture
def fake_slurm(tmp_path):
  return tmp_path, fake_slurm_env(tmp_path)


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


def _run_template(root: Path, env: dict[str, str], python_body: str, **extra: str):
  """The template under the stand-in srun, with a stand-in python whose body is `python_body`."""
  fake_python = root / "bin" / "python"
  fake_python.write_text("#!/usr/bin/env bash\n" + python_body)
  fake_python.chmod(0o755)
  return subprocess.run(
    ["bash", str(SCRIPT), *JOB],
    cwd=REPO,
    env=env
    | {"MPT_PYTHON": str(fake_python), "SLURM_SUBMIT_DIR": str(REPO), "MPT_BUSY_RETRY_S": "0"}
    | extra,
    capture_output=True,
    text=True,
    timeout=60,
  )


# Exits 75 (another job holds the workdir: mpt_jax/main.py) its first $BUSY_TIMES runs, then runs.
BUSY_PYTHON = """n=$(cat "$FAKE_SLURM/runs" 2>/dev/null || echo 0); echo $((n + 1)) > "$FAKE_SLURM/runs"
if [ "$n" -lt "$BUSY_TIMES" ]; then echo "FATAL WorkdirBusy: workdir ... is in use by another job" >&2; exit 75; fi
echo "python $*"
"""


def test_the_template_retries_while_another_job_holds_the_workdir(fake_slurm):
  root, env = fake_slurm
  done = _run_template(root, env, BUSY_PYTHON, BUSY_TIMES="2")
  assert done.returncode == 0, done.stderr
  assert len((root / "srun.log").read_text().splitlines()) == 3  # twice refused, then run
  assert [line for line in done.stdout.splitlines() if "retry" in line][1].endswith(
    "another job holds the workdir (exit 75): retry 2 of 30 in 0 s (MPT_BUSY_RETRY_S)"
  )
  assert done.stdout.splitlines()[-1] == "python -m mpt_jax.main --multihost " + " ".join(JOB)


def test_the_template_gives_up_after_its_retries_and_does_not_retry_other_errors(fake_slurm):
  root, env = fake_slurm
  done = _run_template(root, env, BUSY_PYTHON, BUSY_TIMES="99", MPT_BUSY_RETRIES="2")
  assert done.returncode == 75 and "still another job's after 2 retries" in done.stderr
  assert len((root / "srun.log").read_text().splitlines()) == 3
  (root / "srun.log").unlink()
  failed = _run_template(root, env, 'echo "FATAL ConfigError: ..." >&2; exit 1\n')
  assert failed.returncode == 1 and len((root / "srun.log").read_text().splitlines()) == 1
