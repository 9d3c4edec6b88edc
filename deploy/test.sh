#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing (etcd, protoc, the
# model), builds every binary (the cluster tests start them as processes), then `cargo test`
# over the workspace. Extra arguments go to cargo test (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
deploy/fetch-model.sh >/dev/null
cargo build --workspace --bins --locked
cargo test --workspace --locked "$@"
