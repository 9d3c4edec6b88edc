#!/usr/bin/env bash
# pd-cluster next to llama.cpp's OpenAI-compatible server, serving the same GGUF on the same
# machine, measured one after the other by the same load generator (`pd-bench serve`) with the
# same workload, then printed side by side (`pd-bench compare`).
#
# llama.cpp comes from PyPI's llama-cpp-python source package, built into a virtual environment
# outside the repository (~/.cache/pd-bench) the first time (several minutes on a small machine).
#
# Usage: deploy/bench/serve-vs-llama-cpp.sh [RESULT_DIR] [-- extra pd-bench serve flags]
# Environment: PD_CLUSTER_FLAGS (default "--prefill 1 --decode 1"), LLAMA_CPP_FLAGS (extra flags
# of llama_cpp.server), LLAMA_CPP_VERSION.
set -euo pipefail
cd "$(dirname "$0")/../.."

out=${1:-bench-results/serve-vs-llama-cpp}
shift || true
[ "${1:-}" = "--" ] && shift
mkdir -p "$out"
venv=${LLAMA_CPP_VENV:-$HOME/.cache/pd-bench/llama-cpp-venv}
version=${LLAMA_CPP_VERSION:-0.3.36}

deploy/install-deps.sh
model=$(deploy/fetch-model.sh | tail -n1)
cargo build --locked --workspace --bins
if ! "$venv/bin/python" -c "import llama_cpp.server" 2>/dev/null; then
    echo "building llama-cpp-python $version into $venv ..." >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet "llama-cpp-python[server]==$version"
fi

pids=()
cleanup() { for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
trap cleanup EXIT

# The workload: 64 random prompts of ~256 tokens, 64 output tokens, 4 in flight, Poisson arrivals.
workload=(--dataset-name random --random-input-len 256 --random-output-len 64 --num-prompts 64
    --request-rate 2 --max-concurrency 4 --ignore-eos --percentile-metrics ttft,tpot,itl,e2el
    --metric-percentiles 50,90,99 --save-result --result-dir "$out" --tokenizer "$model" "$@")

ready=$(mktemp)
# shellcheck disable=SC2086
target/debug/pd-cluster ${PD_CLUSTER_FLAGS:---prefill 1 --decode 1} --http-listen 127.0.0.1:0 \
    --grpc-listen 127.0.0.1:0 >"$ready" &
pids+=($!)
until grep -q '"event":"ready"' "$ready"; do
    kill -0 "${pids[0]}" 2>/dev/null || { echo "pd-cluster failed to start" >&2; exit 1; }
    sleep 0.2
done
ours=$(grep '"event":"ready"' "$ready" | python3 -c 'import json,sys; print(json.loads(sys.stdin.readline())["http"])')
target/debug/pd-bench serve --base-url "$ours" --label pd-cluster --result-filename pd-cluster.json "${workload[@]}"
cleanup
pids=()

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
threads=$(nproc)
# It serves one request at a time; by default a new request cuts the stream of the one being
# served short (--interrupt_requests), which would count as a fast, short answer.
# shellcheck disable=SC2086
"$venv/bin/python" -m llama_cpp.server --model "$model" --host 127.0.0.1 --port "$port" \
    --n_ctx 4096 --n_threads "$threads" --model_alias smollm2 --interrupt_requests False \
    ${LLAMA_CPP_FLAGS:-} >"$out/llama-cpp.log" 2>&1 &
pids+=($!)
# llama-cpp-python ignores `ignore_eos`: the end-of-text tokens are biased away instead, so both
# servers generate every requested token.
eos_bias=$("$venv/bin/python" -c '
import json, sys, llama_cpp
m = llama_cpp.Llama(model_path=sys.argv[1], vocab_only=True, verbose=False)
ids = {m.token_eos(), m.token_bos()}
for name in (b"<|endoftext|>", b"<|im_end|>", b"<|eot_id|>"):
    t = m.tokenize(name, add_bos=False, special=True)
    if len(t) == 1:
        ids.add(t[0])
print(json.dumps({"logit_bias": {str(i): -100 for i in sorted(ids)}}))' "$model" 2>/dev/null)
bench_flags=(--base-url "http://127.0.0.1:$port" --label llama-cpp --result-filename llama-cpp.json
    --ready-check-timeout-sec 300 --extra-body "$eos_bias")
target/debug/pd-bench serve "${bench_flags[@]}" "${workload[@]}"

echo
target/debug/pd-bench compare "$out/pd-cluster.json" "$out/llama-cpp.json" | tee "$out/compare.txt"
