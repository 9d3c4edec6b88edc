#!/usr/bin/env bash
# Runs on a machine with NVIDIA GPUs: runs pd-engine's device tests (the GPU path against the CPU
# path), then measures it
# against the device's own ceilings; with two GPUs also KV transfer GPU to GPU (NCCL and gRPC)
# and a 1P1D cluster (prefill on GPU 0, decode on GPU 1) under closed-loop load next to one GPU
# serving aggregated. Writes gpu-results.{json,md} and the logs into RESULTS_DIR.
#
# Usage: run.sh [BUNDLE_OR_DIR] [RESULTS_DIR]
#   BUNDLE_OR_DIR: dist/pd-gpu.tar.xz from deploy/gpu/build.sh, or the folder it unpacks to
#   (default: the folder this script is in). RESULTS_DIR default: ./gpu-results.
# PD_GPU_BENCH_ARGS: extra arguments for `pd-bench gpu` (e.g. "--shape llama3-1b").
# PD_GPU_STEPS: which parts to run (default "single served transfer cluster"; "served" is one GPU
# serving aggregated under closed-loop load at 1, 16 and 64 clients).
set -euo pipefail
SRC=${1:-$(dirname "$0")}
RESULTS=${2:-gpu-results}
STEPS=${PD_GPU_STEPS:-single served transfer cluster}
if [ -f "$SRC" ]; then
  DIR=$(mktemp -d)
  xz -dc "$SRC" | tar -C "$DIR" -xf -
  BIN=$DIR/pd-gpu
else
  BIN=$(cd "$SRC" && pwd)
fi
export PATH=$BIN:$PATH PD_BIN_DIR=$BIN
# CUDA libraries: the system's, plus those of NVIDIA's Python wheels where they are installed.
for py in python3 /opt/*/.venv/bin/python3; do
  NV=$("$py" -c 'import nvidia,os;print(nvidia.__path__[0])' 2>/dev/null || true)
  if [ -n "$NV" ]; then
    for d in "$NV"/cu13/lib "$NV"/nccl/lib "$NV"/cublas/lib "$NV"/cuda_runtime/lib; do
      [ -d "$d" ] && LD_LIBRARY_PATH=$d:${LD_LIBRARY_PATH:-}
    done
    break
  fi
done
export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}
# NVLink multicast (NVLS) stays off: point-to-point transfers do not use it.
export NCCL_NVLS_ENABLE=0
export PD_BENCH_DATE=$(date -u +%Y-%m-%d)
export PD_BENCH_DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 || echo unknown)
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | wc -l || echo 1)
mkdir -p "$RESULTS"
rm -f "$RESULTS/gpu-transfer.jsonl"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv > "$RESULTS/gpu-info.txt" 2>&1 || true
nvidia-smi topo -m >> "$RESULTS/gpu-info.txt" 2>&1 || true
status=0
# Correct first: the kernels and greedy decoding on the GPU against the CPU path.
if ! pd-engine-device-tests --test-threads 1 2>&1 | tee "$RESULTS/device-tests.log"; then
  echo "device tests failed: nothing measured" | tee -a "$RESULTS/device-tests.log"
  exit 1
fi
if [[ " $STEPS " == *" single "* ]]; then
  # shellcheck disable=SC2086
  pd-bench gpu --out "$RESULTS" ${PD_GPU_BENCH_ARGS:-} 2>&1 | tee "$RESULTS/gpu-bench.log" || status=1
fi
if [[ " $STEPS " == *" served "* ]]; then
  # One GPU serving aggregated: Llama-3-8B shape, dummy weights, 512-token prompts, 128 tokens
  # out; the KV cache sized from free memory (the default). Prints each step phase's mean. The
  # prefix cache is off: every prompt is computed, as the figure is meant to say. Once with each
  # kernel set (PD_CUDA_KERNELS, inherited by the nodes; mma-sN also sets the decode ring
  # depth, PD_CUDA_DECODE_STAGES=N, and -unfused turns the fused elementwise kernels off,
  # PD_CUDA_FUSED=0): served.jsonl is the default (mma) set's, served-wmma.jsonl the set it
  # replaced.
  for set in ${PD_SERVED_KERNELS:-mma wmma}; do
    suffix=$([ "$set" = mma ] && echo "" || echo "-$set")
    base=${set%-unfused}
    fused=$([ "$base" = "$set" ] && echo 1 || echo 0)
    stages=${base#*-s}
    [ "$stages" = "$base" ] && stages=""
    env PD_CUDA_KERNELS="${base%%-s*}" PD_CUDA_FUSED=$fused ${stages:+PD_CUDA_DECODE_STAGES=$stages} pd-bench cluster --model dummy:llama3-8b --prompt-tokens 512 --max-tokens 128 \
      --clients "${PD_SERVED_CLIENTS:-1,16,64}" --rounds 2 --modes aggregated --decode-device cuda:0 \
      --node-arg=--max-batch-tokens=2048 --node-arg=--max-num-seqs=64 \
      --node-arg=--no-enable-prefix-caching \
      --json "$RESULTS/served$suffix.jsonl" 2>&1 | tee "$RESULTS/served$suffix.log" || status=1
  done
fi
if [ "$GPUS" -ge 2 ]; then
  if [[ " $STEPS " == *" transfer "* ]]; then
    pd-bench gpu-transfer --from cuda:0 --to cuda:1 --json "$RESULTS/gpu-transfer.jsonl" 2>&1 \
      | tee "$RESULTS/gpu-transfer.log" || status=1
  fi
  if [[ " $STEPS " == *" cluster "* ]]; then
    # Llama-3-8B shape, dummy weights; 512-token prompts, 128 tokens out, 64 clients.
    PD_KEEP_LOGS=1 pd-bench cluster --model dummy:llama3-8b --prompt-tokens 512 --max-tokens 128 \
      --clients 64 --rounds 2 --modes aggregated,disaggregated,disaggregated-grpc \
      --prefill-device cuda:0 --decode-device cuda:1 \
      --node-arg=--kv-cache-mb=16000 --node-arg=--max-batch-tokens=2048 \
      --node-arg=--max-num-seqs=64 --json "$RESULTS/gpu-cluster.jsonl" 2>&1 \
      | tee "$RESULTS/gpu-cluster.log" || status=1
    # Which backend carried the KV: the nodes log NCCL links and any fallback to gRPC.
    for d in $(sed -n 's/.*logs kept in //p' "$RESULTS/gpu-cluster.log"); do
      echo "== $d"
      grep -rhoE "NCCL link (open|joined)|prefill attempt failed.*" "$d" | sort | uniq -c || true
    done > "$RESULTS/gpu-cluster-backends.txt" 2>&1
  fi
else
  if [[ " $STEPS " == *" transfer "* ]]; then
    # One GPU: KV over gRPC from the GPU to a receiver in host memory, then to one on the same
    # GPU (through pinned host memory and loopback TCP), alone and shipped during a prefill.
    for to in cpu cuda:0; do
      pd-bench gpu-transfer --from cuda:0 --to $to --backends grpc --tokens 512,4096 \
        --json "$RESULTS/gpu-transfer.jsonl" 2>&1 | tee -a "$RESULTS/gpu-transfer.log" || status=1
    done
  fi
  echo "one GPU: NCCL transfers and 1P1D measurements need two" | tee -a "$RESULTS/gpu-bench.log"
fi
# The two-GPU figures as markdown tables after the single-GPU ones.
python3 - "$RESULTS" <<'PY' || true
import json, os, sys
d = sys.argv[1]
md = os.path.join(d, "gpu-results.md")
def rows(name):
    p = os.path.join(d, name)
    return [json.loads(l) for l in open(p) if l.strip()] if os.path.exists(p) else []
out = []
if not os.path.exists(md):
    out.append("# GPU results: %s, %s\n" % (os.environ.get("PD_BENCH_DEVICE", ""), os.environ.get("PD_BENCH_DATE", "")))
t = rows("gpu-transfer.jsonl")
if t:
    peak = next((r["nccl_peak_GBps"] for r in t if "nccl_peak_GBps" in r), None)
    out.append("\n## KV transfer (Llama-3-8B KV shape, bf16)\n")
    if peak is not None:
        out.append("NCCL's own send/recv peak on this pair: %.1f GB/s.\n" % peak)
    pct = lambda f: "%.0f%%" % (100 * f) if f is not None else "-"
    out.append("| backend | from | to | tokens | MB | ms | GB/s | of NCCL peak |\n| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in t:
        if "backend" in r:
            out.append("| %s | %s | %s | %d | %.1f | %.2f | %.1f | %s |" % (r["backend"], r.get("from", "cuda:0"), r.get("to", "cuda:1"), r["tokens"], r["bytes"] / 1e6, r["ms"], r["GBps"], pct(r.get("fraction_of_nccl_peak"))))
    out.append("\n| shipped during prefill | to | tokens | prefill alone ms | prefill + shipping ms | added ms | added |\n| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in t:
        if "overlap" in r:
            added = r["prefill_and_ship_ms"] - r["prefill_ms"]
            out.append("| %s | %s | %d | %.1f | %.1f | %.1f | %.1f%% |" % (r["overlap"], r.get("to", "cuda:1"), r["tokens"], r["prefill_ms"], r["prefill_and_ship_ms"], added, 100 * added / r["prefill_ms"]))
served = sorted(n for n in os.listdir(d) if n.startswith("served") and n.endswith(".jsonl"))
for name in served:
  label = "mma kernels (the default)" if name == "served.jsonl" else "%s kernels" % name[len("served-"):-len(".jsonl")]
  s = rows(name)
  if s:
    out.append("\n## Served, one GPU aggregated, %s: dummy Llama-3-8B, 512-token prompts, 128 tokens out\n" % label)
    out.append("| clients | requests | out tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms | step phases, mean ms |\n| ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for r in s:
      if "clients" in r:
        ph = ", ".join("%s %.2f" % (k, v) for k, v in r.get("step_phases_ms", {}).items())
        out.append("| %d | %d | %.0f | %.0f | %.0f | %.1f | %.1f | %s |" % (r["clients"], r["requests"], r["output_tokens_per_s"], r["ttft_p50_ms"], r["ttft_p95_ms"], r["itl_p50_ms"], r["itl_p95_ms"], ph))
c = rows("gpu-cluster.jsonl")
if c:
    out.append("\n## 1P1D (prefill GPU 0, decode GPU 1) vs one GPU aggregated: dummy Llama-3-8B, 512-token prompts, 128 tokens out\n")
    out.append("| mode | clients | requests | out tok/s | TTFT p50 ms | TTFT p95 ms | ITL p50 ms | ITL p95 ms |\n| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in c:
        if "clients" in r:
            out.append("| %s | %d | %d | %.0f | %.0f | %.0f | %.1f | %.1f |" % (r["mode"], r["clients"], r["requests"], r["output_tokens_per_s"], r["ttft_p50_ms"], r["ttft_p95_ms"], r["itl_p50_ms"], r["itl_p95_ms"]))
    for r in c:
        if r.get("check") == "greedy_equal":
            out.append("\nGreedy outputs, %s vs %s: %s." % (r["mode"], r["against"], "identical" if r["identical"] else "DIFFERENT"))
if out:
    with open(md, "a") as f:
        f.write("\n".join(out) + "\n")
PY
exit $status
