"""`bash launch.sh tpu`: the commands it generates (--dry-run), and `watch` surviving a preemption
against a stand-in for gcloud that keeps a "TPU VM" on this machine (one home directory per worker; ssh
runs the command there, create/delete make and wipe them) with a stand-in job that checkpoints to a
stand-in bucket: the VM is preempted mid-run, `watch` recreates it, ships the code again, reruns the
same command, and the job resumes from its checkpoint and finishes on every worker.

Not run here: a real TPU, gcloud, GCS, and the real setup (apt, pip of jax[tpu] and gcsfs) on a worker.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = ["--config=configs/maml_cls2cls.py", "--workdir=gs://b/runs/maml", "--config.downstream.tasks=('a b',)"]

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# `gcloud compute tpus tpu-vm ACTION ...` on this machine: the VM is $FAKE_TPU/vm, worker i's disk is
# $FAKE_TPU/vm/w<i> (its home), its state is $FAKE_TPU/vm/state.
set -u
echo "$*" >> "$FAKE_TPU/calls.log"
shift 3
action="$1"; shift
vm="$FAKE_TPU/vm"; worker=all; command=""; rest=()
for a; do
  case "$a" in
    --worker=*) worker="${a#*=}";; --command=*) command="${a#*=}";;
    --zone=*|--quiet|--format=*|--accelerator-type=*|--version=*) ;;
    *) rest+=("$a");;
  esac
done
workers() { if [ "$worker" = all ]; then seq 0 $((FAKE_TPU_WORKERS - 1)); else echo "$worker"; fi; }
kill_jobs() { for f in "$vm"/w*/mpt-jax/logs/pid; do [ -f "$f" ] && kill -- -"$(cat "$f")" 2>/dev/null; done; true; }
case "$action" in
  describe) [ -d "$vm" ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }; cat "$vm/state";;
  create) [ -d "$vm" ] && exit 1
    for i in $(seq 0 $((FAKE_TPU_WORKERS - 1))); do mkdir -p "$vm/w$i"; done; echo READY > "$vm/state";;
  delete) kill_jobs; rm -rf "$vm";;
  scp) dest="${rest[1]#*:}"; for i in $(workers); do cp "${rest[0]}" "$vm/w$i/${dest#\~/}"; done;;
  ssh) for i in $(workers); do (cd "$vm/w$i" && HOME="$vm/w$i" bash -c "$command"); done;;
  *) exit 2;;
esac
"""

FAKE_JOB = r"""#!/usr/bin/env bash
# `python -m mpt_jax.main --multihost ...` on a worker: 4 steps, each checkpointed to the stand-in bucket
# under the workdir; worker 0's first run is preempted at step 2 (the VM's state and its jobs go).
for a; do case "$a" in --workdir=*) workdir="${a#*=}";; esac; done
echo "args: $*"
[ -n "${FAKE_JOB_FAILS:-}" ] && { echo "ConfigError: a bad flag"; exit 3; }
ckpt="$FAKE_TPU/bucket/${workdir#gs://}/$(basename "$HOME").step"
mkdir -p "$(dirname "$ckpt")"
step=$(cat "$ckpt" 2>/dev/null || echo 0)
echo "resuming from step $step"
while [ "$step" -lt 4 ]; do
  step=$((step + 1)); echo "$step" > "$ckpt"; echo "step $step"
  if [ "$step" = 2 ] && [ "$(basename "$HOME")" = w0 ] && [ ! -e "$FAKE_TPU/preempted" ]; then
    touch "$FAKE_TPU/preempted"; echo PREEMPTED > "$FAKE_TPU/vm/state"
    for f in "$FAKE_TPU"/vm/w*/mpt-jax/logs/pid; do [ -f "$f" ] && kill -- -"$(cat "$f")" 2>/dev/null; done
    sleep 30
  fi
  sleep 0.2
done
echo finished
"""


@pytest.fixture
def fake_tpu(tmp_path):
  """The environment of a launch.sh against the stand-in gcloud and job (2 workers)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  for name, text in (("gcloud", FAKE_GCLOUD), ("fake_job", FAKE_JOB)):
    (bin_dir / name).write_text(text)
    (bin_dir / name).chmod(0o755)
  env = {
    **os.environ,
    "FAKE_TPU": str(tmp_path),
    "FAKE_TPU_WORKERS": "2",
    "GCLOUD": str(bin_dir / "gcloud"),
    "MPT_TPU_SETUP": "true",  # the real setup (apt, pip) is what cannot run here
    "MPT_TPU_PYTHON": str(bin_dir / "fake_job"),
  }
  return tmp_path, env


def launch(env, *args, timeout=120):
  return subprocess.run(
    ["bash", "launch.sh", "tpu", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )


def test_dry_run_prints_create_ship_setup_and_a_detached_start(fake_tpu):
  _, env = fake_tpu
  done = launch(env | {"MPT_TPU_SETUP": ""}, "start", "--name=mpt", "--zone=us-central2-b",
                "--accelerator=v4-32", "--create", "--dry-run", "--", *JOB)  # fmt: skip
  assert done.returncode == 0, done.stderr
  lines = done.stdout.splitlines()
  assert lines[0].startswith("git archive --format=tar.gz")
  assert "tpu-vm create mpt --zone=us-central2-b --accelerator-type=v4-32" in lines[1]
  assert "tpu-vm scp" in lines[2] and "--worker=all" in lines[2]
  assert "jax\\[tpu\\]==0.10.2" in lines[3] and "gcsfs==" in lines[3]  # the setup, on every worker
  assert "kill\\ --\\ -" in lines[4]  # a job left from before is stopped first
  start = lines[5]
  assert "--worker=all" in start and "setsid nohup bash job.sh >> logs/job.log" in start
  assert "-m mpt_jax.main --multihost --config=configs/maml_cls2cls.py --workdir=gs://b/runs/maml" in start
  assert not any("--recurse" in line for line in lines)  # nothing is copied back: results are on GCS
  assert not os.path.exists(REPO / "gs:")


def test_logs_status_and_stop_address_the_workers(fake_tpu):
  _, env = fake_tpu
  logs = launch(env, "logs", "--name=mpt", "--zone=z", "--worker=1", "--follow", "--dry-run").stdout
  assert "--worker=1" in logs and "tail\\ -n\\ 200\\ -F\\ ~/mpt-jax/logs/job.log" in logs
  assert "echo\\ running" in launch(env, "status", "--name=mpt", "--zone=z", "--dry-run").stdout
  assert "kill\\ --\\ -" in launch(env, "stop", "--name=mpt", "--zone=z", "--dry-run").stdout


def test_a_workdir_off_gcs_is_refused_it_would_not_survive_the_vm(fake_tpu):
  _, env = fake_tpu
  done = launch(env, "start", "--name=mpt", "--zone=z", "--dry-run", "--", "--workdir=runs/x")
  assert done.returncode == 2 and "--workdir=runs/x is not on GCS" in done.stderr
  allowed = launch(
    env, "start", "--name=mpt", "--zone=z", "--dry-run", "--allow-local-workdir", "--", "--workdir=runs/x"
  )
  assert allowed.returncode == 0, allowed.stderr
  assert launch(env, "nonsense").returncode == 2


def test_watch_recreates_a_preempted_vm_and_the_same_command_resumes(fake_tpu):
  root, env = fake_tpu
  args = ["--name=mpt", "--zone=z", "--accelerator=v4-16", "--create", "--poll=0.3"]
  done = launch(env, "watch", *args, "--", *JOB, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "VM mpt is PREEMPTED" in done.stderr and "finished on every worker" in done.stderr
  calls = (root / "calls.log").read_text().splitlines()
  assert sum(" create mpt " in c for c in calls) == 2 and sum(" delete mpt " in c for c in calls) == 1
  assert all("--accelerator-type=v4-16" in c for c in calls if " create " in c)
  starts = [c for c in calls if "job.sh <<" in c]
  assert len(starts) >= 2 and len(set(starts)) == 1  # the same command every time
  for worker in ("w0", "w1"):
    job = (root / "vm" / worker / "mpt-jax" / "job.sh").read_text()
    assert re.search(r"fake_job -m mpt_jax\.main --multihost --config=configs/maml_cls2cls\.py", job)
    assert (root / "bucket" / "b" / "runs" / "maml" / f"{worker}.step").read_text().strip() == "4"
  log = (root / "vm" / "w0" / "mpt-jax" / "logs" / "job.log").read_text()  # the recreated VM's
  assert "resuming from step 2" in log and "finished" in log
  assert (
    "args: -m mpt_jax.main --multihost --config=configs/maml_cls2cls.py --workdir=gs://b/runs/maml --config.downstream.tasks=('a b',)"
    in log
  )
  status = launch(env, "status", "--name=mpt", "--zone=z")
  assert status.stdout.split() == ["done", "0", "done", "0"]


def test_watch_does_not_rerun_a_job_that_failed_by_itself(fake_tpu):
  """Exit 3 on every worker (e.g. a config error) is the job's own failure, not a preemption."""
  root, env = fake_tpu
  args = ["--name=mpt", "--zone=z", "--create", "--poll=0.3"]
  done = launch(env | {"FAKE_JOB_FAILS": "1"}, "watch", *args, "--", *JOB)
  assert (
    done.returncode == 1
    and "exited with an error on every worker (done 3 done 3 ); not restarting" in done.stderr
  )
  assert sum("job.sh <<" in c for c in (root / "calls.log").read_text().splitlines()) == 1
