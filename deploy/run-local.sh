#!/usr/bin/env bash
# The main job on a fresh machine: fetches the model, builds, and answers a real chat prompt with
# the engine, streaming the text. Pass your own prompt as arguments.
set -euo pipefail
cd "$(dirname "$0")/.."

model=$(deploy/fetch-model.sh | tail -n 1)
# The dev profile optimises pd-common and every dependency (see Cargo.toml), and shares its build
# with deploy/test.sh.
cargo build --locked -p pd-common --bin pd-generate
prompt=${*:-"Explain in three sentences why the sky is blue."}
exec target/debug/pd-generate --model "$model" --prompt "$prompt" --max-tokens 200
