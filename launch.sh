#!/usr/bin/env bash
# mpt-jax launcher: sets up the pinned environment by itself, then runs `python -m mpt_jax.main`.
#
#   bash launch.sh demo                      # the embedded offline default, end to end
#   bash launch.sh test                      # the test suite
#   bash launch.sh run --config=configs/maml_cls2cls.py --workdir=runs/maml_cls2cls [--config.x=y ...]
#
# The environment lives in .venv (override with MPT_VENV); it is (re)installed whenever the pinned
# requirements file changes.
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
  if [ ! -f "$stamp" ] || ! cmp -s <(cat "$req" requirements.txt) "$stamp"; then
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    "$VENV/bin/python" -m pip install --quiet -r "$req"
    cat "$req" requirements.txt > "$stamp"
  fi
}

cmd="${1:-demo}"; shift || true
case "$cmd" in
  test)
    ensure_env requirements-test.txt
    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
    exec "$VENV/bin/python" -m pytest -q tests "$@"
    ;;
  demo)
    ensure_env requirements.txt
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    exec "$VENV/bin/python" -m mpt_jax.main --config=configs/demo.py --workdir="${MPT_DEMO_WORKDIR:-runs/demo}" "$@"
    ;;
  run)
    ensure_env requirements.txt
    exec "$VENV/bin/python" -m mpt_jax.main "$@"
    ;;
  *)
    echo "usage: bash launch.sh {demo|test|run} [args...]" >&2; exit 2;;
esac
