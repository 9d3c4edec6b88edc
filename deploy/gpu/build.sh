#!/usr/bin/env bash
# Builds the GPU binaries on any x86-64 Linux machine, with or without a GPU, and packs them into
# dist/pd-gpu.tar.xz for a machine with NVIDIA GPUs (run them there with deploy/gpu/run.sh):
# pd-prefill, pd-decode and pd-bench with CUDA and NCCL, pd-router and pd-cluster, and etcd
# when this machine has it (the GPU machine may not).
#
# Needs nvcc: an installed CUDA toolkit (12.x or 13.x; CUDA_HOME or PATH), or, without one,
# the wheel toolchain: deploy/gpu/cuda-wheels.sh, which this script runs when nvcc is missing.
# CUDA_COMPUTE_CAP selects the GPU generation (default 90: Hopper). PD_GPU_FEATURES=cuda builds
# without NCCL.
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
F=${PD_GPU_FEATURES:-nccl}
TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --locked -p pd-prefill -p pd-decode -p pd-tests -p pd-router \
  --features "pd-prefill/$F,pd-decode/$F,pd-tests/$F" \
  --bin pd-prefill --bin pd-decode --bin pd-bench --bin pd-cluster --bin pd-router
# pd-engine's device tests (kernels and greedy decoding against the CPU), which run.sh runs
# before it measures anything.
TESTS=$(cargo test --release --locked -p pd-engine --features cuda --test device --no-run \
  --message-format=json 2>/dev/null \
  | python3 -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "device":
        print(m["executable"])')
rm -rf dist/pd-gpu && mkdir -p dist/pd-gpu
cp "$TESTS" dist/pd-gpu/pd-engine-device-tests
strip dist/pd-gpu/pd-engine-device-tests
for b in pd-bench pd-prefill pd-decode pd-router pd-cluster; do
  cp "$TARGET/release/$b" dist/pd-gpu/
  strip dist/pd-gpu/$b
done
if command -v etcd >/dev/null; then cp "$(command -v etcd)" dist/pd-gpu/; fi
cp deploy/gpu/run.sh dist/pd-gpu/
tar -C dist -cf - pd-gpu | xz -T0 -9e > dist/pd-gpu.tar.xz
ls -la dist/pd-gpu.tar.xz
