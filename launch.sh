#!/usr/bin/env bash
# mpt-jax launcher: sets up the pinned environment by itself, then runs `python -m mpt_jax.main`.
#
#   bash launch.sh demo                      # the embedded offline default, end to end
#   bash launch.sh test                      # the test suite
#   bash launch.sh lint                      # ruff: lint and format check (CI runs it before the tests)
#   bash launch.sh mini-study                # the offline mini-study (experiments/mini_study.py), ~1 h
#   bash launch.sh run --config=configs/maml_cls2cls.py --workdir=runs/maml_cls2cls [--config.x=y ...]
#   bash launch.sh study --setting=cls2cls --workdir=runs/cls2cls --set data_dir=/data/crossfit
#   bash launch.sh tpu --name=mpt --zone=us-central2-b --accelerator=v4-32 [--create] [--dry-run] \
#       -- --config=configs/maml_cls2cls.py --workdir=runs/maml_cls2cls --config.data_dir=/data/crossfit
#
# tpu: (optionally) creates the TPU VM, copies this checkout to every worker, installs the pinned
# requirements with the TPU build of JAX on every worker, runs the same `python -m mpt_jax.main
# --multihost ...` on all workers (jax.distributed.initialize() joins them), and copies the workdir back
# from worker 0. --dry-run prints the gcloud commands instead of running them.
#
# The environment lives in .venv (override with MPT_VENV): the pinned requirements, then this package
# itself (`pip install -e .`, pyproject.toml); it is (re)installed whenever either changes.
set -euo pipefail
cd "$(dirname "$0")"
VENV="${MPT_VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

ensure_env() {  # $1: requirements file
  local req="$1" stamp="$VENV/.installed-$(basename "$1")"
  if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
  fi
  if [ ! -f "$stamp" ] || ! cmp -s <(cat "$req" requirements.txt pyproject.toml) "$stamp"; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$req"
    "$VENV/bin/python" -m pip install --quiet --no-deps -e .
    cat "$req" requirements.txt pyproject.toml > "$stamp"
  fi
}

tpu_launch() {
  local name="" zone="" accelerator="v4-8" version="tpu-ubuntu2204-base" create=0 dry=0 remote_dir="mpt-jax"
  while [ $# -gt 0 ]; do
    case "$1" in
      --name=*) name="${1#*=}";; --zone=*) zone="${1#*=}";; --accelerator=*) accelerator="${1#*=}";;
      --version=*) version="${1#*=}";; --create) create=1;; --dry-run) dry=1;;
      --) shift; break;;
      *) echo "tpu: unknown option $1 (options before --, mpt_jax.main flags after)" >&2; exit 2;;
    esac
    shift
  done
  [ -n "$name" ] && [ -n "$zone" ] || { echo "tpu: --name and --zone are required" >&2; exit 2; }
  local workdir=""
  for arg in "$@"; do case "$arg" in --workdir=*) workdir="${arg#*=}";; esac; done
  [ -n "$workdir" ] || { echo "tpu: pass --workdir=... after --" >&2; exit 2; }
  local vm=(gcloud compute tpus tpu-vm)
  local at=(--zone="$zone")
  run_or_print() { if [ "$dry" = 1 ]; then printf '%q ' "$@"; echo; else "$@"; fi; }
  if [ "$create" = 1 ]; then
    run_or_print "${vm[@]}" create "$name" "${at[@]}" --accelerator-type="$accelerator" --version="$version"
  fi
  local archive; archive="$(mktemp -u /tmp/mpt-jax-XXXX).tar.gz"
  run_or_print git archive --format=tar.gz -o "$archive" HEAD
  run_or_print "${vm[@]}" scp "$archive" "$name:~/mpt-jax.tar.gz" "${at[@]}" --worker=all
  # TPU VM images ship an older Python; JAX 0.10.2 needs 3.11.
  local setup="(command -v python3.11 || (sudo apt-get update -q && sudo apt-get install -y -q python3.11 \
python3.11-venv)) && mkdir -p $remote_dir && tar -xzf ~/mpt-jax.tar.gz -C $remote_dir && cd $remote_dir && \
python3.11 -m venv .venv && .venv/bin/pip install -q -r requirements.txt && \
.venv/bin/pip install -q 'jax[tpu]==0.10.2' && .venv/bin/pip install -q --no-deps -e ."
  run_or_print "${vm[@]}" ssh "$name" "${at[@]}" --worker=all --command="$setup"
  local args; args="$(printf '%q ' "$@")"
  run_or_print "${vm[@]}" ssh "$name" "${at[@]}" --worker=all \
    --command="cd $remote_dir && .venv/bin/python -m mpt_jax.main --multihost $args"
  mkdir -p "$(dirname "$workdir")"
  run_or_print "${vm[@]}" scp --recurse "$name:~/$remote_dir/$workdir" "$(dirname "$workdir")/" "${at[@]}" --worker=0
}

cmd="${1:-demo}"; shift || true
case "$cmd" in
  lint)
    ensure_env requirements-test.txt
    "$VENV/bin/ruff" check .
    exec "$VENV/bin/ruff" format --check .
    ;;
  test)
    ensure_env requirements-test.txt
    # The linter first (seconds): a test run that passes on unlinted code is not a passing CI.
    "$VENV/bin/ruff" check .
    "$VENV/bin/ruff" format --check .
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    exec "$VENV/bin/python" -m pytest -q tests "$@"
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
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 JAX_THREEFRY_PARTITIONABLE="${JAX_THREEFRY_PARTITIONABLE:-0}"
    exec "$VENV/bin/python" experiments/mini_study.py "$@"
    ;;
  study)
    ensure_env requirements.txt
    exec "$VENV/bin/python" experiments/run_setting.py "$@"
    ;;
  tpu)
    tpu_launch "$@"
    ;;
  run)
    ensure_env requirements.txt
    exec "$VENV/bin/python" -m mpt_jax.main "$@"
    ;;
  *)
    echo "usage: bash launch.sh {demo|test|lint|mini-study|run|study|tpu} [args...]" >&2; exit 2;;
esac
