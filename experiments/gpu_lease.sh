#!/usr/bin/env bash
# One short GPU lease, prepared to run unattended in about 9 minutes on one NVIDIA GPU (an H200 here):
#   1. issue 11: pretrain two candidate frozen models with experiments/pretrain_small_t5.py side by side
#      (bf16 compute, a batch 8x the CPU runs', the objective mixture of span corruption and prefix LM,
#      lexicographer categories in the corpus), each stopped by a time budget: the shipped shape
#      (d_model 128, 4+4 layers) and d_model 256 (4+4);
#   2. issue 13: the GPU table (benchmarks/bench_steps.py --gpu) on the sections that decide its targets.
# Everything it writes goes under $OUT (default gpu_out/), at most 7 files: run.log, the two models with
# their pretraining logs as one tar split into 15 MiB parts (`cat models.tgz.part* | tar xz`), and the
# table's gpu_<date>.{json,md} and bench.log.
#
# Needs, beside the checkout (prepare them here, where the network is; both are git-ignored):
#   .gpu/wordnet/data.{noun,verb,adj,adv}   cp /usr/share/wordnet/data.* .gpu/wordnet/
#   .gpu/tokenizer/{spiece.model,trained_with.json}   the vocabulary already trained on the same corpus
#       (any work_dir/tokenizer of a --categories run with the default --vocab_size and --seed)
#   .whl/higher-0.2.1-py3-none-any.whl     the reference's MAML (pip download higher==0.2.1)
# and JAX with CUDA, flax, optax, torch and transformers installed (the device image has them).
#
# A CPU dry run of the same code path (tiny shapes, a minute or two each):
#   PRE_MIN=0.5 PRE_SHAPES="32:64:1 32:64:1" PRE_BATCH=8 PRE_WARMUP=10 BENCH_ARGS="--scale tiny --budget_s 120" \
#     OUT=/tmp/gpu_dry bash experiments/gpu_lease.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_out}"
PY="${PY:-python3}"
PRE_MIN="${PRE_MIN:-3.5}"                       # each pretraining run's time budget, corpus included
PRE_SHAPES="${PRE_SHAPES:-128:512:4 256:1024:4}" # d_model:d_ff:layers (encoder = decoder layers)
PRE_BATCH="${PRE_BATCH:-256}"
PRE_STEPS="${PRE_STEPS:-6000}"                  # the cosine schedule's length (the time budget may stop first)
PRE_WARMUP="${PRE_WARMUP:-300}"
BENCH_ARGS="${BENCH_ARGS:---budget_s 270}"
BENCH_SECTIONS="${BENCH_SECTIONS:-env,reference,maml_scan,grid_padded,grid_bucketed,dev_eval,maml_bf16}"
mkdir -p "$OUT" gpu_runs
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPT_WORDNET_DIR="$PWD/.gpu/wordnet"
if ls .whl/*.whl >/dev/null 2>&1 && ! "$PY" -c "import higher" 2>/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
    && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null || true; } 2>&1 | tee "$OUT/run.log"

# -- 1. pretraining, the candidates side by side (small models share the GPU; each gets a memory slice)
t0=$(date +%s)
pids=()
for shape in $PRE_SHAPES; do
  IFS=: read -r d ff layers <<<"$shape"
  name="d${d}_${layers}x${layers}"
  mkdir -p "gpu_runs/$name/work/tokenizer"
  cp .gpu/tokenizer/spiece.model .gpu/tokenizer/trained_with.json "gpu_runs/$name/work/tokenizer/"
  XLA_PYTHON_CLIENT_MEM_FRACTION=0.25 "$PY" experiments/pretrain_small_t5.py \
    --objective=mixture --span_fraction=0.5 --categories --chunk_len=64 --heldout_chunk_len=64 \
    --compute_dtype=bfloat16 --save_dtype=bfloat16 --batch_size="$PRE_BATCH" --lr=2e-3 --warmup_steps="$PRE_WARMUP" \
    --steps="$PRE_STEPS" --eval_every=500 --ckpt_every=1000000 --time_budget_min="$PRE_MIN" \
    --d_model="$d" --d_ff="$ff" --num_heads=4 --num_layers="$layers" \
    --out_dir="gpu_runs/$name/model" --work_dir="gpu_runs/$name/work" --plot="gpu_runs/$name/model/loss.png" \
    >"gpu_runs/$name/model_pretrain.log" 2>&1 &
  pids+=($!)
done
for pid in "${pids[@]}"; do wait "$pid" || echo "a pretraining run failed (exit $?)" | tee -a "$OUT/run.log"; done
{ echo "pretraining: $(($(date +%s) - t0)) s"
  for log in gpu_runs/*/model_pretrain.log; do echo "== $log"; grep -E "^(step|time budget|parameters|tokens)" "$log" | tail -n 8; tail -n 2 "$log"; done
} 2>&1 | tee -a "$OUT/run.log"
(cd gpu_runs && tar czf - */model */model_pretrain.log) | split -b 15m - "$OUT/models.tgz.part"

# -- 2. the GPU table (sections in order of importance; each skipped when the budget cannot hold it)
t0=$(date +%s)
# shellcheck disable=SC2086
"$PY" -m benchmarks.bench_steps --gpu $BENCH_ARGS --sections "$BENCH_SECTIONS" --out "$OUT" 2>&1 \
  | tee "$OUT/bench.log" | grep -v Warning
echo "GPU table: $(($(date +%s) - t0)) s" | tee -a "$OUT/run.log"
ls -la "$OUT" | tee -a "$OUT/run.log"
