"""Whole-model equivalence: run the original and the fused model side by side and compare every output.

`check(original, fused)` feeds both models the same inputs, generated from the original's own Parameters
(LLM inputs by name: `input_ids` within the vocabulary, `attention_mask` ones, `position_ids` ranges,
`beam_idx` zeros; anything else random by element type and shape). A stateful model (KV cache in
ReadValue/Assign) runs a prefill of each token count and then `steps` greedy decode steps, its state reset
between runs; decode feeds the argmax of the ORIGINAL's logits to both models so they stay on one path.
A stateless model runs once per token count. Every output is compared at every step.

Verdict per output and step (moe_fusion.compare, the one comparison the proof also uses): same shape,
NaN/±Inf exactly where the original has them, and on finite values
`max|fused - original| <= atol + rtol * max|finite original|` (rtol is relative to the output's scale at
that step: element-wise relative error is meaningless where values cross zero). Top-1 agreement of logits is
reported but is not part of the verdict: differences inside the tolerance may flip near-ties.
Default tolerances depend on the original's weight type (see DEFAULT_TOLERANCES and docs/checking.md).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from moe_fusion import broken
from moe_fusion.compare import compare
from moe_fusion.io import InputError, core, first_line, load

# weight type -> (atol, rtol), rtol relative to the output's largest magnitude. Both models run the same
# weights in f32 on CPU, so differences come from summation order (FusedExperts sums each expert's GEMM
# and the top-k slots in a different order than the unfused graph) and grow with depth and width:
#   f32: measured ~1e-7..1e-6 of the logits' scale on the committed fixtures; 1e-4 leaves 100x room for
#        real depths (~60 layers) and hidden sizes (~8k), while a wrong expert, weight, lane or routing
#        weight moves logits by > 1e-2 of their scale.
#   f16/bf16: weights decompress exactly to f32 on both sides, but such models are real trained models
#        whose activations have outliers of 1e2..1e3 that amplify reordering error through the norms.
#   int8/int4: both sides dequantise the same constants; with the CPU plugin's dynamic activation
#        quantisation off (F32 below) they differ by summation order only, measured 2.5e-7..3.9e-7 on the
#        14 compressed fixtures. 1e-3 as for f16 (left on, that quantisation alone moves outputs ~1e-2).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "f32": (1e-6, 1e-4),
    "f16": (1e-5, 1e-3),
    "bf16": (1e-5, 2e-3),
    "int8": (1e-5, 1e-3),
    "int4": (1e-5, 1e-3),
}
# How a model runs when its numbers are compared: f32 activations, and on CPU no dynamic int8 quantisation
# of activations, which the plugin otherwise applies to MatMuls on int8/int4 weights (measured on an int4
# Mixtral block: 8e-3 of the output's scale between original and fused with it, 2e-7 without).
F32 = {"INFERENCE_PRECISION_HINT": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def run_config(device: str, precision: str = "f32") -> dict[str, str]:
    config = {"INFERENCE_PRECISION_HINT": precision}
    if device == "CPU" and precision == "f32":
        config = dict(F32)
    return config


# Inference precision -> the least rtol that makes sense: an f16/bf16 run rounds every activation.
PRECISION_RTOL = {"f32": 0.0, "f16": 1e-2, "bf16": 5e-2}
LLM_INPUTS = ("input_ids", "attention_mask", "position_ids", "beam_idx", "token_type_ids")
_LOW_BIT = {"i4": "int4", "u4": "int4", "nf4": "int4", "f4e2m1": "int4", "i8": "int8", "u8": "int8"}
_RANK = ["f32", "bf16", "f16", "int8", "int4"]  # later = coarser


@dataclass
class OutputCheck:
    """One output at one step: how far the fused model is from the original."""

    output: str
    step: str  # "prefill 16", "prefill 16 + decode 2" (stateful) or "16 tokens" (stateless)
    tokens: int
    shape: list[int]
    max_abs: float
    max_rel: float  # max_abs / max|original|
    cosine: float
    top1: float | None  # logits only: share of positions whose argmax agrees
    worst: list[int]  # index of the largest difference
    worst_values: tuple[float, float]  # (original, fused) there
    ok: bool
    reason: str = ""


@dataclass
class CheckReport:
    original: str
    fused: str
    equivalent: bool
    reason: str  # one line: why not (output, step, worst element), or "" when equivalent
    weight_type: str
    atol: float
    rtol: float
    device: str
    precision: str
    stateful: bool
    vocab: int | None
    outputs: list[OutputCheck] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = "whole"
    fused_experts: str = ""  # "run as is" or "lowered per-expert" (the fused side's FusedExperts)
    segments: int = 0  # layers mode: how many segments each side was cut into

    def __bool__(self) -> bool:
        return self.equivalent

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def top1(self) -> float | None:
        values = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(values) if values else None

    def to_json(self) -> str:
        data = asdict(self)
        data.update(max_abs=self.max_abs, max_rel=self.max_rel, top1=self.top1)
        return json.dumps(data, indent=2, default=float)

    def summary(self) -> str:
        head = "equivalent" if self.equivalent else f"NOT equivalent: {self.reason}"
        top1 = "" if self.top1 is None else f", top-1 agreement {self.top1:.4f}"
        return (
            f"{head} ({len(self.outputs)} output checks, max |diff| {self.max_abs:.3g}, "
            f"max rel {self.max_rel:.3g}{top1}; atol {self.atol:g}, rtol {self.rtol:g}, "
            f"{self.weight_type} weights, {self.device} {self.precision})"
        )

    def table(self) -> str:
        rows = [("output", "step", "shape", "max|diff|", "rel", "cosine", "top-1", "status")]
        for o in self.outputs:
            rows.append(
                (
                    o.output,
                    o.step,
                    "x".join(map(str, o.shape)),
                    f"{o.max_abs:.3g}",
                    f"{o.max_rel:.3g}",
                    f"{o.cosine:.8f}",
                    "-" if o.top1 is None else f"{o.top1:.4f}",
                    "ok" if o.ok else f"FAIL: {o.reason}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows)
        return "\n".join(lines)


# ---- model facts --------------------------------------------------------------------------------------


def weight_type(model: ov.Model) -> str:
    """The coarsest storage type among the model's weights (Constants of >= 1024 elements)."""
    found = "f32"
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or int(np.prod(list(node.get_output_shape(0)))) < 1024:
            continue
        name = node.get_output_element_type(0).get_type_name()
        kind = _LOW_BIT.get(name, name if name in ("f16", "bf16") else "f32")
        if _RANK.index(kind) > _RANK.index(found):
            found = kind
    return found


def is_stateful(model: ov.Model) -> bool:
    return bool(model.get_sinks()) or any(n.get_type_name() == "ReadValue" for n in model.get_ordered_ops())


def vocab_size(model: ov.Model) -> int | None:
    """Rows of the embedding table `input_ids` indexes (Gather on a Constant, maybe decompressed)."""
    ids = next((p for p in model.get_parameters() if _name(p.output(0)) == "input_ids"), None)
    if ids is None:
        return None
    stack, seen = [ids.output(0)], set()
    while stack:
        value = stack.pop()
        for target in value.get_target_inputs():
            node = target.get_node()
            if node.get_instance_id() in seen:
                continue
            seen.add(node.get_instance_id())
            kind = node.get_type_name()
            if kind == "Gather" and target.get_index() == 1:
                table = _constant_behind(node.input_value(0))
                if table is not None and len(table.get_output_shape(0)) >= 1:
                    return int(table.get_output_shape(0)[0])
            elif kind in ("Convert", "Reshape", "Squeeze", "Unsqueeze"):
                stack.append(node.output(0))
    for result in model.outputs:  # no embedding found: the logits' width
        if "logits" in result.get_names() and result.get_partial_shape()[-1].is_static:
            return result.get_partial_shape()[-1].get_length()
    return None


def _constant_behind(value: ov.Output) -> ov.Node | None:
    """The Constant behind a decompression chain (Convert, Subtract zero point, Multiply scale, Reshape)."""
    for _ in range(8):
        node = value.get_node()
        kind = node.get_type_name()
        if kind == "Constant":
            return node
        if kind not in ("Convert", "Subtract", "Multiply", "Reshape"):
            return None
        value = node.input_value(0)
    return None


def _name(value: ov.Output) -> str:
    names = sorted(value.get_names())
    return names[0] if names else value.get_node().get_friendly_name()


# ---- inputs ---------------------------------------------------------------------------------------------


def _llm_feed(name: str, param: ov.Node, ids: np.ndarray, past: int) -> np.ndarray:
    dtype = param.get_element_type().to_dtype()
    batch, length = ids.shape
    if name == "input_ids":
        return ids.astype(dtype)
    if name == "attention_mask":
        return np.ones((batch, past + length), dtype)
    if name == "position_ids":
        positions = np.broadcast_to(np.arange(past, past + length, dtype=dtype), (batch, length))
        rank = param.get_partial_shape().rank
        if rank.is_static and rank.get_length() == 3:  # multimodal rope: [3, B, S]
            return np.ascontiguousarray(np.broadcast_to(positions, (3, batch, length)))
        return np.ascontiguousarray(positions)
    if name == "beam_idx":
        return np.zeros(batch, dtype)
    return np.zeros((batch, length), dtype)  # token_type_ids


def token_shape(partial: ov.PartialShape, tokens: int) -> list[int]:
    """Concrete shape: the last dynamic dim gets the tokens, other dynamic dims 1 (batch)."""
    dims = [d.get_length() if d.is_static else None for d in partial]
    dynamic = [i for i, d in enumerate(dims) if d is None]
    for i in dynamic:
        dims[i] = tokens if i == dynamic[-1] else 1
    return dims


def _random(param: ov.Node, tokens: int, rng: np.random.Generator) -> np.ndarray:
    partial = param.get_partial_shape()
    name = _name(param.output(0))
    if partial.rank.is_dynamic:
        raise InputError(f"input '{name}' has dynamic rank: cannot generate data for it")
    shape = token_shape(partial, tokens)
    if name.startswith(("past_key_values", "past.")):  # stateless KV cache: batch 1, empty past
        dynamic = [i for i, d in enumerate(partial) if d.is_dynamic]
        shape = [0 if i in dynamic[1:] else d for i, d in enumerate(shape)]
    dtype = param.get_element_type().to_dtype()
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.integer):
        return rng.integers(0, 8, shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


# ---- running --------------------------------------------------------------------------------------------


def _as_model(model: ov.Model | str | Path, role: str) -> tuple[ov.Model, str]:
    if isinstance(model, ov.Model):
        try:
            model.clone().validate_nodes_and_infer_types()
        except (RuntimeError, ValueError) as error:
            raise InputError(f"{role} model is invalid: {first_line(error)}") from None
        return model, model.get_friendly_name()
    return load(model), str(model)


class _Runner:
    def __init__(self, model: ov.Model, device: str, config: dict) -> None:
        self.model = model
        self.compiled = core().compile_model(model, device, config)
        self.request = self.compiled.create_infer_request()
        self.names = [_name(o) for o in model.outputs]

    def run(self, feeds: dict[str, np.ndarray] | list[np.ndarray]) -> list[np.ndarray]:
        result = self.request.infer(feeds if isinstance(feeds, dict) else dict(enumerate(feeds)))
        return [np.array(result[o]) for o in self.compiled.outputs]


@dataclass
class _Step:
    label: str  # "prefill 16 + decode 1", "16 tokens"
    tokens: int  # the prompt length of its run
    reset: bool  # first step of a run: state reset (and, in whole mode, a fresh compile)
    feeds: dict[str, np.ndarray]


@dataclass
class _Job:
    """One side's work, picklable so it can run in a child process (`moe_fusion.isolate`)."""

    source: ov.Model | str  # a path (read in the child) or a model (in-process only)
    role: str  # "original" or "fused"
    mode: str
    device: str
    config: dict
    fused_experts: str
    tokens: list[int]
    steps: int
    seed: int
    vocab: int | None
    given: list[_Step] | None = None  # fused side: the original's steps
    cuts: dict[str, list[np.ndarray]] | None = None  # layers, fused side: the original's values per step
    anchors: list[str] | None = None  # layers, fused side: the original's MoE block anchors
    progress: bool = False


@dataclass
class _Side:
    steps: list[_Step] = field(default_factory=list)
    # whole: outputs[i] = the model's outputs at step i; layers: (segment, names, [per step arrays])
    outputs: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    error: str = ""  # "does not compile on CPU: ...", "fails at prefill 16: ..."
    segments: int = 0
    anchors: list[str] = field(default_factory=list)
    lowered: bool = False


def _compressed_experts(model: ov.Model) -> bool:
    """Does a FusedExperts read integer-compressed weights (which running the Python op dequantises to f32)?"""
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FusedExperts":
            continue
        for value in node.input_values()[3:]:
            if value.get_node().get_type_name() == "Transpose":
                value = value.get_node().input_value(0)
            const = _constant_behind(value)
            if const is not None and const.get_element_type().is_integral():
                return True
    return False


def _keep_weights_stored(model: ov.Model) -> None:
    """Mark every Convert of an f16/bf16 Constant as OpenVINO's weight decompression: the CPU plugin then
    keeps the weights as stored inside its MatMul kernels instead of folding an f32 copy at compile time.
    The values are the same (f16/bf16 -> f32 is exact); exporters mark their own Converts this way."""
    from moe_fusion.compressed import mark_decompression

    for node in model.get_ordered_ops():
        if (
            node.get_type_name() == "Convert"
            and node.input_value(0).get_node().get_type_name() == "Constant"
            and node.get_input_element_type(0) in (ov.Type.f16, ov.Type.bf16)
            and "decompression_0" not in node.get_rt_info()
        ):
            mark_decompression(node)


def _prepare(job: _Job) -> tuple[ov.Model, bool]:
    """The side's model as it will be compiled (a copy: the caller's model is never changed), and whether
    its FusedExperts are to be lowered."""
    model = load(job.source) if not isinstance(job.source, ov.Model) else job.source.clone()
    _keep_weights_stored(model)
    # auto: lower where running the op costs more than lowering it: int8/int4 weights (the op reads them
    # dequantised to f32, ~8x their bytes), and segment by segment (see _run_layers).
    auto = job.mode == "layers" or _compressed_experts(model)
    lower_it = job.role == "fused" and (job.fused_experts == "lower" or (job.fused_experts == "auto" and auto))
    return model, lower_it


def _lowered(model: ov.Model) -> ov.Model:
    from moe_fusion.lower import PER_EXPERT, fused_experts_nodes, lower

    if fused_experts_nodes(model):
        lower(model, PER_EXPERT)
    return model


def _feeds(params: dict[str, ov.Node], llm: bool, ids: np.ndarray | None, past: int, count: int,
           rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {
        name: _llm_feed(name, param, ids, past) if llm and name in LLM_INPUTS else _random(param, count, rng)
        for name, param in params.items()
    }


def _say(job: _Job, text: str) -> None:
    if job.progress:
        print(f"moe-fusion: {job.role}: {text}", file=sys.stderr, flush=True)


def run_side(job: _Job) -> _Side:
    """Compile and run one side (what `check` runs in a child process per side)."""
    model, lower_it = _prepare(job)
    side = _Side(names=[_name(o) for o in model.outputs], lowered=lower_it)
    if job.mode == "layers":
        return _run_layers(job, model, lower_it, side)
    if lower_it:
        _lowered(model)
    params = {_name(p.output(0)): p for p in model.get_parameters()}
    stateful, llm = is_stateful(model), "input_ids" in params
    logits_at = next((i for i, n in enumerate(side.names) if n == "logits"), None)
    rng = np.random.default_rng(job.seed)
    runs = _given_runs(job.given) if job.given is not None else [[None] * (job.steps + 1 if stateful else 1)
                                                                 for _ in job.tokens]
    # Compiled afresh per prompt length: the plugin's per-shape weight packings do not pile up. Not with
    # FusedExperts run as is: OpenVINO never frees a compiled model holding a Python op (measured: each
    # compile of the Qwen3-30B-A3B layer keeps its 2.4 GB of f32 weights), so it is compiled once.
    once = _runs_python_op(model)
    runner = None
    for count, run in zip(job.tokens, runs, strict=True):
        _say(job, f"compiling for prefill {count}")
        if runner is None or not once:
            runner = None
            try:
                runner = _Runner(model, job.device, job.config)
            except RuntimeError as error:
                side.error = f"does not compile on {job.device}: {first_line(error)}"
                return side
        runner.request.reset_state()
        ids = rng.integers(0, job.vocab, (1, count)) if llm and job.given is None else None
        past = 0
        for i, given in enumerate(run):
            if given is None:
                label = (f"prefill {count}" + (f" + decode {i}" if i else "")) if stateful else f"{count} tokens"
                given = _Step(label, count, i == 0, _feeds(params, llm, ids, past, count if i == 0 else 1, rng))
            try:
                outputs = runner.run(given.feeds)
            except (RuntimeError, ValueError) as error:
                side.error = f"fails at {given.label}: {first_line(error)}"
                return side
            side.steps.append(given)
            side.outputs.append(outputs)
            if not llm or job.given is not None:
                continue
            past += ids.shape[1]
            if logits_at is None:
                ids = rng.integers(0, job.vocab, (1, 1))
            else:  # greedy on the ORIGINAL's logits: both models follow the same path
                logits = outputs[logits_at]
                ids = logits.reshape(1, -1, logits.shape[-1])[:, -1:].argmax(-1).astype(np.int64)
    return side


def _runs_python_op(model: ov.Model) -> bool:
    from moe_fusion.lower import fused_experts_nodes

    return bool(fused_experts_nodes(model))


def _given_runs(steps: list[_Step]) -> list[list[_Step]]:
    runs: list[list[_Step]] = []
    for step in steps:
        if step.reset or not runs:
            runs.append([])
        runs[-1].append(step)
    return runs


def _layer_steps(job: _Job, model: ov.Model) -> list[_Step]:
    """Every step's inputs, decided before anything runs (segment by segment, the logits that greedy
    decoding would follow are not known until the last segment): decode tokens are random."""
    params = {_name(p.output(0)): p for p in model.get_parameters()}
    stateful, llm = is_stateful(model), "input_ids" in params
    rng = np.random.default_rng(job.seed)
    steps = []
    for count in job.tokens:
        past = 0
        for i in range(job.steps + 1 if stateful else 1):
            n = count if i == 0 else 1
            ids = rng.integers(0, job.vocab, (1, n)) if llm else None
            label = (f"prefill {count}" + (f" + decode {i}" if i else "")) if stateful else f"{count} tokens"
            steps.append(_Step(label, count, i == 0, _feeds(params, llm, ids, past, n, rng)))
            past += n
            if not llm:
                break
    return steps


def _run_layers(job: _Job, model: ov.Model, lower_it: bool, side: _Side) -> _Side:
    """Segment by segment (moe_fusion.segments): each compiled alone and freed before the next. Every
    segment of both sides reads the ORIGINAL's values at its cuts, so each is compared on the same real
    inputs, and errors do not carry from one layer to the next."""
    from moe_fusion.segments import Cut, anchors

    if job.role == "fused" and not lower_it and _runs_python_op(model):
        raise InputError("--mode layers cannot run FusedExperts as it is: OpenVINO never frees a compiled model "
                         "holding a Python op, so every segment's f32 weights would stay in memory; use "
                         "--fused-experts lower (or auto), or --mode whole")
    side.steps = job.given if job.given is not None else _layer_steps(job, model)
    side.anchors = anchors(model) if job.anchors is None else job.anchors
    cuts = dict(job.cuts or {})  # key -> value at every step: the original's, as they are computed
    try:
        cut = Cut(model, side.anchors)
    except ValueError as error:
        raise InputError(f"{job.role} model: {error}; compare the whole models (--mode whole)") from None
    side.segments = cut.count
    for number, segment in enumerate(cut, start=1):
        _say(job, f"segment {number}/{cut.count}")
        missing = [n for n in segment.inputs if n not in cuts and n not in side.steps[0].feeds]
        if missing:
            raise InputError(
                f"the models do not cut alike at their MoE blocks: the {job.role} model's segment {segment.index} "
                f"reads '{missing[0]}', which the original does not compute before it; compare the whole "
                "models (--mode whole)"
            )
        sub = _lowered(segment.model) if lower_it else segment.model
        values: list[list[np.ndarray]] = [[] for _ in segment.outputs]
        for i, step in enumerate(side.steps):
            if step.reset:  # compiled afresh per prompt length, as in whole mode
                runner = None
                try:
                    runner = _Runner(sub, job.device, job.config)
                except RuntimeError as error:
                    side.error = f"does not compile on {job.device} (segment {segment.index}): {first_line(error)}"
                    return side
            try:
                outputs = runner.run([cuts[n][i] if n in cuts else step.feeds[n] for n in segment.inputs])
            except (RuntimeError, ValueError) as error:
                side.error = f"fails at {step.label} (segment {segment.index}): {first_line(error)}"
                return side
            for slot, value in zip(values, outputs, strict=True):
                slot.append(value)
        side.outputs.append((segment.index, segment.outputs, values))
        del runner, sub, segment
        if job.given is None:  # the original's values feed the later segments of both sides
            cuts.update(zip(side.outputs[-1][1], values, strict=True))
    return side


def _compare(
    name: str, step: str, tokens: int, want: np.ndarray, got: np.ndarray, atol: float, rtol: float, logits: bool
) -> OutputCheck:
    """One output at one step, judged by moe_fusion.compare (NaN/Inf must match the original's exactly)."""
    shape = list(want.shape)
    result = compare(want, got, rtol=rtol, atol=atol)
    if result.shape_error:
        return OutputCheck(name, step, tokens, shape, float("inf"), float("inf"), 0.0, None, [], (0.0, 0.0), False,
                           result.shape_error)
    top1 = None
    if logits and want.ndim >= 1 and want.shape[-1] > 1 and want.size:
        top1 = float((want.argmax(-1) == got.argmax(-1)).mean())
    reason = ""
    if not result.ok and result.nonfinite_mismatches:
        reason = f"output '{name}' at {step}: {result.describe()}"
    elif not result.ok:
        where = ",".join(map(str, result.worst))
        reason = (
            f"output '{name}' at {step}: max |diff| {result.max_abs:.3g} > {result.limit:.3g} (atol {atol:g} + rtol "
            f"{rtol:g} x scale {result.scale:.3g}) at [{where}]: original {result.want:.6g}, fused {result.got:.6g}"
        )
    return OutputCheck(name, step, tokens, shape, result.max_abs, result.max_rel, result.cosine, top1,
                       list(result.worst), (result.want, result.got), result.ok, reason)


MODES = ("whole", "layers")
# Peak memory of whole mode per byte of the original's stored weights (its larger side compiled alone),
# measured on this project's real-shape layers (benchmarks/verify_scale.py): f16 2.0-2.1x (int4 1.6x);
# a lowered f16 model's GatherMatmul (cpu target) reaches 4.1x, which this estimate does not foresee.
WHOLE_MODE_BYTES = 2.0


def weight_bytes(model: ov.Model) -> int:
    """Bytes of the model's Constants as stored (what its .bin holds)."""
    return sum(n.get_byte_size() for n in model.get_ordered_ops() if n.get_type_name() == "Constant")


def available_memory() -> int:
    """MemAvailable (Linux); unknown elsewhere: no limit."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


FUSED_EXPERTS = ("auto", "run", "lower")


def _run(job: _Job, isolate: bool) -> _Side:
    if not isolate:
        return run_side(job)
    from moe_fusion.isolate import IsolatedError, run_isolated

    try:
        return run_isolated(run_side, job)
    except IsolatedError as error:
        return _Side(error=f"crashed the OpenVINO runtime: the process running it was {error}")


def check(
    original: ov.Model | str | Path,
    fused: ov.Model | str | Path,
    *,
    tokens: Iterable[int] = (1, 16, 64),
    steps: int = 3,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    device: str = "CPU",
    precision: str = "f32",
    mode: str = "whole",
    fused_experts: str = "auto",
    isolate: bool = False,
    progress: bool = False,
) -> CheckReport:
    """Compare `fused` with `original` (paths as `moe-fusion fuse` accepts them, or ov.Model objects).

    `mode`: "whole" runs each whole model, one after the other (the original first, recording its outputs
    and the greedy tokens both follow); "layers" runs both segment by segment, one MoE layer compiled at
    a time, every segment on the original's real values at its inputs (docs/checking.md: what each proves).
    `fused_experts`: "run" the FusedExperts op as it is, "lower" a copy to native per-expert ops first,
    or "auto": lower FusedExperts with integer-compressed weights (the Python op dequantises them to
    f32) and, in layers mode, all of them (OpenVINO does not free compiled models holding a Python op).
    `isolate`: run each side in a child process (paths only), so a crash of the OpenVINO runtime
    becomes a verdict instead of killing the caller; `progress`: say on stderr what runs.

    Raises `InputError` (a ValueError) for inputs that cannot be compared: unreadable or invalid models,
    models that differ in their inputs, an original that does not run. A fused model that fails to run,
    or whose outputs differ in count, shape or value, gives a report with `equivalent=False`.
    """
    start = time.perf_counter()
    tokens = [int(t) for t in tokens]
    if not tokens or min(tokens) < 1:
        raise InputError(f"token counts must be >= 1, got {tokens}")
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    if precision not in PRECISION_RTOL:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISION_RTOL)}")
    if mode not in MODES:
        raise InputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if fused_experts not in FUSED_EXPERTS:
        raise InputError(f"fused_experts {fused_experts!r} is not one of {', '.join(FUSED_EXPERTS)}")
    model_a, label_a = _as_model(original, "original")
    found = broken.findings(model_a)
    if found:  # its outputs are wrong whatever it is compared with: equivalence to it proves nothing
        raise InputError(f"{label_a} is a {broken.summary(found)}")
    model_b, label_b = _as_model(fused, "fused")
    wtype = weight_type(model_a)
    default_atol, default_rtol = DEFAULT_TOLERANCES[wtype]
    atol = default_atol if atol is None else float(atol)
    rtol = max(default_rtol, PRECISION_RTOL[precision]) if rtol is None else float(rtol)
    stateful = is_stateful(model_a)
    vocab = vocab_size(model_a)
    report = CheckReport(label_a, label_b, True, "", wtype, atol, rtol, device, precision, stateful, vocab, mode=mode)

    params_a = {_name(p.output(0)) for p in model_a.get_parameters()}
    params_b = {_name(p.output(0)) for p in model_b.get_parameters()}
    if params_a != params_b:
        raise InputError(f"the models take different inputs: {sorted(params_a)} vs {sorted(params_b)}")
    if len(model_a.outputs) != len(model_b.outputs):
        return _fail(report, f"fused model has {len(model_b.outputs)} outputs, original {len(model_a.outputs)}", start)
    if "input_ids" in params_a and vocab is None:
        raise InputError("cannot tell the vocabulary size: no embedding table behind input_ids and no logits width")
    if mode == "whole":
        needed, available = WHOLE_MODE_BYTES * weight_bytes(model_a), available_memory()
        if needed > available:
            raise InputError(f"checking the whole models needs about {needed / 1e9:.1f} GB of memory, "
                             f"{available / 1e9:.1f} GB are available: use --mode layers (one layer at a time)")
    isolate = isolate and not isinstance(original, ov.Model) and not isinstance(fused, ov.Model)
    sources = [m if isinstance(m, ov.Model) else str(m) for m in (original, fused)]
    del model_a, model_b  # each side reads its own copy (memory-mapped weights: cheap)
    job = _Job(sources[0], "original", mode, device, run_config(device, precision), fused_experts, tokens, steps,
               seed, vocab, progress=progress)
    want = _run(job, isolate)
    if want.error:
        raise InputError(f"original model {want.error}")
    job.source, job.role, job.given, job.anchors = sources[1], "fused", want.steps, want.anchors
    if mode == "layers":
        job.cuts = {name: values for _, names, all_values in want.outputs for name, values in zip(names, all_values,
                                                                                               strict=True)}
    got = _run(job, isolate)
    report.fused_experts = "lowered per-expert" if got.lowered else "run as is"
    report.segments = want.segments
    if got.error:
        return _fail(report, f"fused model {got.error}", start)
    if mode == "whole":
        _compare_whole(report, want, got)
    else:
        _compare_layers(report, want, got)
    report.seconds = time.perf_counter() - start
    return report


def _add(report: CheckReport, row: OutputCheck) -> None:
    report.outputs.append(row)
    if not row.ok and report.equivalent:
        report.equivalent, report.reason = False, row.reason


def _compare_whole(report: CheckReport, want: _Side, got: _Side) -> None:
    for step, outs_a, outs_b in zip(want.steps, want.outputs, got.outputs, strict=True):
        for i, name in enumerate(want.names):
            _add(report, _compare(name, step.label, step.tokens, outs_a[i], outs_b[i], report.atol, report.rtol,
                                  name == "logits"))


def _compare_layers(report: CheckReport, want: _Side, got: _Side) -> None:
    """Every value a fused segment hands on (cuts and model outputs) against the original's same value.
    Values only the original computes (e.g. shapes its unfused blocks read) are not needed by the fused
    model; model outputs must all be compared."""
    from moe_fusion.segments import output_key

    theirs = {index: dict(zip(names, values, strict=True)) for index, names, values in want.outputs}
    outputs = {output_key(i): name for i, name in enumerate(want.names)}  # the model's outputs, by position
    compared = set()
    for index, names, values in got.outputs:
        for name, per_step in zip(names, values, strict=True):
            if name not in theirs.get(index, {}):
                raise InputError(f"the models do not cut alike at their MoE blocks: the fused model's segment {index} "
                                 f"computes '{name}', the original's does not; compare the whole models (--mode whole)")
            compared.add(name)
            shown = outputs.get(name, name)
            for step, a, b in zip(want.steps, theirs[index][name], per_step, strict=True):
                label = f"{step.label}, segment {index}"
                _add(report, _compare(shown, label, step.tokens, a, b, report.atol, report.rtol, shown == "logits"))
    missing = [n for key, n in outputs.items() if key not in compared]
    if missing:
        raise InputError(f"the models do not cut alike at their MoE blocks: the fused model's output '{missing[0]}' "
                         "is not computed in the same segment; compare the whole models (--mode whole)")


def _fail(report: CheckReport, reason: str, start: float) -> CheckReport:
    report.equivalent, report.reason = False, reason
    report.seconds = time.perf_counter() - start
    return report


# ---- reusable greedy run (tests/llm.py) -----------------------------------------------------------------


def generate_logits(
    model: ov.Model, vocab: int, prompt: int = 12, steps: int = 3, seed: int = 0, device: str = "CPU"
) -> list[np.ndarray]:
    """Logits of a random prompt's prefill and of `steps` greedy decode steps, f32 on `device`."""
    runner = _Runner(model, device, run_config(device))
    runner.request.reset_state()
    params = {_name(p.output(0)): p for p in model.get_parameters()}
    unknown = sorted(set(params) - set(LLM_INPUTS))
    if unknown:
        raise ValueError(f"unexpected model input {unknown[0]}")
    ids = np.random.default_rng(seed).integers(0, vocab, (1, prompt))
    past, outs = 0, []
    logits_at = runner.names.index("logits")
    for _ in range(steps + 1):
        logits = runner.run({n: _llm_feed(n, p, ids, past) for n, p in params.items()})[logits_at]
        outs.append(logits)
        past += ids.shape[1]
        ids = logits[:, -1:].argmax(-1).astype(np.int64)
    return outs
