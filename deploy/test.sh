#!/usr/bin/env bash
# Runs the whole test suite on a fresh machine: installs what is missing (etcd, protoc, the
# model), checks formatting and lints (rustfmt, clippy with warnings as errors), builds every binary (the cluster tests start them as processes), builds the image the
# container tests run (when a Docker engine answers), checks the Helm chart, runs every fuzz
# target for a few seconds (deploy/fuzz.sh --smoke), then `cargo test`
# over the workspace. Extra arguments go to cargo test (e.g. a test name).
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
deploy/fetch-model.sh >/dev/null
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo build --workspace --bins --locked
if docker info >/dev/null 2>&1; then
    # The binaries just built (dev profile: dependencies and the engine optimised) over the
    # cached base image; tests/tests/containers.rs runs it.
    deploy/docker/build.sh --profile dev
else
    echo "test.sh: no Docker engine answers; the container tests will be skipped" >&2
fi
deploy/helm/check.sh
# A few seconds of each fuzz target from its seeds: a crash fails the run.
deploy/fuzz.sh --smoke
cargo test --workspace --locked "$@"
