"""FusedExperts' numpy reference kernel against the lowered OpenVINO layer, at a real layer shape.

    python benchmarks/kernel.py [--layer qwen3] [--weights f16,int4] [--runs 5] [--no-evaluate]

Per weight type (models/bench_models.py: f16, NNCF-style int4 asym group 128), in one run, forms interleaved
round by round, prefill (T=128) and decode (T=1), medians of --runs:
- `lowered`: the layer as FusedExperts, lowered with moe_fusion.lower's default target, compiled on CPU with
  the plugin's default config (router included: a [T, H] x [H, E] MatMul, ~1% of prefill);
- `kernel`: moe_fusion.reference.fused_experts called directly on the weights as stored (f16 arrays
  [E, in, out]; int4 as packed nibbles + f16 scales + zero points, decompressed per expert by an
  `ExpertWeights`), on the routing the same router gives;
- `evaluate`: the FusedExperts layer itself compiled on CPU, i.e. what a user running the op gets. The
  plugin folds the weights' decompression (f16 Convert, int4 chain) into f32 constants at compile time, so
  the op's evaluate receives f32 weights: faster per call, but the whole layer is held in f32 (RssAnon).
Prints the ratios kernel/lowered and evaluate/lowered, the kernel's outputs against the lowered layer's, and
peak RssAnon: of the process after each form is built, and, in a fresh process holding only the weights as
stored, the kernel's peak over them (sampled every millisecond during one prefill and one decode).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.bench_models import SHAPES, SYM_ZERO, WEIGHT_TYPES, LayerWeights, fused_layer, layer_weights
from moe_fusion.io import core
from moe_fusion.lower import DEFAULT_TARGET, lower
from moe_fusion.reference import ExpertWeights, fused_experts

PHASES = {"prefill": 128, "decode": 1}


def rss_anon_gb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024 / 1e9
    return 0.0


def peak_rss_anon(fn: Callable[[], object], every: float = 1e-3) -> float:
    """The highest RssAnon (GB) seen while `fn` runs, sampled from a thread."""
    peak, done = [rss_anon_gb()], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak.append(rss_anon_gb())
            time.sleep(every)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(max(peak), rss_anon_gb())


def router(weights: LayerWeights, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The layer's router in numpy (softmax -> top-k): routing weights and indices [T, K]."""
    logits = x @ weights.router.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, : weights.shape.top_k]
    rw = np.take_along_axis(probs, idx, -1)
    if weights.shape.normalize:
        rw /= rw.sum(-1, keepdims=True)
    return rw.astype(np.float32), idx


def int4_experts(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> ExpertWeights:
    """int4 weights as stored (codes [E, out, groups, group] packed two per byte, low nibble first; f16
    scale and zero point per group), decompressed per expert to f32 `(code - zero) * scale`, `[in, out]`
    (the values models/bench_models.py's reference computes; OpenVINO's decompression subgraph rounds the
    product to f16 first, the CPU plugin's compressed kernels do not)."""
    e, out, groups, group = codes.shape
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)  # what a u4 Constant stores
    scale32 = scale.astype(np.float32)
    zero8 = np.full((e, 1, groups, 1), SYM_ZERO, np.int8) if zero is None else zero.astype(np.int8)  # int4-sym

    local = threading.local()  # per thread, a buffer reused expert after expert (see ExpertWeights)

    def expert(i: int) -> np.ndarray:
        if not hasattr(local, "values"):
            local.values = np.empty((out, groups, group), np.float32)
        codes = np.stack((packed[i] & 15, packed[i] >> 4), axis=-1).view(np.int8).reshape(out, groups, group)
        codes -= zero8[i]  # codes and zero points are 0..15: exact in int8
        np.multiply(codes, scale32[i], out=local.values)
        return local.values.reshape(out, groups * group).T

    return ExpertWeights((e, groups * group, out), expert)


def kernel_weights(weights: LayerWeights) -> list:
    """The three expert weights `[E, in, out]` as the kernel reads them, as stored."""
    names = ("gate", "up", "down")
    if weights.weight_type == "f16":  # the layout the rewrite stacks f16 weights in
        return [np.ascontiguousarray(np.swapaxes(getattr(weights, n), 1, 2)) for n in names]
    return [int4_experts(getattr(weights, n), *weights.scales[n]) for n in names]


class Form:
    def __init__(self, name: str, run: Callable[[np.ndarray], np.ndarray]) -> None:
        self.name, self.run = name, run
        self.times: dict[str, list[float]] = {p: [] for p in PHASES}

    def timed(self, phase: str, x: np.ndarray) -> None:
        start = time.perf_counter()
        self.run(x)
        self.times[phase].append(time.perf_counter() - start)

    def ms(self, phase: str) -> float:
        return 1e3 * statistics.median(self.times[phase])


def compiled_form(name: str, model: ov.Model) -> tuple[Form, float]:
    start = time.perf_counter()
    request = core().compile_model(model, "CPU").create_infer_request()
    seconds = time.perf_counter() - start
    return Form(name, lambda x: request.infer({0: x[None]})[0][0].copy()), seconds


def kernel_memory(weight_type: str, layer: str) -> str:
    """In a fresh process (this script with --kernel-memory): the weights as stored, then the kernel's peak
    RssAnon over one prefill and one decode."""
    shape = SHAPES[layer]
    weights = layer_weights(shape, weight_type)
    stored = kernel_weights(weights)
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal((t, shape.hidden), dtype=np.float32) for t in PHASES.values()]
    routes = [router(weights, x) for x in inputs]
    del weights
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # what building freed goes back, so the baseline is the inputs
    stored_gb = sum(w.nbytes for w in stored if isinstance(w, np.ndarray)) / 1e9
    base = rss_anon_gb()
    runs = [lambda x=x, r=r: fused_experts(x, *r, stored) for x, r in zip(inputs, routes, strict=True)]
    peak = max(peak_rss_anon(run) for run in runs)
    f32_expert = 4 * 3 * shape.hidden * shape.intermediate / 1e6
    return (f"kernel alone (fresh process): RssAnon {base:.2f} GB with its inputs"
            f"{f' ({stored_gb:.2f} GB of f16 weights)' if stored_gb else ''}, peak {peak:.2f} GB while running: "
            f"+{1e3 * (peak - base):.0f} MB (one expert in f32: {f32_expert:.0f} MB; all experts in f32: "
            f"{f32_expert * shape.experts / 1e3:.1f} GB)")


def bench(weight_type: str, layer: str, runs: int, evaluate: bool) -> list[str]:
    shape = SHAPES[layer]
    child = subprocess.run([sys.executable, __file__, "--layer", layer, "--kernel-memory", weight_type],
                           capture_output=True, text=True, check=True)
    memory = child.stdout.strip().splitlines()[-1]
    print(f"\n{weight_type}: {memory}", flush=True)
    weights = layer_weights(shape, weight_type)
    stored = kernel_weights(weights)
    rng = np.random.default_rng(0)
    inputs = {p: rng.standard_normal((t, shape.hidden), dtype=np.float32) for p, t in PHASES.items()}
    routes = {p: router(weights, x) for p, x in inputs.items()}
    base = rss_anon_gb()
    print(f"{weight_type}: weights as stored built, RssAnon {base:.2f} GB", flush=True)

    model = fused_layer(weights)
    lower(model, DEFAULT_TARGET)
    lowered, seconds = compiled_form(f"lowered {DEFAULT_TARGET}", model)
    del model
    print(f"  lowered: compiled in {seconds:.1f} s, RssAnon {rss_anon_gb():.2f} GB", flush=True)
    kernel = Form("kernel", lambda x: fused_experts(x, *routes["prefill" if len(x) > 1 else "decode"], stored))
    forms = [lowered, kernel]
    if evaluate:
        fused, seconds = compiled_form("evaluate", fused_layer(weights))
        print(f"  FusedExperts (evaluate): compiled in {seconds:.1f} s, RssAnon {rss_anon_gb():.2f} GB "
              "(weights folded to f32 by the plugin)", flush=True)
        forms.append(fused)
    del weights

    for form in forms:  # warm-up: first touch of weights and pages, shape-dependent kernels
        for x in inputs.values():
            form.run(x)
    for _ in range(runs):
        for phase, x in inputs.items():
            for form in forms:
                form.timed(phase, x)
    want = lowered.run(inputs["prefill"])
    errors = {f.name: float(np.abs(f.run(inputs["prefill"]) - want).max() / np.abs(want).max()) for f in forms}

    lines = [f"{weight_type}: {memory}"]
    for form in forms:
        ratios = "" if form is lowered else "   ".join(
            f"{form.ms(p) / lowered.ms(p):5.1f}x" for p in PHASES)
        lines.append(f"  {form.name:<14} prefill {form.ms('prefill'):8.1f} ms   decode {form.ms('decode'):7.2f} ms   "
                     f"{ratios:<16} max rel vs lowered {errors[form.name]:.1e}")
    print("\n".join(lines), flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=sorted(SHAPES), default="qwen3")
    parser.add_argument("--weights", default=",".join(WEIGHT_TYPES), help="comma-separated: f16,int4")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--no-evaluate", action="store_true", help="skip the compiled FusedExperts (evaluate)")
    parser.add_argument("--kernel-memory", choices=WEIGHT_TYPES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.kernel_memory:
        print(kernel_memory(args.kernel_memory, args.layer))
        return
    kinds = [w for w in args.weights.split(",") if w]
    if unknown := [w for w in kinds if w not in WEIGHT_TYPES]:
        parser.error(f"unknown weight types {unknown}; expected {', '.join(WEIGHT_TYPES)}")
    s = SHAPES[args.layer]
    precision = core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    print(f"{s.name} layer H={s.hidden} I={s.intermediate} E={s.experts} K={s.top_k}; prefill T={PHASES['prefill']}, "
          f"decode T={PHASES['decode']}; median of {args.runs}, forms interleaved; CPU precision {precision}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
          f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '-')} "
          f"OPENBLAS_L2_SIZE={os.environ.get('OPENBLAS_L2_SIZE', '-')}")
    summary = []
    for kind in kinds:
        summary += bench(kind, args.layer, args.runs, not args.no_evaluate)
    print("\nratios: time / the lowered layer's, prefill then decode (target: <= 5x)\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
