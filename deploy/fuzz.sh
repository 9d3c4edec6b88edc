#!/usr/bin/env bash
# Runs the fuzz targets of tests/fuzz (cargo fuzz, libFuzzer) from the seed corpus in
# tests/fuzz/seeds, each for a bounded time; a crash stops the run with the input that caused it
# (tests/fuzz/artifacts/<target>/), which then belongs in the seeds as a regression case.
#
#   deploy/fuzz.sh                 # every target, 60 s each
#   deploy/fuzz.sh 600 kv_push     # one target, 10 minutes
#   deploy/fuzz.sh --smoke         # every target briefly: what the test command runs
#
# Needs cargo-fuzz (installed here from crates.io when missing) and a nightly toolchain, or
# RUSTC_BOOTSTRAP=1 on stable when no nightly is installed. The corpus a run grows is kept under
# .cache/fuzz/ so that later runs start from it.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds=60
if [ "${1:-}" = "--smoke" ]; then
    seconds=${PD_FUZZ_SMOKE_SECONDS:-10}
    shift
elif [ -n "${1:-}" ]; then
    seconds=$1
    shift
fi
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(openai_request grpc_messages kv_push gguf chat_template detokenizer)
fi

command -v cargo-fuzz >/dev/null || cargo install cargo-fuzz --locked --version 0.13.2
deploy/fetch-model.sh >/dev/null
toolchain=()
if rustup run nightly rustc --version >/dev/null 2>&1; then
    toolchain=(+nightly)
else
    export RUSTC_BOOTSTRAP=1
fi
export PD_MODEL="$PWD/.cache/models/SmolLM2-135M-Instruct.Q4_1.gguf"
fuzz=(cargo "${toolchain[@]}" fuzz)
# No sanitizer: the code is Rust, its unsafe blocks are few, and without ASan the runs are
# several times faster (libFuzzer still catches panics, aborts, leaks of time and memory).
"${fuzz[@]}" build --fuzz-dir tests/fuzz --sanitizer none --release
for target in "${targets[@]}"; do
    work=".cache/fuzz/$target"
    mkdir -p "$work"
    echo "fuzz.sh: $target for ${seconds}s" >&2
    "${fuzz[@]}" run --fuzz-dir tests/fuzz --sanitizer none --release "$target" \
        "$work" "tests/fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
done
