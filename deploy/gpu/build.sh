#!/usr/bin/env bash
# Builds the GPU binaries (pd-prefill, pd-decode with `nccl`, pd-bench with `cuda`; pd-router and
# pd-cluster are CPU programs) on any x86-64 Linux machine, with or without a GPU, and packs them
# into dist/pd-gpu.tar.xz for a machine with an NVIDIA GPU (run them there with
# deploy/gpu/run.sh).
#
# Needs nvcc: an installed CUDA toolkit (12.x or 13.x; CUDA_HOME or PATH), or, without one,
# the wheel toolchain: deploy/gpu/cuda-wheels.sh once, which this script then uses.
# CUDA_COMPUTE_CAP selects the GPU generation (default 90: Hopper).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"
if ! command -v nvcc >/dev/null && [ ! -x "${CUDA_HOME:-/nonexistent}/bin/nvcc" ]; then
  if [ ! -d "${HOME}/.cache/pd-cuda13" ]; then
    deploy/gpu/cuda-wheels.sh
  fi
  # shellcheck disable=SC1091
  source deploy/gpu/cuda-env.sh
fi
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
FEATURES=${PD_GPU_FEATURES:-cuda}
cargo build --release --locked --features "$FEATURES" -p pd-tests --bin pd-bench
cargo build --release --locked --features "$FEATURES" -p pd-prefill -p pd-decode
cargo build --release --locked -p pd-router -p pd-tests --bin pd-cluster
rm -rf dist/pd-gpu && mkdir -p dist/pd-gpu
for b in pd-bench pd-prefill pd-decode pd-router pd-cluster; do
  cp "target/release/$b" dist/pd-gpu/
  strip dist/pd-gpu/$b
done
cp deploy/gpu/run.sh dist/pd-gpu/
tar -C dist -cf - pd-gpu | xz -T0 -6 > dist/pd-gpu.tar.xz
ls -la dist/pd-gpu.tar.xz
