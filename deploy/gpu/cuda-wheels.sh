#!/usr/bin/env bash
# A CUDA 13.0 build toolchain from PyPI wheels, for building the GPU binaries on a machine that
# has no GPU and no CUDA toolkit. With an ordinary CUDA toolkit installed (nvcc on PATH or under
# CUDA_HOME) this is not needed.
#
# Usage: deploy/gpu/cuda-wheels.sh [VENV]     (default VENV: ~/.cache/pd-cuda13)
# Then:  source deploy/gpu/cuda-env.sh [VENV]
set -euo pipefail
V=${1:-${HOME}/.cache/pd-cuda13}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
if [ ! -x "$V/bin/python" ]; then
  python3 -m venv "$V"
fi
# 13.0.x: newer nvcc emits PTX that a CUDA 13.0 driver refuses.
"$V/bin/pip" install -q \
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 \
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cublas==13.0.2.14 \
  nvidia-cuda-nvrtc==13.0.88 nvidia-curand==10.4.0.35 nvidia-nccl-cu13==2.28.9
CU=$("$V/bin/python" -c 'import nvidia,os;print(os.path.join(nvidia.__path__[0],"cu13"))')
cd "$CU/lib"
# The linker wants unversioned names; the wheels ship lib*.so.N only.
for l in cudart cublas cublasLt nvrtc; do ln -sf lib$l.so.13 lib$l.so; done
ln -sf libcurand.so.10 libcurand.so
ln -sf ../../nccl/lib/libnccl.so.2 libnccl.so
# No wheel ships the driver library: link against a stub with the driver API's symbols
# (the real libcuda.so.1 of the GPU machine's driver is used at run time).
(cd "$ROOT" && cargo fetch -q)
SYS=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-0.19.10/src/driver/sys/mod.rs | head -1)
mkdir -p stubs
grep -oE '\bfn cu[A-Za-z0-9_]+\(' "$SYS" | sed 's/fn //; s/($//' | sort -u \
  | awk '{print "void " $1 "(void) {}"}' > stubs/libcuda_stub.c
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o stubs/libcuda.so stubs/libcuda_stub.c
echo "CUDA 13.0 toolchain in $CU"
