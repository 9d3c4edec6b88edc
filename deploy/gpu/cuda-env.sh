# Source me before building with `--features cuda` or `nccl` against the wheel toolchain that
# deploy/gpu/cuda-wheels.sh installs: source deploy/gpu/cuda-env.sh [VENV]
_pd_v=${1:-${HOME}/.cache/pd-cuda13}
export CU=$(ls -d "$_pd_v"/lib/python3*/site-packages/nvidia/cu13)
export PATH=$CU/bin:$PATH            # nvcc, for candle's kernels and ours
export CUDA_HOME=$CU                 # cudarc's link search: $CU/lib and $CU/lib/stubs
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CUDARC_CUDA_VERSION=13000
export CUDAFORGE_THREADS=${CUDAFORGE_THREADS:-$(nproc)}
unset _pd_v
