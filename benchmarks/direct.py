"""What fusing a directly converted (`batched_mm`) MoE layer buys: prefill and decode latency of one layer.

    python benchmarks/direct.py [--layer qwen3] [--runs 5] [--prefill 128]

Builds one layer at a real shape (models/bench_models.py, f16 weights behind a Convert) as the `batched_mm`
form `openvino.convert_model` traces from transformers 5 (docs/converting.md), fuses it with moe_fusion.fuse
(the per-block proof off: at this shape it would run the unfused block on 64 tokens; outputs are compared
here instead) and lowers it to the `cpu` (GatherMatmul) and `per-expert` targets; OpenVINO's native tiled
form (F2) runs beside them as the reference path. The batched_mm form materialises its gathered f32 expert
matrices: it runs the largest prefill of at most --prefill tokens that fits half of MemAvailable (the other
forms run that one and --prefill). Forms are timed one at a time (compile, warm-up, --runs
rounds of prefill and decode, medians, drop): the `batched_mm` prefill alone gathers K expert matrices per
token (151 MB per token at Qwen3-30B-A3B shape in f32), too much to keep every form compiled at once. The
load average is printed after each form. Run it under the benchmark lock.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lowering import available_bytes, rss_gb, runtime_kernels

from models.bench_models import SHAPES, batched_mm_layer, layer_weights, tiled_layer
from moe_fusion.fusing import fuse
from moe_fusion.io import core
from moe_fusion.lower import lower

DECODE = 1


def gathered_bytes(shape, tokens: int) -> int:
    """Bytes the batched_mm form gathers for `tokens` tokens: K copies of 3 expert matrices each, f32."""
    return tokens * shape.top_k * 3 * shape.hidden * shape.intermediate * 4


def time_form(name: str, model, inputs: dict, runs: int) -> dict:
    start = time.perf_counter()
    compiled = core().compile_model(model, "CPU", {})
    compile_s = time.perf_counter() - start
    request = compiled.create_infer_request()
    times = {phase: [] for phase in inputs}
    for x in inputs.values():  # warm-up: first touch of the weights, shape-dependent kernels
        request.infer({0: x})
    for _ in range(runs):
        for phase, x in inputs.items():
            start = time.perf_counter()
            request.infer({0: x})
            times[phase].append(time.perf_counter() - start)
    first = next(iter(inputs))
    out = request.infer({0: inputs[first]})[0].copy()
    kernels = ", ".join(f"{k} {v}" for k, v in sorted(runtime_kernels(compiled).items())) or "-"
    row = {"form": name, "compile_s": compile_s, "kernels": kernels, "out": out,
           **{phase: 1e3 * statistics.median(t) for phase, t in times.items()}}
    del request, compiled
    gc.collect()
    timings = ", ".join(f"{phase} {row[phase]:.1f} ms" for phase in inputs)
    print(f"  {name}: compile {compile_s:.1f} s, {timings} [{kernels}]; load {os.getloadavg()[0]:.2f}, "
          f"peak RSS {rss_gb()[1]:.1f} GB", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layer", choices=sorted(SHAPES), default="qwen3")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--prefill", type=int, default=128, help="prompt tokens (capped by memory, see the log)")
    args = ap.parse_args()
    shape = SHAPES[args.layer]
    fits = args.prefill
    budget = 0.5 * available_bytes()  # the gathered f32 copies (the plugin materialises them), and room
    while fits > 1 and gathered_bytes(shape, fits) > budget:
        fits //= 2
    if fits != args.prefill:
        print(f"the batched_mm form would gather {gathered_bytes(shape, args.prefill) / 1e9:.1f} GB for a prefill of "
              f"{args.prefill} ({available_bytes() / 1e9:.1f} GB available): it runs prefill {fits} only")
    cpu = platform.processor() or platform.machine()
    print(f"{shape.name} layer: H={shape.hidden} I={shape.intermediate} E={shape.experts} k={shape.top_k}, "
          f"f16 weights, {args.runs} runs, CPU default precision ({cpu}; f32 on CPUs without bf16/AMX); "
          f"batched_mm gathers {gathered_bytes(shape, 1) / 1e6:.0f} MB per token", flush=True)
    rng = np.random.default_rng(0)
    sizes = sorted({fits, args.prefill})
    inputs = {f"prefill {t}": rng.standard_normal((1, t, shape.hidden)).astype(np.float32) for t in sizes}
    inputs["decode"] = rng.standard_normal((1, DECODE, shape.hidden)).astype(np.float32)
    small = {k: v for k, v in inputs.items() if k in (f"prefill {fits}", "decode")}
    weights = layer_weights(shape, "f16")
    rows = [time_form("batched_mm (direct convert_model)", batched_mm_layer(weights), small, args.runs)]
    start = time.perf_counter()
    fused = batched_mm_layer(weights)
    report = fuse(fused, verify=False)
    fuse_s = time.perf_counter() - start
    if [b.status for b in report.blocks] != ["fused"]:
        raise SystemExit(f"the batched_mm layer did not fuse:\n{report.table()}")
    print(f"  fused in {fuse_s:.1f} s (batched_mm family)", flush=True)
    for target in ("cpu", "per-expert"):
        model = fused.clone()
        lower(model, target)
        rows.append(time_form(f"fused + lowered --target {target}", model, inputs, args.runs))
        del model
    del fused
    gc.collect()
    rows.append(time_form("native tiled (optimum-intel 2.x form)", tiled_layer(weights), inputs, args.runs))

    base = rows[0]
    first = f"prefill {fits}"
    scale = float(np.abs(base["out"]).max())
    phases = list(inputs)
    print("\n| form | compile s | " + " | ".join(f"{p} ms" for p in phases) + f" | {first} x | decode x | "
          "max rel diff | runtime kernels |\n|" + "---|" * (len(phases) + 6))
    for row in rows:
        diff = float(np.abs(row["out"] - base["out"]).max()) / scale
        cells = " | ".join(f"{row[p]:.1f}" if p in row else "(does not fit)" for p in phases)
        print(f"| {row['form']} | {row['compile_s']:.1f} | {cells} | {base[first] / row[first]:.1f} | "
              f"{base['decode'] / row['decode']:.1f} | {diff:.1e} | {row['kernels']} |")
    print(f"(x = speed-up over the batched_mm original; max rel diff = largest |difference| of the {first} "
          "output vs batched_mm, over its scale)")


if __name__ == "__main__":
    main()
