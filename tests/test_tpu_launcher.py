"""`bash launch.sh tpu`: the commands it generates (--dry-run: a queued resource by default, its runtime
per accelerator, --project and the network flags on every call, the job's flags checked locally first),
and `watch` surviving a preemption against a stand-in for gcloud that keeps a "TPU VM" on this machine
(one home directory per worker; ssh runs the command there; a queued resource waits, turns ACTIVE, and
SUSPENDED when its node is preempted) with a stand-in job that checkpoints to a stand-in bucket: the VM
is preempted mid-run, `watch` deletes and requests it again, ships the code again, reruns the same
command, and the job resumes from its checkpoint and finishes on every worker.

Not run here: a real TPU, gcloud, GCS, and the real setup (apt, pip of jax[tpu] and gcsfs) on a worker."""

from __future__ import annotations

import os
import re
import time
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
JOB = ["--config=configs/maml_cls2cls.py", "--workdir=gs://b/runs/maml", "--config.data_dir=gs://b/my data"]

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# `gcloud [alpha] compute tpus {tpu-vm|queued-resources} ACTION ...` on this machine: the VM (the queued
# resource's node, or a direct VM) is $FAKE_TPU/vm, worker i's disk is $FAKE_TPU/vm/w<i> (its home), its
# state is $FAKE_TPU/vm/state; a queued resource is $FAKE_TPU/qr, WAITING_FOR_RESOURCES for its first
# $FAKE_TPU_WAITS describes, then ACTIVE, SUSPENDED once its node is preempted.
set -u
echo "$*" >> "$FAKE_TPU/calls.log"
if [ "$1" = storage ]; then  # storage cp --quiet SRC gs://DST: into the stand-in bucket
  dst="$FAKE_TPU/bucket/${5#gs://}"; mkdir -p "$(dirname "$dst")"; cp "$4" "$dst"; exit
fi
[ "$1" = alpha ] && shift
group="$3"; action="$4"; shift 4
vm="$FAKE_TPU/vm"; qr="$FAKE_TPU/qr"; worker=all; command=""; rest=()
for a; do
  case "$a" in
    --worker=*) worker="${a#*=}";; --command=*) command="${a#*=}";;
    --*) ;;
    *) rest+=("$a");;
  esac
done
workers() { if [ "$worker" = all ]; then seq 0 $((FAKE_TPU_WORKERS - 1)); else echo "$worker"; fi; }
kill_jobs() { for f in "$vm"/w*/mpt-jax/logs/pid; do [ -f "$f" ] && kill -- -"$(cat "$f")" 2>/dev/null; done; true; }
make_vm() { for i in $(seq 0 $((FAKE_TPU_WORKERS - 1))); do mkdir -p "$vm/w$i"; done; echo READY > "$vm/state"; }
case "$group $action" in
  "queued-resources describe") [ -d "$qr" ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }
    waits=$(cat "$qr/waits"); if [ "$waits" -gt 0 ]; then echo $((waits - 1)) > "$qr/waits"
      echo WAITING_FOR_RESOURCES; elif [ "$(cat "$vm/state")" = PREEMPTED ]; then echo SUSPENDED
    else echo ACTIVE; fi;;
  "queued-resources create") [ -d "$qr" ] && exit 1
    mkdir -p "$qr"; echo "${FAKE_TPU_WAITS:-0}" > "$qr/waits"; make_vm;;
  "queued-resources delete") kill_jobs; rm -rf "$vm" "$qr";;
  "tpu-vm describe") [ -d "$vm" ] || { echo "ERROR: NOT_FOUND" >&2; exit 1; }; cat "$vm/state";;
  "tpu-vm create") [ -d "$vm" ] && exit 1; make_vm;;
  "tpu-vm delete") kill_jobs; rm -rf "$vm";;
  "tpu-vm scp") dest="${rest[1]#*:}"; for i in $(workers); do cp "${rest[0]}" "$vm/w$i/${dest#\~/}"; done;;
  "tpu-vm ssh") for i in $(workers); do (cd "$vm/w$i" && HOME="$vm/w$i" bash -c "$command"); done;;
  *) exit 2;;
esac
"""

FAKE_JOB = r"""#!/usr/bin/env bash
# `python -m mpt_jax.main --multihost ...` on a worker: 4 steps, each checkpointed to the stand-in bucket
# under the workdir; worker 0's first run is preempted at step 2 (the VM's state and its jobs go).
for a; do case "$a" in --workdir=*) workdir="${a#*=}";; esac; done
echo "args: $*"
[ -n "${FAKE_JOB_FAILS:-}" ] && { echo "ConfigError: a bad flag"; exit 3; }
busy="$FAKE_TPU/busy_$(basename "$HOME")"  # another job holds the workdir for this worker's first N runs
n=$(cat "$busy" 2>/dev/null || echo 0)
if [ "$n" -lt "${FAKE_JOB_BUSY:-0}" ]; then
  echo $((n + 1)) > "$busy"; echo "FATAL WorkdirBusy: workdir $workdir is in use by another job"; exit 75
fi
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
    "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",  # the workers' gcloud (log upload) too
    "MPT_TPU_SETUP": "true",  # the real setup (apt, pip) is what cannot run here
    "MPT_TPU_PYTHON": str(bin_dir / "fake_job"),
  }
  return tmp_path, env


def launch(env, *args, timeout=120):
  return subprocess.run(
    ["bash", "launch.sh", "tpu", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )


def gcloud_lines(text):
  return [line for line in text.splitlines() if "compute tpus" in line]


def test_dry_run_queues_a_resource_waits_for_it_ships_sets_up_and_starts_detached(fake_tpu):
  _, env = fake_tpu
  done = launch(env | {"MPT_TPU_SETUP": ""}, "start", "--name=mpt", "--zone=us-central2-b",
                "--accelerator=v4-32", "--create", "--dry-run", "--", *JOB)  # fmt: skip
  assert done.returncode == 0, done.stderr
  assert "job flags: valid" in done.stderr  # checked here first
  lines = done.stdout.splitlines()
  assert lines[0].startswith("git archive --format=tar.gz")
  assert (
    "compute tpus queued-resources create mpt --node-id=mpt --zone=us-central2-b --accelerator-type=v4-32"
    " --runtime-version=tpu-ubuntu2204-base" in lines[1]
  )
  assert "queued-resources describe mpt --zone=us-central2-b --format=value\\(state.state\\)" in lines[2]
  assert "tpu-vm scp" in lines[3] and "--worker=all" in lines[3]
  assert "jax\\[tpu\\]==0.10.2" in lines[4] and "gcsfs==" in lines[4]  # the setup, on every worker
  assert "kill\\ --\\ -" in lines[5]  # a job left from before is stopped first
  start = lines[6]
  assert "--worker=all" in start and "setsid nohup bash job.sh >> logs/job.log" in start
  assert "-m mpt_jax.main --multihost --config=configs/maml_cls2cls.py --workdir=gs://b/runs/maml" in start
  assert not any("--recurse" in line for line in lines)  # nothing is copied back: results are on GCS
  assert not os.path.exists(REPO / "gs:")


def test_direct_keeps_tpu_vm_create(fake_tpu):
  _, env = fake_tpu
  done = launch(env, "start", "--name=mpt", "--zone=z", "--accelerator=v4-8", "--create", "--direct",
                "--spot", "--dry-run", "--skip-validation", "--", *JOB)  # fmt: skip
  assert done.returncode == 0, done.stderr
  calls = gcloud_lines(done.stdout)
  assert "tpu-vm create mpt --zone=z --accelerator-type=v4-8 --version=tpu-ubuntu2204-base --spot" in calls[0]
  assert not any("queued-resources" in c for c in calls)
  assert launch(env, "start", "--name=mpt", "--zone=z", "--direct", "--best-effort").returncode == 2


@pytest.mark.parametrize(
  "accelerator, runtime",
  [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-8", "v2-alpha-tpuv6e"),
  ],
)
def test_the_runtime_follows_the_accelerator(fake_tpu, accelerator, runtime):
  _, env = fake_tpu
  done = launch(env, "start", "--name=mpt", "--zone=z", f"--accelerator={accelerator}", "--create",
                "--dry-run", "--skip-validation", "--", *JOB)  # fmt: skip
  assert done.returncode == 0, done.stderr
  create = gcloud_lines(done.stdout)[0]
  assert f"--accelerator-type={accelerator} --runtime-version={runtime}" in create
  given = launch(env, "start", "--name=mpt", "--zone=z", f"--accelerator={accelerator}", "--version=mine",
                 "--create", "--dry-run", "--skip-validation", "--", *JOB)  # fmt: skip
  assert "--runtime-version=mine" in gcloud_lines(given.stdout)[0]


def test_an_unknown_accelerator_is_refused_before_any_call(fake_tpu):
  root, env = fake_tpu
  done = launch(env, "start", "--name=mpt", "--zone=z", "--accelerator=v9x-8", "--create", "--", *JOB)
  assert done.returncode == 2 and "no runtime known for --accelerator=v9x-8" in done.stderr
  assert "--version=RUNTIME" in done.stderr and not (root / "calls.log").exists()


def test_project_and_network_flags_reach_every_gcloud_call(fake_tpu):
  _, env = fake_tpu
  base = ["--name=mpt", "--zone=z", "--project=p", "--create", "--dry-run", "--skip-validation"]
  watch = launch(env, "watch", *base, "--spot", "--tunnel-through-iap", "--", *JOB)
  assert watch.returncode == 0, watch.stderr
  calls = gcloud_lines(watch.stdout)
  assert {c.split()[4] for c in calls} >= {"describe", "delete", "create", "scp", "ssh"}
  assert all("--project=p" in c for c in calls)
  assert all("--tunnel-through-iap" in c for c in calls if " ssh " in c or " scp " in c)
  assert "queued-resources delete mpt --zone=z --project=p --force --quiet" in watch.stdout
  assert " --spot --metadata-from-file=startup-script=" in [c for c in calls if " create " in c][0]
  internal = launch(env, "start", *base, "--best-effort", "--internal-ip", "--", *JOB).stdout
  calls = gcloud_lines(internal)
  assert (
    "alpha compute tpus queued-resources create" in calls[0] and "--best-effort --internal-ips" in calls[0]
  )
  assert all("--project=p" in c for c in calls)
  assert all("--internal-ip" in c for c in calls if " ssh " in c or " scp " in c)
  for action in ("status", "stop", "logs", "delete"):
    out = launch(env, action, "--name=mpt", "--zone=z", "--project=p", "--dry-run").stdout
    assert gcloud_lines(out) and all("--project=p" in c for c in gcloud_lines(out)), (action, out)
  assert "queued-resources delete mpt" in launch(env, "delete", "--name=mpt", "--zone=z", "--dry-run").stdout


def test_a_config_typo_is_refused_before_the_first_gcloud_call(fake_tpu):
  root, env = fake_tpu
  done = launch(env, "start", "--name=mpt", "--zone=z", "--create", "--", *JOB, "--config.upstream.lrr=1")
  assert done.returncode == 2, done.stderr
  assert "config.upstream.lrr: no such key (did you mean 'upstream.lr'" in done.stderr
  assert "nothing was created" in done.stderr and not (root / "calls.log").exists()


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
  allowed = launch(env, "start", "--name=mpt", "--zone=z", "--dry-run", "--allow-local-workdir",
                   "--skip-validation", "--", "--workdir=runs/x")  # fmt: skip
  assert allowed.returncode == 0, allowed.stderr
  assert launch(env, "nonsense").returncode == 2


def check_the_job_resumed_everywhere(root, calls):
  starts = [c for c in calls if "job.sh <<" in c]
  assert len(starts) >= 2 and len(set(starts)) == 1  # the same command every time
  for worker in ("w0", "w1"):
    job = (root / "vm" / worker / "mpt-jax" / "job.sh").read_text()
    assert re.search(r"fake_job -m mpt_jax\.main --multihost --config=configs/maml_cls2cls\.py", job)
    assert (root / "bucket" / "b" / "runs" / "maml" / f"{worker}.step").read_text().strip() == "4"
  log = (root / "vm" / "w0" / "mpt-jax" / "logs" / "job.log").read_text()  # the recreated VM's
  assert "resuming from step 2" in log and "finished" in log
  assert (
    "args: -m mpt_jax.main --multihost --config=configs/maml_cls2cls.py --workdir=gs://b/runs/maml"
    " --config.data_dir=gs://b/my data" in log
  )


def test_watch_recreates_a_preempted_queued_resource_and_the_same_command_resumes(fake_tpu):
  root, env = fake_tpu
  args = ["--name=mpt", "--zone=z", "--project=p", "--accelerator=v5litepod-16", "--spot", "--create",
          "--poll=0.3"]  # fmt: skip
  done = launch(env | {"FAKE_TPU_WAITS": "2"}, "watch", *args, "--", *JOB, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "mpt is WAITING_FOR_RESOURCES" in done.stderr  # queued, waited for
  assert "mpt is SUSPENDED" in done.stderr and "finished on every worker" in done.stderr
  calls = (root / "calls.log").read_text().splitlines()
  assert all("--project=p" in c for c in calls if c.startswith(("compute ", "alpha ")))  # (not the heredocs)
  creates = [c for c in calls if "queued-resources create mpt " in c]
  assert len(creates) == 2 and sum("queued-resources delete mpt " in c and "--force" in c for c in calls) == 1
  assert all("--runtime-version=v2-alpha-tpuv5-lite --spot" in c for c in creates)
  assert not any("tpu-vm create" in c for c in calls)
  check_the_job_resumed_everywhere(root, calls)
  status = launch(env, "status", "--name=mpt", "--zone=z", "--project=p")
  assert status.stdout.split() == ["done", "0", "done", "0"] and "mpt is READY" in status.stderr


def test_watch_direct_recreates_a_preempted_vm(fake_tpu):
  root, env = fake_tpu
  args = ["--name=mpt", "--zone=z", "--accelerator=v4-16", "--direct", "--create", "--poll=0.3"]
  done = launch(env, "watch", *args, "--skip-validation", "--", *JOB, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert "mpt is PREEMPTED" in done.stderr and "finished on every worker" in done.stderr
  calls = (root / "calls.log").read_text().splitlines()
  assert (
    sum(" tpu-vm create mpt " in c for c in calls) == 2
    and sum(" tpu-vm delete mpt " in c for c in calls) == 1
  )
  assert all("--accelerator-type=v4-16" in c for c in calls if " create " in c)
  check_the_job_resumed_everywhere(root, calls)


def test_watch_does_not_rerun_a_job_that_failed_by_itself(fake_tpu):
  """Exit 3 on every worker (e.g. a config error) is the job's own failure, not a preemption."""
  root, env = fake_tpu
  args = ["--name=mpt", "--zone=z", "--create", "--poll=0.3", "--skip-validation"]
  done = launch(env | {"FAKE_JOB_FAILS": "1"}, "watch", *args, "--", *JOB)
  assert (
    done.returncode == 1
    and "exited with an error on every worker (done 3 done 3 ); not restarting" in done.stderr
  )
  assert sum("job.sh <<" in c for c in (root / "calls.log").read_text().splitlines()) == 1


def test_the_startup_script_restarts_an_unfinished_job_and_the_log_goes_to_the_workdir(fake_tpu):
  root, env = fake_tpu
  args = ["--name=mpt", "--zone=z", "--create", "--poll=0.3", "--skip-validation"]
  done = launch(env | {"MPT_TPU_LOG_UPLOAD_S": "0.2"}, "watch", *args, "--direct", "--", *JOB)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  calls = (root / "calls.log").read_text().splitlines()
  (create,) = [c for c in calls if " create mpt " in c][:1]
  startup = Path(create.split("--metadata-from-file=startup-script=")[1].split()[0]).read_text()
  assert "test -f job.sh && ! test -f logs/exit || exit 0" in startup
  assert "setsid nohup bash job.sh >> logs/job.log" in startup
  job = (root / "vm" / "w0" / "mpt-jax" / "job.sh").read_text()
  assert "instance/attributes/agent-worker-number" in job  # the worker's index, from the metadata server
  upload = "gcloud storage cp --quiet logs/job.log gs://b/runs/maml/logs/worker_$worker.log"
  assert f"do {upload}" in job and f"kill $uploader; {upload}" in job  # every 0.2 s, and at the end
  uploaded = (root / "bucket" / "b" / "runs" / "maml" / "logs" / "worker_0.log").read_text()
  assert "starts ~/mpt-jax/job.sh" in uploaded and "finished" in uploaded  # readable without the VM
  # Rebooted with the job unfinished: the startup script (run as root at boot) starts it again.
  worker = root / "vm" / "w1"
  (worker / "mpt-jax" / "logs" / "exit").unlink()
  script = startup.replace("sudo -u", "env -u").replace('"$(getent passwd', f'"{worker}" #')
  subprocess.run(["bash", "-c", script], env=env | {"HOME": str(worker)}, check=True, timeout=30)
  deadline = time.monotonic() + 60
  while not (worker / "mpt-jax" / "logs" / "exit").exists() and time.monotonic() < deadline:
    time.sleep(0.2)
  assert (worker / "mpt-jax" / "logs" / "exit").read_text().strip() == "0"


def test_watch_waits_and_starts_again_while_another_job_holds_the_workdir(fake_tpu):
  """Exit 75 on every worker (mpt_jax/main.py: the workdir's lease is another job's) is waited out: the same
  command again after a poll, without spending --max-restarts (1 here: the first start), until the job runs."""
  root, env = fake_tpu
  (root / "preempted").touch()  # no preemption in this run
  args = ["--name=mpt", "--zone=z", "--create", "--poll=0.3", "--skip-validation", "--max-restarts=1"]
  done = launch(env | {"FAKE_JOB_BUSY": "2"}, "watch", *args, "--", *JOB, timeout=300)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  waits = [line for line in done.stderr.splitlines() if "another job holds the workdir" in line]
  assert len(waits) == 2 and "(workers done 75 done 75 )" in waits[0] and "(retry 2 of 30)" in waits[1]
  assert "finished on every worker" in done.stderr and "restart 2" not in done.stderr
  starts = [c for c in (root / "calls.log").read_text().splitlines() if "job.sh <<" in c]
  assert len(starts) == 3 and len(set(starts)) == 1  # the same command every time
  for worker in ("w0", "w1"):
    assert (root / "bucket" / "b" / "runs" / "maml" / f"{worker}.step").read_text().strip() == "4"
    log = (root / "vm" / worker / "mpt-jax" / "logs" / "job.log").read_text()
    assert log.count("FATAL WorkdirBusy") == 2 and log.endswith("finished\n")


def test_watch_gives_up_on_a_workdir_busy_for_longer_than_its_retries(fake_tpu):
  root, env = fake_tpu
  args = ["--name=mpt", "--zone=z", "--create", "--poll=0.3", "--skip-validation"]
  done = launch(env | {"FAKE_JOB_BUSY": "99", "MPT_BUSY_RETRIES": "1"}, "watch", *args, "--", *JOB)
  assert done.returncode == 75 and "still another job's after 1 retries" in done.stderr, done.stderr[-3000:]
  assert sum("job.sh <<" in c for c in (root / "calls.log").read_text().splitlines()) == 2
