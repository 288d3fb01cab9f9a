#!/bin/sh
# The lowering table of docs/lowering.md: both real layer shapes, f16 and int4, every form (loop, native,
# the default `auto` and per-expert, ONNX Runtime's MoE/QMoE), each configuration as one run under the
# benchmark lock the shared machine's sessions use (RULES: timed runs are exclusive).
set -e
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
for config in "qwen3 f16" "qwen3 int4" "mixtral f16" "mixtral int4"; do
    set -- $config
    echo "== $1 $2 ($(date -u +%H:%M) UTC, load $(cut -d' ' -f1 /proc/loadavg))"
    flock /tmp/moe-bench.lock "$PY" benchmarks/lowering.py --layer "$1" --weights "$2" ${EXTRA:-}
done
