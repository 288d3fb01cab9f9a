"""Compile time, prefill and decode latency and runtime memory of one MoE layer: unfused originals, OpenVINO's
native path, FusedExperts lowered, and ONNX Runtime's fused MoE kernel.

    python benchmarks/lowering.py [--layer qwen3|mixtral] [--weights f16|int4|int4-sym] [--runs 5]
                                  [--targets auto,per-expert,hybrid,cpu,tiled,grouped] [--prefill 128,512]
                                  [--precision default|f32|bf16] [--reference] [--no-ort]
                                  [--one-at-a-time auto|yes|no] [--profile] [--transpose-op] [--per-expert]
                                  [--peer-dir DIR --llama-bench PATH]
    benchmarks/lowering_all.sh      # both shapes, f16 and int4, under the benchmark lock

Runtime memory per form: the bytes of the form's weights (its constants; for ONNX Runtime what the session
read) plus what compiling and the first prefill and decode add to the process's peak RSS (VmHWM, reset
before each form through /proc/self/clear_refs).

Builds the layer (models/bench_models.py) as the per-expert loop an optimum-intel 1.x export holds (F1) and
as the tiled form OpenVINO's CPU plugin runs natively as GatherMatmul (F2), fuses the loop into FusedExperts
(moe_fusion.fuse; f16 or NNCF-style int4 weights, asymmetric or `int4-sym`, which stay compressed) and lowers
it to each target (moe_fusion.lower; `auto`, the default, is resolved for this CPU and labelled with the form it
chose; a target it coincides with is timed once), builds ONNX Runtime's `com.microsoft.MoE` (f32 weights) or `QMoE`
(int4) layer (benchmarks/ort_moe.py), all in this one run, and prints per form: compile time, prefill (T=128,
and 512 at Qwen3) and decode (T=1)
latency (decode: 8 distinct tokens one after another per round, so routing changes every step as in generation;
the median over steps) as the median of --runs rounds, the expert kernels of its runtime graph (GatherMatmul,
GatherMatmulCompressed, FullyConnected), their ratios against the loop and the native tiled path, and the
decode bandwidth floor: the bytes of the K experts a token reads divided by the memory read bandwidth
measured here (numpy, one thread).

Two ways to time the forms. Interleaved (the default when memory allows): every form compiled and alive at
once, each round running every form in turn, so load from other processes on shared cores lands on all
forms alike. One at a time (`--one-at-a-time yes`, or `auto` when the estimated memory of all compiled forms
exceeds MemAvailable, e.g. Mixtral's 2.8 GB of f16 experts): compile a form, time its rounds, drop it, next
form; still all in one run, but load changes between forms land on one form only (the log prints the load
average after each). The FusedExperts numpy kernel (`--reference`) is timed on its own either way, with 3 rounds.

llama.cpp as a peer (benchmarks/peer_llamacpp.py): with `--peer-dir DIR` (written by models/export_gguf.py) the
layer's router and experts are read from DIR's Hugging Face folder of --layer (qwen3moe-1l or mixtral-1l; f16 =
its bf16 values exactly, int4 = those quantised here), and with `--llama-bench PATH` (or $LLAMA_BENCH)
llama-bench times DIR's GGUF of the same weights (BF16 for f16, Q4_0 for int4 and int4-sym; the
one-attention-head model, the MoE nearly alone, and the one with the model's own attention) with as many threads
as OpenVINO uses, one llama-bench invocation of --llama-reps repetitions (after its warm-up) per GGUF after
every round of the forms: in interleaved mode after each round of all forms, one at a time after each round of
the form being timed. Each form is thus paired with the llama.cpp samples taken during its own rounds, so load
from other processes lands on both sides of a ratio alike. llama.cpp's rows: prefill and decode medians over all
its invocations of the run, memory = the llama-bench process's peak RSS; a last table compares each form's
decode and prefill with llama.cpp's paired samples and its memory with the stored weights (issue 19: decode <=
1.1x llama.cpp at the same weight type, memory <= 1.5x the stored weights).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ort_moe import OrtForm, ort_moe_model
from benchmarks.peer_llamacpp import Peer, llama_bench_path
from models.bench_models import SHAPES, WEIGHT_TYPES, LayerWeights, layer_weights, loop_layer, tiled_layer
from models.export_gguf import folder_name, hf_layer_weights
from moe_fusion import host
from moe_fusion.compressed import mark_decompression
from moe_fusion.fusing import fuse
from moe_fusion.lower import AUTO, HYBRID, PER_EXPERT, TARGETS, CpuFacts, choose_form, fused_experts_nodes, lower
from moe_fusion.runtime import core

DECODE_STEPS = 8  # decode: distinct tokens one after another, so routing (and the experts read) changes per step


@dataclass
class Row:
    form: str
    compile_s: float
    prefill_ms: dict  # tokens -> median ms
    decode_ms: float
    prepare_s: float = 0.0  # fuse + lower (or building the FusedExperts), outside compile
    max_rel: float = 0.0  # largest |difference| vs the loop original, relative to its scale (prefill)
    memory_gb: float = 0.0  # weights held + peak RSS growth of compile and the first inference
    first_s: float = 0.0  # compile + the first prefill (FullyConnected packs its weights then, GatherMatmul at compile)
    paired: dict = field(default_factory=dict)  # llama.cpp label -> (prefill ms, decode ms) over the form's rounds


def constant_bytes(model: ov.Model) -> int:
    """Bytes of the model's constants, If bodies included, each constant once."""
    sizes: dict[int, int] = {}

    def walk(graph: ov.Model) -> None:
        for node in graph.get_ordered_ops():
            if node.get_type_name() == "Constant":
                sizes[node.get_instance_id()] = node.get_byte_size()
            elif node.get_type_name() == "If":
                walk(node.get_then_body())
                walk(node.get_else_body())

    walk(model)
    return sum(sizes.values())


def reset_peak_rss() -> None:
    """VmHWM := VmRSS (Linux), so the next peak is this form's."""
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


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
    """One compiled form and its latencies; in interleaved mode rounds alternate the forms, so load other
    processes put on the shared cores lands on every form alike."""

    def __init__(self, form: str, model, config: dict, prepare_s: float, first: dict) -> None:
        """`model`: an ov.Model, or the path of ORT's .onnx; `first`: the inputs of the first inference."""
        held = constant_bytes(model) if isinstance(model, ov.Model) else 0
        gc.collect()
        before = rss_gb()[0]
        reset_peak_rss()
        start = time.perf_counter()
        if isinstance(model, ov.Model):
            self.compiled = core().compile_model(model, "CPU", config)
            self.request = self.compiled.create_infer_request()
            self.kernels = runtime_kernels(self.compiled)
        else:
            self.request = OrtForm(model, os.cpu_count() or 1)
            self.kernels = Counter({"onnxruntime " + Path(model).stem: 1})
        self.row = Row(form, time.perf_counter() - start, {}, 0.0, prepare_s)
        for x in first.values():
            self.output(x)
            if not self.row.first_s:
                self.row.first_s = time.perf_counter() - start
        self.row.memory_gb = held / 1e9 + rss_gb()[1] - before
        self.times: dict[str, list[float]] = {phase: [] for phase in first}

    def run(self, phase: str, x: np.ndarray) -> None:
        for step in x if x.ndim == 4 else [x]:  # decode: [steps, 1, 1, H], one timed inference per token
            start = time.perf_counter()
            self.output(step)
            self.times[phase].append(time.perf_counter() - start)

    def output(self, x: np.ndarray) -> np.ndarray:
        if x.ndim == 4:
            return [self.output(step) for step in x][-1]
        if isinstance(self.request, OrtForm):
            return self.request.infer(x)
        return self.request.infer({0: x})[0].copy()

    def finish(self, want: np.ndarray | None, got: np.ndarray) -> Row:
        self.row.prefill_ms = {int(p.split("-")[1]): 1e3 * statistics.median(t) for p, t in self.times.items()
                               if p.startswith("prefill")}
        self.row.decode_ms = 1e3 * statistics.median(self.times["decode"])
        if want is not None:
            self.row.max_rel = float(np.abs(got - want).max() / np.abs(want).max())
        return self.row


def runtime_kernels(compiled: ov.CompiledModel) -> Counter:
    """The matrix kernels of the compiled model's runtime graph by count (GatherMatmul, FullyConnected, MatMul;
    "Compressed(u4)" when the runtime node reads integer weights): shows which path the plugin took."""
    kinds = Counter()
    for node in compiled.get_runtime_model().get_ordered_ops():
        kind = node.get_rt_info()["layerType"].astype(str)
        if kind not in ("GatherMatmul", "FullyConnected", "MatMul"):
            continue
        weight = node.input_value(1).get_element_type()  # u4/u8/i8 weights: the compressed kernel
        kinds[f"{kind}Compressed({weight.get_type_name()})" if weight.is_integral() else kind] += 1
    return kinds


def profile(form: Timed, inputs: dict, top: int = 6) -> str:
    """One inference per phase with PERF_COUNT on: its wall time, the time inside nodes, and where that goes
    by layer type and kernel (exec_type). Nodes that did not run (idle experts) keep their previous counters
    in the plugin's report: only counters that changed in this inference are counted."""
    if isinstance(form.request, OrtForm):
        return f"  profile {form.row.form}: (ONNX Runtime, not profiled)"
    lines = []
    before = {}
    for phase, x in inputs.items():
        if x.ndim == 4:  # decode: the steps before the profiled one run first, as in the timed rounds
            for step in x[:-1]:
                form.request.infer({0: step})
            before = {info.node_name: info.real_time for info in form.request.get_profiling_info()}
            x = x[-1]
        start = time.perf_counter()
        form.request.infer({0: x})
        wall = 1e3 * (time.perf_counter() - start)
        spent: Counter = Counter()
        ran: Counter = Counter()
        for info in form.request.get_profiling_info():
            stale = before.get(info.node_name) == info.real_time
            before[info.node_name] = info.real_time
            if info.real_time.total_seconds() > 0 and not stale:
                spent[f"{info.node_type}/{info.exec_type}"] += info.real_time.total_seconds() * 1e3
                ran[f"{info.node_type}/{info.exec_type}"] += 1
        total = sum(spent.values())
        parts = ", ".join(f"{k} x{ran[k]} {v:.2f} ms ({v / total:.0%})" for k, v in spent.most_common(top))
        lines.append(f"  profile {form.row.form} {phase}: wall {wall:.2f} ms, {total:.2f} ms in "
                     f"{sum(ran.values())} nodes: {parts}")
    return "\n".join(lines)


def measure(forms: list[Timed], inputs: dict, runs: int, peers: list[Peer] = (), reps: int = 1) -> list[Row]:
    """Interleaved: every form compiled and alive at once, rounds running each form in turn (and one
    llama-bench invocation of each peer after every round)."""
    since = [len(peer.runs) for peer in peers]
    for _ in range(runs):  # the first inference of every shape ran when the form was made
        for phase, x in inputs.items():
            for form in forms:
                form.run(phase, x)
        for peer in peers:
            _peer_round(peer, reps)
    first = next(p for p in inputs if p.startswith("prefill"))
    want = forms[0].output(inputs[first])
    for form in forms:
        _pair(form.row, peers, since)
    return [form.finish(want, form.output(inputs[first])) for form in forms]


def measure_alone(form: Timed, inputs: dict, runs: int, peers: list[Peer] = (), reps: int = 1) -> np.ndarray:
    """One form on its own (one-at-a-time mode): warm-up, then `runs` rounds of prefill and decode, each
    followed by one llama-bench invocation of each peer. Returns its prefill output."""
    since = [len(peer.runs) for peer in peers]
    for _ in range(runs):
        for phase, x in inputs.items():
            form.run(phase, x)
        for peer in peers:
            _peer_round(peer, reps)
    _pair(form.row, peers, since)
    return form.output(inputs[next(p for p in inputs if p.startswith("prefill"))])


def _pair(row: Row, peers: list[Peer], since: list[int]) -> None:
    for peer, start in zip(peers, since, strict=True):
        prefill, decode, _ = peer.medians(start)
        row.paired[peer.label] = (prefill, decode)


def timed(fn: Callable[[], ov.Model]) -> tuple[ov.Model, float]:
    start = time.perf_counter()
    model = fn()
    return model, time.perf_counter() - start


def _lowered(fused: ov.Model, target: str, copy: bool) -> ov.Model:
    model = fused.clone()
    lower(model, target, copy_weights=copy)
    return model


# Memory a compiled form takes per byte of f16 expert weights (Qwen3 layer: 4 forms of 1.2 GB reached
# 18 GB RSS), plus the copies of the weights alive while building (numpy, a model, the fused stack).
_RSS_PER_FORM, _RSS_BUILDING = 3.7, 3.0


def available_bytes() -> int:
    """MemAvailable, read as the engine reads it (moe_fusion.host; unknown: no limit)."""
    return host.available_memory()


def rss_gb() -> tuple[float, float]:
    """(current, peak) resident set of this process, GB."""
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / 1e9
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


def _fuse_in_place(model: ov.Model) -> ov.Model:
    report = fuse(model, verify=False)
    if [b.status for b in report.blocks] != ["fused"]:
        raise SystemExit(f"the loop layer did not fuse:\n{report.table()}")
    return model


def as_exported(build: Callable[[LayerWeights], ov.Model], weights: LayerWeights) -> ov.Model:
    """`build(weights)` with every Convert of f16/bf16 storage marked decompression, as `--weight-format
    fp16` exports (and save_model's fp16 compression) store them; unmarked, the plugin folds them into f32
    copies."""
    model = build(weights)
    for node in model.get_ordered_ops():
        source = node.input_value(0) if node.get_input_size() else None
        if node.get_type_name() == "Convert" and source.get_node().get_type_name() == "Constant" \
                and source.get_element_type() in (ov.Type.f16, ov.Type.bf16):
            mark_decompression(node)
    return model


def build_forms(weights: LayerWeights, targets: list[str], transpose_op: bool, reference: bool,
                ort: Path | None) -> Iterator:
    """(form name, model, prepare seconds, measured alone?) one at a time; the caller compiles each model
    before asking for the next, so a model may be changed or dropped after it was yielded."""
    loop, build_s = timed(partial(as_exported, loop_layer, weights))
    yield "F1 loop (original)", loop, build_s, False

    fused, fuse_s = timed(partial(_fuse_in_place, loop))  # the loop is compiled already
    kinds = Counter(n.get_type_name() for n in fused.get_ordered_ops())
    print(f"fused the loop in {fuse_s:.1f} s: {kinds['FusedExperts']} FusedExperts, "
          f"{kinds['Constant']} constants left", flush=True)
    del loop
    native, build_s = timed(partial(as_exported, tiled_layer, weights))
    del weights  # from here on only `fused` holds the layer's weights (Mixtral: 2.8 GB each copy)
    yield "F2 tiled (native GatherMatmul)", native, build_s, False
    del native
    for target, label in _labels(fused, targets).items():
        model, lower_s = timed(lambda target=target: _lowered(fused, target, True))
        yield f"F1 -> lowered {label}", model, fuse_s + lower_s, False
        del model
    if transpose_op:
        model, lower_s = timed(lambda: _lowered(fused, targets[0], False))
        yield f"F1 -> lowered {targets[0]} (Transpose op)", model, fuse_s + lower_s, False
        del model
    if ort is not None:
        yield f"ORT {'MoE f32' if ort.name == 'moe.onnx' else 'QMoE int4'} (peer)", ort, 0.0, False
    if reference:
        yield "F1 -> FusedExperts (numpy)", fused, fuse_s, True


def _labels(fused: ov.Model, targets: list[str]) -> dict[str, str]:
    """Target -> row label; `auto` names the form it chose on this CPU, and a target that is that same form
    is not timed twice (its row is auto's)."""
    labels = {}
    cpu = CpuFacts.detect()
    chosen = {choose_form(node, cpu)[0] for node in fused_experts_nodes(fused)}
    for target in targets:
        if target == AUTO:
            labels[target] = f"auto = {'/'.join(sorted(chosen))}"
        elif AUTO in targets and {target} == chosen:
            continue
        else:
            labels[target] = target
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", choices=sorted(SHAPES), default="qwen3")
    parser.add_argument("--weights", choices=WEIGHT_TYPES, default="f16")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--targets", default="auto,per-expert,hybrid,cpu",
                        help=f"lowering targets, comma-separated ({', '.join(TARGETS)}; auto is resolved for "
                             "this CPU; a target equal to auto's choice is timed once)")
    parser.add_argument("--prefill", default="",
                        help="prefill token counts, comma-separated (default: 128,512 at qwen3, 128 at mixtral)")
    parser.add_argument("--no-ort", action="store_true", help="skip ONNX Runtime's MoE/QMoE peer")
    parser.add_argument("--precision", default="default", help="INFERENCE_PRECISION_HINT (default: the plugin's)")
    parser.add_argument("--reference", action="store_true", help="also time the FusedExperts numpy kernel")
    parser.add_argument("--no-reference", action="store_true", help=argparse.SUPPRESS)  # the old default
    parser.add_argument("--transpose-op", action="store_true",
                        help="also lower with a Transpose the plugin folds at compile (vs weights copied once)")
    parser.add_argument("--one-at-a-time", choices=("auto", "yes", "no"), default="auto",
                        help="compile, time and drop each form before the next (auto: when the estimated "
                             "memory of all forms at once exceeds MemAvailable)")
    parser.add_argument("--per-expert", action="store_true",
                        help="also time the per-expert target (same as adding per-expert to --targets)")
    parser.add_argument("--profile", action="store_true",
                        help="PERF_COUNT on: print where one prefill spends its time, per form")
    parser.add_argument("--peer-dir", type=Path,
                        help="models/export_gguf.py's output: the layer's weights from its HF folder, and its GGUF "
                             "files for llama.cpp")
    parser.add_argument("--llama-bench", help="llama.cpp's llama-bench binary (default: $LLAMA_BENCH)")
    parser.add_argument("--llama-reps", type=int, default=5,
                        help="llama-bench repetitions (-r) per invocation; one invocation per GGUF after every round")
    args = parser.parse_args()
    shape = SHAPES[args.layer]
    config = {} if args.precision == "default" else {"INFERENCE_PRECISION_HINT": args.precision}
    if args.profile:
        config["PERF_COUNT"] = True
    targets = [t for t in args.targets.split(",") if t]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; expected {', '.join(TARGETS)}")
    if args.per_expert and PER_EXPERT not in targets:
        targets.append(PER_EXPERT)

    prefills = [int(t) for t in (args.prefill or ("128,512" if args.layer == "qwen3" else "128")).split(",")]

    bandwidth = read_bandwidth()
    threads = os.cpu_count() or 1
    bandwidth_all = read_bandwidth(threads=threads)
    if args.peer_dir:
        folder = args.peer_dir / folder_name(args.layer)
        if not (folder / "config.json").is_file():
            parser.error(f"--peer-dir: {folder} missing (models/export_gguf.py --layer {args.layer} writes it)")
        weights = hf_layer_weights(folder, args.weights)
        shape = weights.shape
        print(f"weights: router and experts of {folder} ({args.weights})", flush=True)
    else:
        weights = layer_weights(shape, args.weights)
    expert_bytes = weights.expert_bytes()
    layer_bytes = shape.experts * expert_bytes
    decode_floor = 1e3 * shape.top_k * expert_bytes / bandwidth_all
    prefill_floor = 1e3 * layer_bytes / bandwidth_all
    precision = args.precision if "INFERENCE_PRECISION_HINT" in config else \
        core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()
    ort = None
    if not args.no_ort:
        start = time.perf_counter()
        ort = ort_moe_model(weights, Path(tempfile.mkdtemp(prefix="moe-ort-")))
        print(f"wrote ONNX Runtime's layer in {time.perf_counter() - start:.1f} s: {ort}", flush=True)
    n_forms = (2 + len(targets) + args.transpose_op + (ort is not None) * (4 if args.weights == "f16" else 1)
               + 2 * (HYBRID in targets))  # hybrid holds both forms' kernels and two copies of the weights
    estimate = (_RSS_PER_FORM * n_forms + _RSS_BUILDING) * layer_bytes  # int4 stays compressed when compiled
    alone = args.one_at_a_time == "yes" or (args.one_at_a_time == "auto" and estimate > available_bytes())
    print(f"{shape.name} layer: H={shape.hidden} I={shape.intermediate} E={shape.experts} K={shape.top_k}, "
          f"{args.weights} weights {layer_bytes / 1e9:.2f} GB; CPU {CpuFacts.detect().describe()}; OpenVINO "
          f"precision {precision}; median of {args.runs}; load average {os.getloadavg()[0]:.1f} on {threads} cores")
    print(f"memory: all forms at once estimated {estimate / 1e9:.0f} GB, available "
          f"{available_bytes() / 1e9:.0f} GB -> {'one form at a time' if alone else 'interleaved'}")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s (numpy, 1 thread), {bandwidth_all / 1e9:.1f} GB/s ({threads} "
          f"threads); floors at {threads} threads: decode {decode_floor:.2f} ms (K experts, "
          f"{shape.top_k * expert_bytes / 1e6:.0f} MB), all-experts stream {prefill_floor:.1f} ms", flush=True)

    peers = _peers(args, prefills, threads)
    rng = np.random.default_rng(0)
    inputs = {f"prefill-{t}": rng.standard_normal((1, t, shape.hidden), dtype=np.float32) for t in prefills}
    inputs["decode"] = rng.standard_normal((DECODE_STEPS, 1, 1, shape.hidden), dtype=np.float32)
    first = f"prefill-{prefills[0]}"
    forms = build_forms(weights, targets, args.transpose_op, args.reference, ort)
    del weights
    rows: list[Row] = []
    live: list[Timed] = []
    want = None
    notes = []
    for name, model, prepare_s, by_itself in forms:
        form = Timed(name, model, config, prepare_s, {first: inputs[first]} if by_itself else inputs)
        del model
        print(f"compiled {name} in {form.row.compile_s:.1f} s; runtime kernels "
              f"{dict(form.kernels) or 'none'}; memory {form.row.memory_gb:.2f} GB; RSS {rss_gb()[0]:.1f} GB",
              flush=True)
        if not (alone or by_itself):
            live.append(form)
            continue
        if live:  # interleaved forms are measured before the numpy reference, then dropped
            rows += measure(live, inputs, args.runs, peers, args.llama_reps)
            want = want if want is not None else live[0].output(inputs[first])
            notes += [profile(f, inputs) for f in live if args.profile]
            live.clear()
            gc.collect()
        got = measure_alone(form, {first: inputs[first], "decode": inputs["decode"]} if by_itself else inputs,
                            3 if by_itself else args.runs, [] if by_itself else peers, args.llama_reps)
        rows.append(form.finish(None if by_itself else want, got))
        if want is None:
            want = got
        if args.profile and not by_itself:
            notes.append(profile(form, inputs))
        print(f"  {name}: prefill {form.row.prefill_ms} ms, decode {form.row.decode_ms:.2f} ms, load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        if by_itself:
            form.row.max_rel = float("nan")
        del form
        gc.collect()
    if live:
        rows += measure(live, inputs, args.runs, peers, args.llama_reps)
        notes += [profile(f, inputs) for f in live if args.profile]
    peer_rows = [_peer_row(peer) for peer in peers if peer.runs]
    print("\n".join(notes))
    _table(rows + peer_rows, prefills, decode_floor, prefill_floor)
    if peers:
        _peer_targets(rows, peer_rows, peers, layer_bytes / 1e9, prefills[0])


def _table(rows: list[Row], prefills: list[int], decode_floor: float, prefill_floor: float) -> None:
    base = rows[0]
    native = next((r for r in rows if r.form.startswith("F2")), None)
    head = (f"{'form':<40} {'compile s':>9} {'+1st s':>6} " + " ".join(f"{f'prefill-{t} ms':>15}" for t in prefills)
            + f" {'decode ms':>9} {'memory GB':>9} | {'prefill':>7} {'decode':>7} vs loop | {'prefill':>7} "
            f"{'decode':>7} {'memory':>7} vs native | {'floor/dec':>9} {'max rel':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        t = prefills[0]
        vs_native = (f"{native.prefill_ms[t] / r.prefill_ms[t]:>6.2f}x {native.decode_ms / r.decode_ms:>6.2f}x "
                     f"{r.memory_gb / native.memory_gb:>6.2f}x" if native else " " * 23)
        prefill = " ".join(f"{r.prefill_ms[p]:>15.1f}" for p in prefills)
        print(f"{r.form:<40} {r.compile_s:>9.2f} {r.first_s:>6.2f} {prefill}"
              + f" {r.decode_ms:>9.2f} {r.memory_gb:>9.2f} | {base.prefill_ms[t] / r.prefill_ms[t]:>6.2f}x "
              f"{base.decode_ms / r.decode_ms:>6.2f}x     | {vs_native}           | "
              f"{decode_floor / r.decode_ms:>8.0%} {r.max_rel:>8.1e}")
    print(f"ratios > 1: faster than the loop / the native path (prefill at {prefills[0]} tokens); memory vs native "
          f"< 1: less. floor/dec: decode floor {decode_floor:.2f} ms over the measured decode (100% = at the bandwidth "
          f"bound); prefill's all-experts stream is {prefill_floor:.1f} ms. max rel: prefill output vs the first "
          "row, at the run's precision. memory: weights held + peak RSS growth of compile and first inference. "
          "+1st s: compile and the first prefill (FullyConnected packs its weights at its first run).")
    if native is not None:
        _targets(rows, base, native, prefills)


def _targets(rows: list[Row], loop: Row, native: Row, prefills: list[int]) -> None:
    """Issue 19's targets per form: prefill >= 1.0x the faster of loop and native (each prefill length),
    decode time <= 1.05x native's, memory <= 1.1x native's, compile <= native's; `ok` when all hold."""
    heads = [f"prefill-{t} vs best" for t in prefills]
    print(f"\n{'form':<40} " + " ".join(f"{h:>20}" for h in heads)
          + f" {'decode time vs native':>21} {'memory vs native':>16} {'compile vs native':>17}  targets")
    for r in rows:
        if r.form.startswith("llama.cpp"):
            continue
        best = [min(loop.prefill_ms[t], native.prefill_ms[t]) / r.prefill_ms[t] for t in prefills]
        decode, memory = r.decode_ms / native.decode_ms, r.memory_gb / native.memory_gb
        compile_ = r.compile_s / native.compile_s
        met = all(b >= 1.0 for b in best) and decode <= 1.05 and memory <= 1.1 and compile_ <= 1.0
        print(f"{r.form:<40} " + " ".join(f"{b:>19.2f}x" for b in best)
              + f" {decode:>20.2f}x {memory:>15.2f}x {compile_:>16.2f}x  {'ok' if met else 'missed'}")
    print("memory here: in this process (weights held + RSS growth); benchmarks/deployed_memory.py measures the "
          "deployed model's peak RssAnon per form in a fresh process.")


def _peers(args: argparse.Namespace, prefills: list[int], threads: int) -> list[Peer]:
    """llama.cpp peers: the GGUF files of --peer-dir at this weight type, timed by --llama-bench."""
    binary = llama_bench_path(args.llama_bench)
    if binary is None:
        print("llama.cpp: not timed (no --llama-bench)", flush=True)
        return []
    if args.peer_dir is None:
        print("llama.cpp: not timed (no --peer-dir; models/export_gguf.py writes the GGUF files)", flush=True)
        return []
    kind = "bf16" if args.weights == "f16" else "q4_0"
    models = [args.peer_dir / f"{folder_name(args.layer)}{variant}-{kind}.gguf" for variant in ("-attn1", "")]
    missing = [m for m in models if not m.is_file()]
    if missing:
        raise SystemExit(f"llama.cpp: {', '.join(map(str, missing))} missing (models/export_gguf.py --layer "
                         f"{args.layer} writes them)")
    peers = [Peer(binary, model, prefills, threads) for model in models]
    print(f"llama.cpp: {binary}, {threads} threads: " + ", ".join(f"{m.name} {m.stat().st_size / 1e9:.2f} GB"
                                                                   for m in models), flush=True)
    return peers


def _peer_round(peer: Peer, reps: int) -> None:
    run = peer.run(reps)
    prefill = ", ".join(f"{t}: {statistics.median(v):.1f}" for t, v in run.prefill_ms.items())
    print(f"  {peer.label} {run.build}: prefill {{{prefill}}} ms, decode "
          f"{statistics.median(run.decode_ms):.2f} ms/token, peak RSS {run.peak_rss_gb:.2f} GB, {run.wall_s:.1f} s "
          f"wall; load {os.getloadavg()[0]:.1f}", flush=True)


def _peer_row(peer: Peer) -> Row:
    prefill, decode, rss = peer.medians()
    nan = float("nan")
    return Row(f"{peer.label} x{len(peer.runs)}", nan, prefill, decode, memory_gb=rss, first_s=nan, max_rel=nan)


def _peer_targets(rows: list[Row], peer_rows: list[Row], peers: list[Peer], stored_gb: float, tokens: int) -> None:
    """Issue 19's peer targets per form: decode time <= 1.1x llama.cpp's at the same weight type (its
    MoE-alone GGUF, the first peer; the samples paired with the form's rounds), runtime memory <= 1.5x the
    stored weights (ours: the experts as stored; llama.cpp: the GGUF file)."""
    labels = [peer.label.removeprefix("llama.cpp ") for peer in peers]
    heads = [f"dec / {label}" for label in labels] + [f"pre-{tokens} / {label}" for label in labels]
    print(f"\n{'form (ratios vs llama.cpp paired)':<40} " + " ".join(f"{h:>32}" for h in heads)
          + f" {'memory / stored':>15}  targets")
    for r in rows:
        if not r.paired:
            continue
        decode = [r.decode_ms / r.paired[p.label][1] for p in peers]
        prefill = [r.prefill_ms[tokens] / r.paired[p.label][0][tokens] for p in peers]
        memory = r.memory_gb / stored_gb
        met = decode[0] <= 1.1 and memory <= 1.5
        print(f"{r.form:<40} " + " ".join(f"{v:>31.2f}x" for v in decode + prefill)
              + f" {memory:>14.2f}x  {'ok' if met else 'missed'}")
    for peer, p in zip(peers, peer_rows, strict=True):
        print(f"{p.form:<40} " + " ".join(f"{p.decode_ms / q.decode_ms:>31.2f}x" for q in peer_rows)
              + " " + " ".join(f"{p.prefill_ms[tokens] / q.prefill_ms[tokens]:>31.2f}x" for q in peer_rows)
              + f" {p.memory_gb / peer.stored_gb():>14.2f}x")
    print(f"Ratios < 1: faster than llama.cpp; each form against the llama.cpp samples taken in its own rounds "
          f"(llama.cpp's rows: against all of them). stored: our experts as stored {stored_gb:.2f} GB; "
          + ", ".join(f"{p.label} GGUF {p.stored_gb():.2f} GB" for p in peers)
          + ". Targets: decode <= 1.10x llama.cpp's 1-head-attention GGUF (the MoE nearly alone; the 32-head one "
          "adds the model's own attention, which our forms lack), memory <= 1.50x stored.")


if __name__ == "__main__":
    main()
