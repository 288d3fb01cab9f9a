"""Compile time, prefill and decode latency of one MoE layer: unfused originals vs FusedExperts lowered.

    python benchmarks/lowering.py [--layer qwen3|mixtral] [--weights f16|int4] [--runs 5]
                                  [--targets tiled,grouped] [--precision default|f32|bf16] [--no-reference]

Builds the layer (models/bench_models.py) as the per-expert loop an optimum-intel 1.x export holds (F1) and
as the tiled form OpenVINO's CPU plugin runs natively as GatherMatmul (F2), fuses the loop into FusedExperts
(moe_fusion.fuse) and lowers it to each target (moe_fusion.lower), all in this one run, and prints per form:
compile time, prefill (T=128) and decode (T=1) latency as the median of --runs rounds (each round runs every
form in turn, so load from other processes on shared cores lands on all forms alike), their ratios against the
loop and the native tiled path, and the decode bandwidth floor: the bytes of the K experts a token reads
divided by the memory read bandwidth measured here (numpy, one thread). int4 weights: moe_fusion.fuse does
not fuse compressed weights yet, so the FusedExperts is built directly in the form that rewrite produces.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.bench_models import SHAPES, WEIGHT_TYPES, fused_layer, layer_weights, loop_layer, tiled_layer
from moe_fusion.fuse import fuse
from moe_fusion.io import core
from moe_fusion.lower import TARGETS, lower

PREFILL, DECODE = 128, 1


@dataclass
class Row:
    form: str
    compile_s: float
    prefill_ms: float
    decode_ms: float
    prepare_s: float = 0.0  # fuse + lower (or building the FusedExperts), outside compile
    max_rel: float = 0.0  # largest |difference| vs the loop original, relative to its scale (prefill)


def read_bandwidth(gib: float = 1.0, repeats: int = 3, threads: int = 1) -> float:
    """Bytes per second numpy reads a `gib` GiB array with (a sum over it, split over `threads` threads,
    which numpy runs without the GIL), best of `repeats`."""
    a = np.ones(int(gib * (1 << 30)) // 8, dtype=np.float64)
    parts = np.array_split(a, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(np.sum, parts))
            best = min(best, time.perf_counter() - start)
    return a.nbytes / best


class Timed:
    """One compiled form and its latencies; rounds interleave the forms, so load other processes put on
    the shared cores lands on every form alike."""

    def __init__(self, form: str, model: ov.Model, config: dict, prepare_s: float) -> None:
        start = time.perf_counter()
        self.compiled = core().compile_model(model, "CPU", config)
        self.row = Row(form, time.perf_counter() - start, 0.0, 0.0, prepare_s)
        self.request = self.compiled.create_infer_request()
        self.times: dict[str, list[float]] = {"prefill": [], "decode": []}

    def run(self, phase: str, x: np.ndarray) -> None:
        start = time.perf_counter()
        self.request.infer({0: x})
        self.times[phase].append(time.perf_counter() - start)

    def output(self, x: np.ndarray) -> np.ndarray:
        return self.request.infer({0: x})[0].copy()


def measure(forms: list[Timed], inputs: dict, runs: int) -> list[Row]:
    for form in forms:  # warm-up: first touch of the weights, shape-dependent kernels
        for x in inputs.values():
            form.output(x)
    for _ in range(runs):
        for phase, x in inputs.items():
            for form in forms:
                form.run(phase, x)
    want = forms[0].output(inputs["prefill"])
    for form in forms:
        form.row.prefill_ms = 1e3 * statistics.median(form.times["prefill"])
        form.row.decode_ms = 1e3 * statistics.median(form.times["decode"])
        form.row.max_rel = float(np.abs(form.output(inputs["prefill"]) - want).max() / np.abs(want).max())
    return [f.row for f in forms]


def timed(fn: Callable[[], ov.Model]) -> tuple[ov.Model, float]:
    start = time.perf_counter()
    model = fn()
    return model, time.perf_counter() - start


def _lowered(fused: ov.Model, target: str, copy: bool) -> ov.Model:
    model = fused.clone()
    lower(model, target, copy_weights=copy)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=sorted(SHAPES), default="qwen3")
    parser.add_argument("--weights", choices=WEIGHT_TYPES, default="f16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--targets", default="tiled,grouped",
                        help=f"lowering targets, comma-separated ({', '.join(TARGETS)}; cpu = tiled here)")
    parser.add_argument("--precision", default="default", help="INFERENCE_PRECISION_HINT (default: the plugin's)")
    parser.add_argument("--no-reference", action="store_true", help="skip the FusedExperts numpy kernel")
    parser.add_argument("--transpose-op", action="store_true",
                        help="also lower with a Transpose the plugin folds at compile (vs weights copied once)")
    args = parser.parse_args()
    shape = SHAPES[args.layer]
    config = {} if args.precision == "default" else {"INFERENCE_PRECISION_HINT": args.precision}
    targets = [t for t in args.targets.split(",") if t]

    bandwidth = read_bandwidth()
    threads = os.cpu_count() or 1
    bandwidth_all = read_bandwidth(threads=threads)
    weights = layer_weights(shape, args.weights)
    expert_bytes = weights.expert_bytes()
    decode_floor = 1e3 * shape.top_k * expert_bytes / bandwidth
    prefill_floor = 1e3 * shape.experts * expert_bytes / bandwidth
    precision = core().get_property("CPU", "INFERENCE_PRECISION_HINT") if not config else args.precision
    print(f"{shape.name} layer: H={shape.hidden} I={shape.intermediate} E={shape.experts} K={shape.top_k}, "
          f"{args.weights} weights {shape.experts * expert_bytes / 1e9:.2f} GB; CPU precision {precision}, "
          f"{core().get_property('CPU', 'INFERENCE_NUM_THREADS') or 'default'} threads; median of {args.runs}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (numpy, 1 thread), {bandwidth_all / 1e9:.1f} GB/s ({threads} "
          f"threads: floor {1e3 * shape.top_k * expert_bytes / bandwidth_all:.2f} ms)")
    print(f"1-thread floors: decode {decode_floor:.2f} ms "
          f"(K experts, {shape.top_k * expert_bytes / 1e6:.0f} MB), all-experts stream {prefill_floor:.1f} ms")

    rng = np.random.default_rng(0)
    inputs = {n: rng.standard_normal((1, t, shape.hidden), dtype=np.float32) for n, t in
              (("prefill", PREFILL), ("decode", DECODE))}
    forms: list[Timed] = []
    if args.weights == "f16":
        loop, build_s = timed(partial(loop_layer, weights))
        forms.append(Timed("F1 loop (original)", loop, config, build_s))

        def fused_from_loop() -> ov.Model:
            model = loop.clone()
            report = fuse(model, verify=False)
            assert [b.status for b in report.blocks] == ["fused"], report.table()
            return model

        fused, fuse_s = timed(fused_from_loop)
        del loop  # the compiled loop holds its own weights
        source = "F1"
    else:  # moe_fusion.fuse does not fuse this builder's int4 loop; build the FusedExperts it would give
        fused, fuse_s = timed(partial(fused_layer, weights))
        source = "built"
    native, build_s = timed(partial(tiled_layer, weights))
    forms.append(Timed("F2 tiled (native GatherMatmul)", native, config, build_s))
    del native, weights  # from here on only `fused` holds the layer's weights (Mixtral: 2.8 GB each copy)
    gc.collect()
    for target in targets:
        model, lower_s = timed(lambda target=target: _lowered(fused, target, True))
        forms.append(Timed(f"{source} -> lowered {target}", model, config, fuse_s + lower_s))
        del model
        gc.collect()
    if args.transpose_op:
        model, lower_s = timed(lambda: _lowered(fused, targets[0], False))
        forms.append(Timed(f"{source} -> lowered {targets[0]} (Transpose op)", model, config, fuse_s + lower_s))
        del model
    rows = measure(forms, inputs, args.runs)
    del forms
    gc.collect()
    if not args.no_reference:  # ~100x slower: measured on its own, fewer runs
        reference = Timed(f"{source} -> FusedExperts (numpy)", fused, config, fuse_s)
        ref_row = measure([reference], inputs, 3)[0]
        ref_row.max_rel = float("nan")
        rows.append(ref_row)
    _table(rows, decode_floor, prefill_floor)


def _table(rows: list[Row], decode_floor: float, prefill_floor: float) -> None:
    base = rows[0]
    native = next((r for r in rows if r.form.startswith("F2")), None)
    head = (f"{'form':<34} {'prep s':>6} {'compile s':>9} {'prefill ms':>10} {'decode ms':>9} | "
            f"{'compile':>7} {'prefill':>7} {'decode':>7} vs {base.form.split()[0]} | "
            f"{'prefill':>7} {'decode':>7} vs native | {'floor/decode':>12} {'max rel':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        vs_native = (f"{native.prefill_ms / r.prefill_ms:>6.2f}x {native.decode_ms / r.decode_ms:>6.2f}x"
                     if native else " " * 15)
        print(f"{r.form:<34} {r.prepare_s:>6.1f} {r.compile_s:>9.2f} {r.prefill_ms:>10.1f} {r.decode_ms:>9.2f} | "
              f"{base.compile_s / r.compile_s:>6.2f}x {base.prefill_ms / r.prefill_ms:>6.2f}x "
              f"{base.decode_ms / r.decode_ms:>6.2f}x    | {vs_native}           | "
              f"{decode_floor / r.decode_ms:>11.0%} {r.max_rel:>8.1e}")
    print(f"ratios > 1: faster than the loop / the native path. floor/decode: decode floor {decode_floor:.2f} ms "
          f"over the measured decode (100% = at the bandwidth bound); prefill's all-experts stream is "
          f"{prefill_floor:.1f} ms. max rel: prefill output vs the first row, at the run's precision.")


if __name__ == "__main__":
    main()
