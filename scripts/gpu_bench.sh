#!/usr/bin/env bash
# The GPU measurements of docs/benchmarks.md, one phase per device call (each well inside 10 min).
# Prepare on the CPU machine first (downloads the wheels the offline GPU image lacks):
#   bash scripts/gpu_wheels.sh
# then on the GPU machine, from the repository root, with .wheels carried:
#   set -o pipefail; PHASE=anchor bash scripts/gpu_bench.sh 2>&1 | tee "$OUT/log_anchor.txt"
# Phases: anchor (ours vs torchtitan, attention/compile variants), fp8, sparsity, tax, tests, loss.
# Results: $OUT/results.jsonl (one JSON line per bench run) plus each command's output in the log.
set -u
OUT=${OUT:-/tmp/scaletrain_gpu}
PHASE=${PHASE:-anchor}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl || exit 3
export PYTHONPATH=/tmp/site:.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
python3 -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0), 'python', sys.version.split()[0])"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu --format=csv

B="python3 -m scaletrain bench --results $OUT/results.jsonl"
A="--config configs/anchor_1b.toml"
run() { echo "== $*"; local t0; t0=$(date +%s); "$@"; echo "   rc=$? wall=$(( $(date +%s) - t0 ))s"; }

case "$PHASE" in
  anchor)
    run $B $A --peer torchtitan --json "$OUT/anchor_peer.json"
    run $B $A --train.sdpa_backend cudnn
    run $B $A --train.sdpa_backend flash
    run $B $A --train.compile false
    ;;
  anchor2)
    run $B $A --train.compile_mode max-autotune-no-cudagraphs
    run $B $A --parallel.ac selective
    ;;
  fp8)
    run $B $A --train.precision fp8 --train.fp8_recipe tensorwise
    run $B $A --train.precision fp8 --train.fp8_recipe rowwise
    ;;
  sparsity)
    run python3 -m scaletrain bench ffn --json "$OUT/ffn.json"
    run $B $A --model.ffn squared_relu
    run $B $A --model.ffn squared_relu --model.activation_sparsity 2:4
    ;;
  tax)
    for flavor in debug 125M; do
      for mode in off default reduce-overhead; do
        c="--train.compile true --train.compile_mode $mode"; [ "$mode" = off ] && c="--train.compile false"
        run $B --config configs/cpu_debug.toml --model.flavor "$flavor" --data.seq_len 256 --data.batch_size 8 \
            --train.device cuda --train.precision bf16 --optim.fused true --profile-steps 5 $c
      done
    done
    ;;
  tests)
    SCALETRAIN_REQUIRE_GPU=1 run python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider
    ;;
  loss)  # 300-step curves on the built-in corpus: bf16 vs fp8, dense Squared-ReLU vs 2:4
    L="python3 -m scaletrain train --config configs/anchor_1b.toml --train.steps 300 --metrics.log_interval 25 --overwrite"
    run $L --run-dir "$OUT/loss_bf16"
    run $L --run-dir "$OUT/loss_fp8" --train.precision fp8
    ;;
  *) echo "unknown PHASE=$PHASE"; exit 2 ;;
esac
