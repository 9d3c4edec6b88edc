#!/usr/bin/env bash
# Runs on a machine with an NVIDIA GPU: checks the GPU path against the CPU path, then measures
# it against the device's own ceilings, and writes gpu-results.{json,md} (with the date and the
# GPU) into RESULTS_DIR.
#
# Usage: run.sh [BUNDLE_OR_DIR] [RESULTS_DIR]
#   BUNDLE_OR_DIR: dist/pd-gpu.tar.xz from deploy/gpu/build.sh, or the folder it unpacks to
#   (default: the folder this script is in). RESULTS_DIR default: ./gpu-results.
# Extra arguments for `pd-bench gpu` go in PD_GPU_BENCH_ARGS (e.g. "--shape llama3-1b").
set -euo pipefail
SRC=${1:-$(dirname "$0")}
RESULTS=${2:-gpu-results}
if [ -f "$SRC" ]; then
  DIR=$(mktemp -d)
  xz -dc "$SRC" | tar -C "$DIR" -xf -
  BIN=$DIR/pd-gpu
else
  BIN=$(cd "$SRC" && pwd)
fi
# CUDA libraries: the system's, plus those of NVIDIA's Python wheels where they are installed.
for py in python3 /opt/*/.venv/bin/python3; do
  NV=$("$py" -c 'import nvidia,os;print(nvidia.__path__[0])' 2>/dev/null || true)
  if [ -n "$NV" ]; then
    for d in "$NV"/cu13/lib "$NV"/nccl/lib "$NV"/cublas/lib "$NV"/cuda_runtime/lib; do
      [ -d "$d" ] && LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}
    done
    break
  fi
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
# NVLink multicast (NVLS) stays off: point-to-point transfers do not use it.
export NCCL_NVLS_ENABLE=0
export PD_BENCH_DATE=$(date -u +%Y-%m-%d)
export PD_BENCH_DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
mkdir -p "$RESULTS"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$RESULTS/gpu-info.txt" 2>&1 || true
# shellcheck disable=SC2086
"$BIN/pd-bench" gpu --out "$RESULTS" ${PD_GPU_BENCH_ARGS:-} 2>&1 | tee "$RESULTS/gpu-bench.log"
