#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing (the model), then
# `cargo test` over the workspace. Extra arguments go to cargo test (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/fetch-model.sh >/dev/null
cargo test --workspace --locked "$@"
