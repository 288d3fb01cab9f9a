#!/bin/sh
# The lowering tables of docs/lowering.md: both real layer shapes, f16 and int4, every form (loop, native,
# the default `auto`, hybrid, per-expert, cpu), each configuration as one run under the benchmark lock the
# shared machine's sessions use (timed runs are exclusive; large ones also take the memory lock), then the
# deployed runtime memory of each form (benchmarks/deployed_memory.py). With LLAMA_BENCH (llama.cpp's
# llama-bench) and PEER_DIR (models/export_gguf.py's output, --layer qwen3 and mixtral) set, every run also
# times llama.cpp on the same weights (benchmarks/peer_llamacpp.py) and builds the layer from PEER_DIR's Hugging
# Face folder.
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for config in "qwen3 f16" "qwen3 int4" "mixtral f16" "mixtral int4"; do
    set -- $config
    peer=""
    if [ -n "${LLAMA_BENCH:-}" ] && [ -n "${PEER_DIR:-}" ]; then
        peer="--peer-dir $PEER_DIR --llama-bench $LLAMA_BENCH"
    fi
    echo "== $1 $2 ($(date -u +%H:%M) UTC, load $(cut -d' ' -f1 /proc/loadavg))"
    flock /tmp/moe-bench.lock flock /tmp/moe-mem.lock "$PY" benchmarks/lowering.py --layer "$1" --weights "$2" \
        --targets auto,per-expert,hybrid,cpu --prefill 128,512 $peer ${EXTRA:-}
    flock /tmp/moe-bench.lock flock /tmp/moe-mem.lock "$PY" benchmarks/deployed_memory.py --layer "$1" --weights "$2"
done
