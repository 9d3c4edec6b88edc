#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing (etcd, protoc, the
# model), then `cargo test` over the workspace. Extra arguments go to cargo test (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."

# System packages: etcd for the membership tests; protoc and its well-known types
# (google/protobuf/*.proto) for etcd-client's build script.
missing=()
command -v etcd >/dev/null || missing+=(etcd-server)
command -v protoc >/dev/null || missing+=(protobuf-compiler)
[ -n "${PROTOC_INCLUDE:-}" ] || [ -e /usr/include/google/protobuf/descriptor.proto ] ||
    missing+=(libprotobuf-dev)
if [ "${#missing[@]}" -gt 0 ]; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update
    $sudo env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi

deploy/fetch-model.sh >/dev/null
cargo test --workspace --locked "$@"
