#!/usr/bin/env bash
# The GPU check of issue 20, item 6: one prepared script, <= 8 min on one H100/H200.
#
#   benchmarks/gpu_check.sh [--cpu] [--quick] [--results-dir DIR] [--timeout S]
#
# Runs benchmarks/bench_gpu.py through the benchmark harness (own process, peak memory, machine and date
# recorded): SDXL-VAE-shaped encode crops/s (bf16), paper U-Net train step samples/s and share of the bf16
# peak, DPM-Solver++-20 sampling images/s (bf16, torch.compile) incl. VAE decode, and a 2-process NCCL run when
# the machine has >= 2 GPUs. Writes DIR/gpu.parquet (default benchmarks/results; `cpldm cost` reads it),
# rebuilds the RESULTS.md beside DIR's parent, and writes DIR/gpu_check.md (RESULTS-ready text, also printed).
# Without a GPU (or with --cpu) the same code runs at tiny shapes on the CPU in well under a minute.
set -euo pipefail
cd "$(dirname "$0")/.."

RESULTS_DIR=benchmarks/results
DEVICE=auto
QUICK=()
TIMEOUT=470   # the harness kills (and records) the module past this; 8 min = 480 s in all
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) DEVICE=cpu ;;
    --quick) QUICK=(--quick) ;;
    --results-dir) RESULTS_DIR="$2"; shift ;;
    --timeout) TIMEOUT="$2"; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
# offline and on loopback: no hub download (the VAE is built from its config), no cloud metadata probe
export HF_HUB_OFFLINE=1 AWS_EC2_METADATA_DISABLED=true TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/cpldm-inductor}"
if [ "$DEVICE" = cpu ]; then
  export CUDA_VISIBLE_DEVICES=""
  GPUS=0
else
  GPUS=$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)
fi
echo "gpu_check: $GPUS GPU(s) visible; results in $RESULTS_DIR"
if [ "$GPUS" = 0 ]; then
  echo "gpu_check: no GPU: running the CPU check at tiny shapes (same code paths; not cost figures)"
elif [ "$GPUS" = 1 ]; then
  echo "gpu_check: one GPU: the 2-process NCCL run is skipped"
fi

status=0
"$PY" -m benchmarks --only gpu "${QUICK[@]}" --results-dir "$RESULTS_DIR" --timeout "$TIMEOUT" \
  --set "gpu.device=$DEVICE" || status=$?
"$PY" -m benchmarks.bench_gpu --report "$RESULTS_DIR/gpu.parquet" | tee "$RESULTS_DIR/gpu_check.md"
exit "$status"
