#!/usr/bin/env bash
# mpt-jax launcher: sets up the pinned environment by itself, then runs `python -m mpt_jax.main`.
#
#   bash launch.sh demo                      # the embedded offline default, end to end
#   bash launch.sh test                      # the test suite, in the pinned and the newest-JAX environment
#   bash launch.sh lint                      # ruff: lint and format check (CI runs it before the tests)
#   bash launch.sh mini-study                # the offline mini-study (experiments/mini_study.py), 6-12 h on 2 cores
#   bash launch.sh run --config=configs/maml_cls2cls.py --workdir=runs/maml_cls2cls [--config.x=y ...]
#   bash launch.sh study --setting=cls2cls --workdir=runs/cls2cls --set data_dir=/data/crossfit
#   bash launch.sh tpu watch --name=mpt --zone=us-central2-b --accelerator=v4-32 --create [--dry-run] \
#       -- --config=configs/maml_cls2cls.py --workdir=gs://BUCKET/runs/maml_cls2cls \
#          --config.data_dir=gs://BUCKET/crossfit
#   bash launch.sh tpu {start|status|logs|stop|delete} ...   (`bash launch.sh tpu` alone: the help)
#   bash launch.sh slurm --nodes=2 --gpus-per-node=8 -- --config=... --workdir=/shared/runs/x   (GPU clusters)
#
# tpu: checks the job's flags locally (mpt_jax/validate_job.py), (optionally) requests the TPU as a queued
# resource (--spot/--reserved/--best-effort; --direct: `tpu-vm create`) with the accelerator's runtime,
# ships HEAD to every worker, installs the pinned requirements with the TPU build of JAX, and starts the
# same `python -m mpt_jax.main --multihost ...` detached on every worker (jax.distributed.initialize()
# joins them; one log per worker, ~/mpt-jax/logs/job.log); `watch` recreates a preempted queued resource
# and reruns the command, which resumes from the gs:// workdir's checkpoints.
# README.md "Running on a TPU pod" walks through it. --dry-run prints the gcloud commands.
#
# The environment lives in .venv (override with MPT_VENV): the pinned requirements, then this package
# itself (`pip install -e .`, pyproject.toml); it is (re)installed whenever either changes.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${MPT_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

ensure_env() {  # $1: requirements file [$2: venv, default $VENV; $3: its python, default $PYTHON; $4: --upgrade]
  local req="$1" venv="${2:-$VENV}" python="${3:-$PYTHON}" upgrade="${4:-}"
  local stamp="$venv/.installed-$(basename "$1")"
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
  fi
  if [ ! -f "$stamp" ] || ! cmp -s <(cat "$req" requirements.txt pyproject.toml) "$stamp"; then
    "$venv/bin/python" -m pip install --quiet --upgrade pip
    "$venv/bin/python" -m pip install --quiet $upgrade -r "$req"
    "$venv/bin/python" -m pip install --quiet --no-deps -e .
    cat "$req" requirements.txt pyproject.toml > "$stamp"
  fi
}

# The newest-JAX test environment: Python 3.12 (PYTHON_NEWEST; under pyenv, its 3.12 when the shim has
# none active), the newest releases of requirements-newest.txt, re-resolved once a day.
NEWEST_VENV="${MPT_NEWEST_VENV:-.venv-newest}"
python_newest() {
  local candidate
  for candidate in "${PYTHON_NEWEST:-python3.12}" "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if "$candidate" -c 'import sys; assert sys.version_info[:2] >= (3, 12)' >/dev/null 2>&1; then
      echo "$candidate"; return
    fi
  done
  echo "test: no Python 3.12 found for the newest-JAX environment (set PYTHON_NEWEST=/path/to/python3.12)" >&2
  exit 1
}
ensure_newest_env() {
  local stamp="$NEWEST_VENV/.installed-requirements-newest.txt"
  [ -f "$stamp" ] && [ -n "$(find "$stamp" -mmin +1440)" ] && rm -f "$stamp"  # a day old: resolve again
  ensure_env requirements-newest.txt "$NEWEST_VENV" "$(python_newest)" --upgrade
}

# --- tpu: a job on every worker of a TPU VM, detached, that survives preemption ----------------------------
# Everything that outlives a VM lives on GCS: --workdir (checkpoints, results, logs) and the data. A
# worker holds only the code (a `git archive` of HEAD, shipped once per launch), its venv and its job log.
GCLOUD="${GCLOUD:-gcloud}"
TPU_REMOTE_DIR="mpt-jax"

tpu_usage() {
  cat >&2 <<'USAGE'
usage: bash launch.sh tpu ACTION --name=NAME --zone=ZONE [options] [-- mpt_jax.main flags]
  start   (--create: get the TPU first: a queued resource, waited for until ACTIVE) ship the code, set up
          every worker, start the job detached
  watch   start it when it is not running, then keep it alive: a preempted (SUSPENDED), failed or deleted
          queued resource is deleted and requested again (with --create, else waited for), a VM that lost
          its job (recreated, rebooted, a worker died) gets the same command again, which resumes from the
          checkpoints under the gs:// workdir; returns when every worker's job has exited 0 (run it in
          tmux/nohup, or Cloud Shell)
  status  the queued resource's state, then each worker: running, done <exit code>, stopped or absent
  logs    the job log of --worker=N (default 0); --follow to keep tailing it (Ctrl-C leaves the job running)
  stop    kill the job on every worker (the TPU stays, and is billed)
  delete  delete the queued resource and its TPU VM (--direct: the VM)
options: --accelerator=v4-8 (default) --version=RUNTIME (default: the accelerator's runtime, tpu_runtime)
         --spot | --reserved | --best-effort (queued resources: the capacity to queue for; best-effort is
           gcloud alpha's) --direct (`tpu-vm create` instead of a queued resource: v4 users with quota)
         --project=P --internal-ip (a VPC without external IPs) --tunnel-through-iap (ssh/scp through IAP)
         --dry-run (print the gcloud commands) --skip-validation (do not check the job's flags locally)
         --poll=60 (watch: seconds between checks) --max-restarts=20 --worker=N --follow
         --allow-local-workdir (a workdir on the VM's disk is lost with the VM: refused by default)
env:     MPT_TPU_SETUP (replaces the per-worker setup command, e.g. for an image with the env baked in),
         MPT_TPU_PYTHON (the workers' python, default .venv/bin/python), GCLOUD (the gcloud binary)
USAGE
  exit 2
}

tpu_runtime() {  # $1 accelerator type -> the TPU software version (runtime image) to create it with
  # Source: Cloud TPU "TPU software versions", PyTorch and JAX table (https://cloud.google.com/tpu/docs/runtimes,
  # read 2026-12): Trillium v6e v2-alpha-tpuv6e, v5p v2-alpha-tpuv5, v5e v2-alpha-tpuv5-lite, v4 and older
  # tpu-ubuntu2204-base.
  case "$1" in
    v6e-*) echo v2-alpha-tpuv6e;;
    v5p-*) echo v2-alpha-tpuv5;;
    v5litepod-*|v5e-*) echo v2-alpha-tpuv5-lite;;
    v2-*|v3-*|v4-*) echo tpu-ubuntu2204-base;;
    *) echo "tpu: no runtime known for --accelerator=$1 (known: v2-*, v3-*, v4-*, v5litepod-*, v5p-*," \
         "v6e-*); pass --version=RUNTIME (see https://cloud.google.com/tpu/docs/runtimes)" >&2; return 2;;
  esac
}

tpu_launch() {
  local action="${1:-}"; shift || true
  case "$action" in start|watch|status|logs|stop|delete) ;; *) tpu_usage;; esac
  local name="" zone="" accelerator="v4-8" version="" create=0 dry=0 poll=60 direct=0 validate=1
  local max_restarts=20 worker=0 follow=0 allow_local=0 capacity=() project=() net=() internal=()
  while [ $# -gt 0 ]; do
    case "$1" in
      --name=*) name="${1#*=}";; --zone=*) zone="${1#*=}";; --accelerator=*) accelerator="${1#*=}";;
      --version=*) version="${1#*=}";; --create) create=1;; --dry-run) dry=1;; --poll=*) poll="${1#*=}";;
      --max-restarts=*) max_restarts="${1#*=}";; --worker=*) worker="${1#*=}";; --follow) follow=1;;
      --allow-local-workdir) allow_local=1;; --direct) direct=1;; --skip-validation) validate=0;;
      --spot|--reserved|--best-effort)
        [ ${#capacity[@]} = 0 ] || { echo "tpu: pass one of --spot, --reserved, --best-effort" >&2; exit 2; }
        capacity=("$1");;
      --project=*) project=("$1");;
      --internal-ip) net=(--internal-ip); internal=(--internal-ips);;
      --tunnel-through-iap) net=(--tunnel-through-iap);;
      --) shift; break;;
      *) echo "tpu: unknown option $1 (options before --, mpt_jax.main flags after)" >&2; exit 2;;
    esac
    shift
  done
  [ -n "$name" ] && [ -n "$zone" ] || { echo "tpu: --name and --zone are required" >&2; exit 2; }
  if [ "$direct" = 1 ] && [ "${capacity[*]:-}" = --best-effort ]; then
    echo "tpu: --best-effort is a queued-resource option; drop --direct (or use --spot)" >&2; exit 2
  fi
  [ -n "$version" ] || version="$(tpu_runtime "$accelerator")" || exit 2
  TPU_ARGS=("$@")
  TPU_NAME="$name"; TPU_DRY="$dry"; TPU_DIRECT="$direct"; TPU_POLL="$poll"
  TPU_AT=(--zone="$zone" "${project[@]}")  # every gcloud call names the zone and the project
  TPU_NET=("${net[@]}")                     # ssh and scp: how to reach the workers
  TPU_VM=("$GCLOUD" compute tpus tpu-vm)
  TPU_QR=("$GCLOUD" compute tpus queued-resources)
  [ "${capacity[*]:-}" = --best-effort ] && TPU_QR=("$GCLOUD" alpha compute tpus queued-resources)
  if [ "$direct" = 1 ]; then
    TPU_CREATE=("${TPU_VM[@]}" create "$name" "${TPU_AT[@]}" --accelerator-type="$accelerator"
      --version="$version" "${capacity[@]}" "${internal[@]}")
  else  # the node of the queued resource has the resource's name: tpu-vm ssh/scp address it as before
    TPU_CREATE=("${TPU_QR[@]}" create "$name" --node-id="$name" "${TPU_AT[@]}"
      --accelerator-type="$accelerator" --runtime-version="$version" "${capacity[@]}" "${internal[@]}")
  fi
  case "$action" in
    status) tpu_status; return;;
    stop) tpu_ssh all "$(tpu_stop_command)"; return;;
    delete) tpu_release; return;;
    logs)
      local tail_flags="-n 200"; [ "$follow" = 1 ] && tail_flags="-n 200 -F"
      tpu_ssh "$worker" "tail $tail_flags ~/$TPU_REMOTE_DIR/logs/job.log"; return;;
  esac
  local workdir=""
  for arg in "$@"; do case "$arg" in --workdir=*) workdir="${arg#*=}";; esac; done
  [ -n "$workdir" ] || { echo "tpu: pass --workdir=gs://BUCKET/... after --" >&2; exit 2; }
  if [ "$allow_local" = 0 ] && [[ "$workdir" != gs://* ]]; then
    echo "tpu: --workdir=$workdir is not on GCS: a preempted VM loses its disk, and with it the checkpoints" \
      "a rerun resumes from; pass --workdir=gs://BUCKET/... (or --allow-local-workdir)" >&2
    exit 2
  fi
  [ "$validate" = 1 ] && tpu_validate "$@"  # before the first gcloud call: a typo costs seconds, not a VM
  TPU_WORKDIR="$workdir"
  TPU_STARTUP="$(mktemp -u /tmp/mpt-jax-startup-XXXX).sh"
  tpu_startup_script > "$TPU_STARTUP"
  TPU_CREATE+=(--metadata-from-file=startup-script="$TPU_STARTUP")
  TPU_ARCHIVE="$(mktemp -u /tmp/mpt-jax-XXXX).tar.gz"
  tpu_do git archive --format=tar.gz -o "$TPU_ARCHIVE" HEAD  # one archive: every restart runs this code
  if [ "$action" = start ]; then
    if [ "$create" = 1 ]; then tpu_do "${TPU_CREATE[@]}" && tpu_wait_active; fi
    tpu_deploy && tpu_start
    echo "tpu: started on every worker of $name; follow it with: bash launch.sh tpu logs --name=$name" \
      "--zone=$zone --follow (status: tpu status; keep it alive through preemption: tpu watch)" >&2
    return
  fi
  tpu_watch "$create" "$poll" "$max_restarts"
}

tpu_validate() {  # the job's flags through mpt_jax.main's own checks, here, before anything is created
  local python="$VENV/bin/python"
  [ -x "$python" ] || ensure_env requirements.txt
  "$python" -m mpt_jax.validate_job "$@" || {
    echo "tpu: the job's flags are refused locally (above); nothing was created (--skip-validation to" \
      "send them anyway)" >&2
    exit 2
  }
}

tpu_do() { if [ "$TPU_DRY" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
tpu_ssh() {
  tpu_do "${TPU_VM[@]}" ssh "$TPU_NAME" "${TPU_AT[@]}" "${TPU_NET[@]}" --worker="$1" --command="$2"
}

tpu_state() {  # READY when the workers can be reached; else the queued resource's (or VM's) state, or ABSENT
  local state
  if [ "$TPU_DIRECT" = 1 ]; then
    "${TPU_VM[@]}" describe "$TPU_NAME" "${TPU_AT[@]}" --format='value(state)' 2>/dev/null || echo ABSENT
    return
  fi
  state="$("${TPU_QR[@]}" describe "$TPU_NAME" "${TPU_AT[@]}" --format='value(state.state)' 2>/dev/null)" \
    || state=ABSENT
  if [ "$state" = ACTIVE ]; then echo READY; else echo "${state:-ABSENT}"; fi
}

tpu_wait_active() {  # after a create: describe until the queued resource is ACTIVE (a direct create returns READY)
  local state last=""
  if [ "$TPU_DRY" = 1 ]; then
    [ "$TPU_DIRECT" = 1 ] || tpu_do "${TPU_QR[@]}" describe "$TPU_NAME" "${TPU_AT[@]}" --format='value(state.state)'
    return 0
  fi
  while true; do
    state="$(tpu_state)"
    [ "$state" = READY ] && return 0
    [ "$state" != "$last" ] && echo "tpu: $(date -u +%FT%TZ) $TPU_NAME is $state" >&2
    last="$state"
    if [[ "$state" =~ ^(FAILED|SUSPENDED|PREEMPTED|TERMINATED)$ ]]; then
      echo "tpu: $TPU_NAME is $state; see ${TPU_QR[*]} describe $TPU_NAME ${TPU_AT[*]}" \
        "(delete it with: bash launch.sh tpu delete --name=$TPU_NAME ...)" >&2
      return 1
    fi
    sleep "$TPU_POLL"
  done
}

tpu_release() {  # delete the queued resource with its node (--force), or the VM
  if [ "$TPU_DIRECT" = 1 ]; then
    tpu_do "${TPU_VM[@]}" delete "$TPU_NAME" "${TPU_AT[@]}" --quiet
  else
    tpu_do "${TPU_QR[@]}" delete "$TPU_NAME" "${TPU_AT[@]}" --force --quiet
  fi
}

tpu_status() {
  if [ "$TPU_DRY" = 1 ]; then
    if [ "$TPU_DIRECT" = 1 ]; then tpu_do "${TPU_VM[@]}" describe "$TPU_NAME" "${TPU_AT[@]}" --format='value(state)'
    else tpu_do "${TPU_QR[@]}" describe "$TPU_NAME" "${TPU_AT[@]}" --format='value(state.state)'; fi
    tpu_ssh all "$(tpu_status_command)"; return
  fi
  local state; state="$(tpu_state)"
  echo "tpu: $TPU_NAME is $state" >&2
  if [ "$state" != READY ]; then echo "tpu: no workers to ask" >&2; return 0; fi
  tpu_ssh all "$(tpu_status_command)"
}

tpu_setup_command() {
  # TPU VM images ship an older Python; JAX 0.10.2 needs 3.11. gcsfs: gs:// for mpt_jax/paths.py (its
  # release pins fsspec; 2026.8.0 is the newest pair that datasets 5.2.0 accepts). Skipped when done.
  local default="(command -v python3.11 || (sudo apt-get update -q && sudo apt-get install -y -q python3.11 \
python3.11-venv)) && (test -x .venv/bin/python || python3.11 -m venv .venv) && \
(cmp -s requirements.txt .venv/.mpt-requirements || (.venv/bin/pip install -q -r requirements.txt && \
.venv/bin/pip install -q 'jax[tpu]==0.10.2' gcsfs==2026.8.0 fsspec==2026.8.0 && \
cp requirements.txt .venv/.mpt-requirements)) && .venv/bin/pip install -q --no-deps -e ."
  echo "mkdir -p ~/$TPU_REMOTE_DIR && tar -xzf ~/mpt-jax.tar.gz -C ~/$TPU_REMOTE_DIR && \
cd ~/$TPU_REMOTE_DIR && ${MPT_TPU_SETUP:-$default}"
}

tpu_start_command() {
  # The job is a script on the worker (~/mpt-jax/job.sh: the exact command, readable there). setsid: a
  # session of its own (its pid is its process group: `stop` kills all of it); nohup and the redirections
  # detach it from the ssh session, which returns at once. One log per worker: ~/mpt-jax/logs/job.log.
  local python="${MPT_TPU_PYTHON:-.venv/bin/python}" args
  args="$(printf '%q ' "${TPU_ARGS[@]}")"
  # The log is copied to WORKDIR/logs/worker_<i>.log every MPT_TPU_LOG_UPLOAD_S seconds (60) and at the
  # end (a gs:// workdir only): `logs` of a VM that is gone can be read there.
  local upload="" every="${MPT_TPU_LOG_UPLOAD_S:-60}"
  if [[ "${TPU_WORKDIR:-}" == gs://* ]]; then
    upload="gcloud storage cp --quiet logs/job.log $(printf '%q' "$TPU_WORKDIR/logs")/worker_\$worker.log \
2>> logs/upload.err"
  fi
  printf '%s\n' "cd ~/$TPU_REMOTE_DIR && mkdir -p logs && rm -f logs/exit && cat > job.sh <<'MPT_JOB_EOF'" \
    "cd ~/$TPU_REMOTE_DIR" \
    "echo \"=== \$(date -u +%FT%TZ) \$(hostname) starts ~/$TPU_REMOTE_DIR/job.sh\"" \
    "worker=\$(curl -sf -m 2 -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number || echo 0)" \
    "${upload:+(while sleep $every; do $upload; done) & uploader=\$!}" \
    "$python -m mpt_jax.main --multihost $args" \
    "code=\$?" \
    "echo \$code > logs/exit" \
    "${upload:+kill \$uploader; $upload}" \
    "MPT_JOB_EOF" \
    "setsid nohup bash job.sh >> logs/job.log 2>&1 < /dev/null & echo \$! > logs/pid"
}

tpu_startup_script() {
  # In the VM's metadata: run as root at every boot. After a maintenance event or a reboot (the disk kept),
  # it starts the job again on this worker unless it had finished (logs/exit); a fresh VM (recreated) has
  # no job.sh yet: `watch` ships it. The job resumes from the workdir's checkpoints.
  local user="${MPT_TPU_USER:-$(id -un)}"
  cat <<STARTUP
#!/bin/bash
# mpt-jax startup script (launch.sh tpu): restart an unfinished job after a reboot
home="\$(getent passwd $user | cut -d: -f6)"
cd "\$home/$TPU_REMOTE_DIR" 2>/dev/null || exit 0
test -f job.sh && ! test -f logs/exit || exit 0
sudo -u $user bash -c 'setsid nohup bash job.sh >> logs/job.log 2>&1 < /dev/null & echo \$! > logs/pid'
STARTUP
}

tpu_status_command() {
  echo "cd ~/$TPU_REMOTE_DIR/logs 2>/dev/null || { echo absent; exit 0; }; if test -f exit; then \
echo \"done \$(cat exit)\"; elif test -f pid && kill -0 \$(cat pid) 2>/dev/null; then echo running; \
else echo stopped; fi"
}

tpu_stop_command() {
  echo "cd ~/$TPU_REMOTE_DIR/logs 2>/dev/null && test -f pid && kill -- -\$(cat pid) 2>/dev/null; true"
}

tpu_deploy() {
  tpu_do "${TPU_VM[@]}" scp "$TPU_ARCHIVE" "$TPU_NAME:~/mpt-jax.tar.gz" "${TPU_AT[@]}" "${TPU_NET[@]}" \
    --worker=all && tpu_ssh all "$(tpu_setup_command)"
}
tpu_start() { tpu_ssh all "$(tpu_stop_command)" && tpu_ssh all "$(tpu_start_command)"; }

tpu_watch() {  # $1 create (recreate a lost TPU), $2 poll seconds, $3 restarts allowed
  local recreate="$1" poll="$2" max="$3" restarts=0 state statuses busy=0 max_busy="${MPT_BUSY_RETRIES:-30}"
  if [ "$TPU_DRY" = 1 ]; then  # what one recovery runs
    if [ "$TPU_DIRECT" = 1 ]; then tpu_do "${TPU_VM[@]}" describe "$TPU_NAME" "${TPU_AT[@]}" --format='value(state)'
    else tpu_do "${TPU_QR[@]}" describe "$TPU_NAME" "${TPU_AT[@]}" --format='value(state.state)'; fi
    tpu_release; tpu_do "${TPU_CREATE[@]}"; tpu_wait_active
    tpu_deploy; tpu_start; tpu_ssh all "$(tpu_status_command)"
    return
  fi
  while true; do
    state="$(tpu_state)"
    if [ "$state" != READY ]; then
      echo "tpu watch: $(date -u +%FT%TZ) $TPU_NAME is $state" >&2
      # lost: a preempted Spot queued resource is SUSPENDED (a direct VM PREEMPTED); queued ones that are
      # WAITING_FOR_RESOURCES, ACCEPTED, PROVISIONING, CREATING are on their way and waited for
      if [ "$recreate" = 1 ] && [[ "$state" =~ ^(ABSENT|FAILED|SUSPENDED|PREEMPTED|TERMINATED|STOPPED)$ ]]; then
        [ "$state" != ABSENT ] && { tpu_release || true; }
        "${TPU_CREATE[@]}" || echo "tpu watch: create failed (no capacity?); retrying" >&2
      fi
      sleep "$poll"; continue
    fi
    statuses="$(tpu_ssh all "$(tpu_status_command)" 2>/dev/null | grep -E '^(running|done -?[0-9]+|stopped|absent)$')" \
      || { echo "tpu watch: workers unreachable; retrying" >&2; sleep "$poll"; continue; }
    if ! grep -qv '^done 0$' <<<"$statuses"; then
      echo "tpu watch: $(date -u +%FT%TZ) the job finished on every worker (exit 0); results under the workdir" >&2
      return 0
    fi
    if grep -q '^running$' <<<"$statuses" && ! grep -qv '^running$' <<<"$statuses"; then
      sleep "$poll"; continue
    fi
    # Exit 75 (mpt_jax/main.py: another job holds the workdir's lease): not this job's error, and not a
    # lost worker either: wait, and start it again (it runs once the other job ends or its lease goes
    # stale), at most MPT_BUSY_RETRIES times (30), without spending --max-restarts.
    if grep -q '^done 75$' <<<"$statuses" && ! grep -qvE '^done (0|75)$' <<<"$statuses"; then
      if [ "$busy" -ge "$max_busy" ]; then
        echo "tpu watch: the workdir is still another job's after $busy retries (MPT_BUSY_RETRIES=$max_busy);" \
          "stopping: see bash launch.sh tpu logs --name=$TPU_NAME ${TPU_AT[*]}" >&2
        return 75
      fi
      busy=$((busy + 1))
      echo "tpu watch: $(date -u +%FT%TZ) another job holds the workdir (workers $(tr '\n' ' ' <<<"$statuses"))" \
        "-> waiting ${poll} s, then starting again (retry $busy of $max_busy)" >&2
      sleep "$poll"
      tpu_start || true
      sleep "$poll"; continue
    fi
    if ! grep -qvE '^done -?[0-9]+$' <<<"$statuses"; then  # the job itself failed (e.g. a config error)
      echo "tpu watch: the job exited with an error on every worker ($(tr '\n' ' ' <<<"$statuses")); not" \
        "restarting it: see bash launch.sh tpu logs --name=$TPU_NAME ${TPU_AT[*]}" >&2
      return 1
    fi
    # Some worker has no job (a fresh or rebooted VM, a crashed process): a multi-host job needs every
    # process, so stop what is left and run the same command again everywhere; it resumes.
    if [ "$restarts" -ge "$max" ]; then
      echo "tpu watch: $max restarts spent; worker states: $(tr '\n' ' ' <<<"$statuses")" >&2
      return 1
    fi
    restarts=$((restarts + 1))
    echo "tpu watch: $(date -u +%FT%TZ) workers $(tr '\n' ' ' <<<"$statuses")-> restart $restarts of $max" >&2
    if grep -q '^absent$' <<<"$statuses"; then tpu_deploy || { sleep "$poll"; continue; }; fi
    tpu_start || true
    sleep "$poll"
  done
}

# --- slurm: the job on a GPU cluster (scripts/slurm/mpt_jax.sbatch) ----------------------------------------
SLURM_SCRIPT="scripts/slurm/mpt_jax.sbatch"

slurm_usage() {
  cat >&2 <<'USAGE'
usage: bash launch.sh slurm [options] -- mpt_jax.main flags
  checks the job's flags locally (as tpu does), then submits scripts/slurm/mpt_jax.sbatch: one process per
  GPU on every node, jax.distributed.initialize() joined through SLURM's variables, requeued on preemption
options: --nodes=1 --gpus-per-node=8 --partition=P --account=A --time=24:00:00 --sbatch=ARG (repeatable: any
         other sbatch option, e.g. --sbatch=--qos=high) --dry-run (print the sbatch command)
         --skip-validation
env:     SBATCH (the sbatch binary), MPT_PYTHON (the nodes' python, default .venv/bin/python)
USAGE
  exit 2
}

slurm_launch() {
  local nodes=1 gpus=8 dry=0 validate=1 extra=()
  [ $# -gt 0 ] || slurm_usage
  while [ $# -gt 0 ]; do
    case "$1" in
      --nodes=*) nodes="${1#*=}";; --gpus-per-node=*) gpus="${1#*=}";; --dry-run) dry=1;;
      --partition=*|--account=*|--time=*) extra+=("$1");; --sbatch=*) extra+=("${1#--sbatch=}");;
      --skip-validation) validate=0;;
      --) shift; break;;
      *) echo "slurm: unknown option $1 (options before --, mpt_jax.main flags after)" >&2; exit 2;;
    esac
    shift
  done
  local workdir=""
  for arg in "$@"; do case "$arg" in --workdir=*) workdir="${arg#*=}";; esac; done
  [ -n "$workdir" ] || { echo "slurm: pass --workdir=/shared/... (or gs://...) after --" >&2; exit 2; }
  if [ "$validate" = 1 ]; then
    local python="$VENV/bin/python"
    [ -x "$python" ] || ensure_env requirements.txt
    "$python" -m mpt_jax.validate_job "$@" || {
      echo "slurm: the job's flags are refused locally (above); nothing was submitted" >&2; exit 2; }
  fi
  local submit=("${SBATCH:-sbatch}" --nodes="$nodes" --ntasks-per-node="$gpus" --gres=gpu:"$gpus"
    "${extra[@]}" "$SLURM_SCRIPT" "$@")
  if [ "$dry" = 1 ]; then printf '%q ' "${submit[@]}"; echo; return; fi
  "${submit[@]}"
  echo "slurm: submitted; follow it with squeue --me and tail -F slurm-mpt-jax-<jobid>.out (results under" \
    "$workdir)" >&2
}

run_newest_tests() {  # the compat tests in the newest-JAX environment
  echo "== the newest environment ($("$NEWEST_VENV/bin/python" -c 'import sys; from importlib.metadata import version
names = ("jax", "flax", "optax", "orbax-checkpoint", "transformers")
print(", ".join([f"Python {sys.version.split()[0]}"] + [f"{n} {version(n)}" for n in names]))'), the compat tests)"
  "$NEWEST_VENV/bin/python" -m pytest -q -n 2 --dist loadfile --durations=10 -m compat -p no:cacheprovider \
    tests "$@"
}

cmd="${1:-demo}"; shift || true
case "$cmd" in
  lint)
    ensure_env requirements-test.txt
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/ruff" format --check .
    ;;
  test)
    # Both environments: the pinned one (Python 3.11) runs the whole suite, the newest (Python 3.12, the
    # newest JAX, Flax, optax, orbax and transformers, no torch) the tests marked compat. With arguments
    # (`bash launch.sh test tests/test_decode.py -x`) only the pinned one runs, with them; `test-newest`
    # runs only the newest. Each prints its slowest tests.
    ensure_env requirements-test.txt
    # The linter first (seconds): a test run that passes on unlinted code is not a passing CI.
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    # One compilation cache per test run, shared by the two processes (tests/conftest.py).
    MPT_COMPILATION_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/mpt-jax-test-compiled-XXXX")"
    export MPT_COMPILATION_CACHE_DIR
    trap 'rm -rf "$MPT_COMPILATION_CACHE_DIR"' EXIT
    if [ $# -gt 0 ]; then
      export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
      exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile --durations=15 "$@"
    fi
    # The newest environment is set up (downloads, mostly) while the pinned one runs its tests.
    newest_log="$(mktemp)"
    ensure_newest_env >"$newest_log" 2>&1 &
    newest_setup=$!
    trap 'kill "$newest_setup" 2>/dev/null || true; rm -rf "$MPT_COMPILATION_CACHE_DIR" "$newest_log"' EXIT
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    echo "== the pinned environment ($("$VENV/bin/python" -V), the whole suite)"
    "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile --durations=15 tests
    if ! wait "$newest_setup"; then
      cat "$newest_log" >&2
      echo "test: setting up the newest environment ($NEWEST_VENV) failed (above)" >&2
      exit 1
    fi
    run_newest_tests
    ;;
  test-newest)
    ensure_newest_env
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    run_newest_tests "$@"
    ;;
  demo)
    ensure_env requirements.txt
    # On CPU the non-partitionable threefry compiles dropout's random bits ~3x faster (measured).
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 JAX_THREEFRY_PARTITIONABLE="${JAX_THREEFRY_PARTITIONABLE:-0}"
    exec "$VENV/bin/python" experiments/run_setting.py --setting=wn_cls2cls --preset=demo \
      --workdir="${MPT_DEMO_WORKDIR:-runs/demo}" "$@"
    ;;
  mini-study)
    ensure_env requirements.txt
    # JAX's default random bits (threefry partitionable), as the final mini-study was run. The other kind
    # draws other dropout masks; each stage's fingerprint records the kind, so a workdir made under one is
    # refused under the other instead of mixed (records from before 2026-11-30 do not say, and are not compared).
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 JAX_THREEFRY_PARTITIONABLE="${JAX_THREEFRY_PARTITIONABLE:-1}"
    exec "$VENV/bin/python" experiments/mini_study.py "$@"
    ;;
  study)
    ensure_env requirements.txt
    exec "$VENV/bin/python" experiments/run_setting.py "$@"
    ;;
  tpu)
    tpu_launch "$@"
    ;;
  slurm)
    slurm_launch "$@"
    ;;
  run)
    ensure_env requirements.txt
    exec "$VENV/bin/python" -m mpt_jax.main "$@"
    ;;
  *)
    echo "usage: bash launch.sh {demo|test|test-newest|lint|mini-study|run|study|tpu|slurm} [args...]" >&2; exit 2;;
esac
