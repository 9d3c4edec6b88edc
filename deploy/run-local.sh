#!/usr/bin/env bash
# The main job on a fresh machine: installs what is missing (etcd, protoc, the model), builds,
# starts a local cluster (etcd + router + 1 prefill + 1 decode node on loopback), sends a real
# chat prompt through the OpenAI-compatible HTTP API, prints the streamed answer, and stops the
# cluster. Pass your own prompt as arguments.
#
# To keep a cluster running instead: target/debug/pd-cluster --prefill N --decode M
set -euo pipefail
cd "$(dirname "$0")/.."

deploy/install-deps.sh
deploy/fetch-model.sh >/dev/null
# The dev profile optimises pd-common and every dependency (see Cargo.toml), and shares its
# build with deploy/test.sh.
cargo build --locked --workspace --bins

prompt=${*:-"Explain in three sentences why the sky is blue."}
ready=$(mktemp)
target/debug/pd-cluster --prefill 1 --decode 1 --http-listen 127.0.0.1:0 --grpc-listen 127.0.0.1:0 >"$ready" &
cluster=$!
trap 'kill -TERM $cluster 2>/dev/null; wait $cluster 2>/dev/null; rm -f "$ready"' EXIT
# pd-cluster prints one JSON line with the endpoints once everything is ready.
until grep -q '"event":"ready"' "$ready"; do
    kill -0 $cluster 2>/dev/null || { echo "the cluster failed to start" >&2; exit 1; }
    sleep 0.2
done
url=$(grep '"event":"ready"' "$ready" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["http"])')
echo "cluster ready at $url; asking: $prompt" >&2
deploy/chat.py "$url" "$prompt" 200
