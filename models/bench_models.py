"""One MoE layer at a real model's shape, in the unfused forms exporters write, for benchmarks/lowering.py.

`loop_layer` is the per-expert loop optimum-intel 1.x exports (F1: OneHot mask -> per expert NonZero ->
Gather tokens -> SwiGLU on `[out, in]` weights with `transpose_b` -> x routing weight -> index_add as
ScatterElementsUpdate(sum)); `tiled_layer` is the tiled form OpenVINO's conversion-time FuseMOE and
optimum-intel 2.x write (F2: Tile -> batched MatMul on stacked `[E, out, in]` weights -> dense routing ->
ReduceSum), which the CPU plugin turns into GatherMatmul. Both read `hidden_states [B, S, H]` and return
the layer's expert sum `[B, S, H]`, with the router (softmax -> top-k -> optional renormalisation) inside.

Weights are generated out-major (`[E, out, in]`, nn.Linear's layout), stored f16 behind a decompression
Convert (what `--weight-format fp16` exports hold) or int4 with group-wise scales (NNCF's int4_asym
layout: u4 `[E, out, groups, group]` -> Convert -> Subtract zero point -> Multiply scale -> Reshape ->
Convert), or symmetric int4 (`int4-sym`: NNCF's int4_sym, the kind of llama.cpp's Q4_0: i4 -> Convert ->
Multiply scale -> Reshape -> Convert, no zero point). Values are random (speed does not depend on them) but
scaled like a trained layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset14 as ops
from openvino.utils.node_factory import NodeFactory

_OPSET4 = NodeFactory("opset4")


@dataclass(frozen=True)
class LayerShape:
    name: str
    hidden: int
    intermediate: int
    experts: int
    top_k: int
    normalize: bool  # renormalise the top-k weights (norm_topk_prob)


SHAPES = {
    "qwen3": LayerShape("Qwen3-30B-A3B", 2048, 768, 128, 8, False),
    "mixtral": LayerShape("Mixtral-8x7B", 4096, 14336, 8, 2, True),
    "small": LayerShape("small", 256, 128, 16, 4, False),  # for tests of this module
}
WEIGHT_TYPES = ("f16", "int4", "int4-sym")
SYM_ZERO = 8  # int4-sym codes are stored 0..15 here, the value being code - 8 (an i4 constant in the graph)
INT4_GROUP = 128


@dataclass
class LayerWeights:
    """Out-major expert weights `[E, out, in]` (numpy storage) and the router `[E, H]`, f32."""

    shape: LayerShape
    weight_type: str
    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray
    router: np.ndarray
    # int4: per matrix (scale [E, out, groups, 1] f16, zero point [E, out, groups, 1] u4 stored as u8);
    # int4-sym: (scale, None)
    scales: dict | None = None

    @property
    def symmetric(self) -> bool:
        return self.weight_type == "int4-sym"

    def expert_bytes(self) -> int:
        """Bytes one expert's three matrices occupy as stored (int4: packed nibbles + f16 scales + zero points)."""
        s = self.shape
        elements = 3 * s.hidden * s.intermediate
        if self.weight_type == "f16":
            return 2 * elements
        groups = elements // INT4_GROUP
        return elements // 2 + groups * 2 + (0 if self.symmetric else groups // 2)


def _random(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """Random f16 values scaled by 1/sqrt(fan_in), cheaply: a random block repeated (speed ignores values)."""
    size = int(np.prod(shape))
    block = (rng.standard_normal(min(size, 1 << 22), dtype=np.float32) / np.sqrt(fan_in)).astype(np.float16)
    return np.resize(block, shape)


def _distinct_f16(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    """Every value drawn on its own (random sign and mantissa, |x| in [2^-6, 2^-4), about 1/sqrt(fan_in) for
    real fan-ins): saved IRs keep every expert (OpenVINO's save_model stores identical constants once), at
    bit-twiddling speed (~1 s per 10^8 values)."""
    bits = np.frombuffer(rng.bytes(2 * int(np.prod(shape))), np.uint16).copy()
    bits &= 0x87FF  # sign, the exponent's lowest bit, mantissa
    bits |= 0x2400  # exponent 9 or 10 (of bias 15)
    return bits.view(np.float16).reshape(shape)


def layer_weights(shape: LayerShape, weight_type: str = "f16", seed: int = 0, distinct: bool = False) -> LayerWeights:
    """`distinct`: every weight drawn on its own, as a trained layer is (for memory and file-size
    measurements); otherwise a random block repeated, which is faster and all speed measurements need."""
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"weight type {weight_type!r}: expected one of {WEIGHT_TYPES}")
    rng = np.random.default_rng(seed)
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    shapes = {"gate": ((e, i, h), h), "up": ((e, i, h), h), "down": ((e, h, i), i)}
    if distinct and weight_type != "f16":
        return _distinct_int4(shape, shapes, rng, weight_type)
    make = _distinct_f16 if distinct else _random
    gate, up, down = (make(rng, *shapes[n]) for n in ("gate", "up", "down"))
    router = (rng.standard_normal((e, h), dtype=np.float32) * 0.5 / np.sqrt(h)).astype(np.float32)
    if weight_type == "f16":
        return LayerWeights(shape, weight_type, gate, up, down, router)
    scales, packed = {}, []
    for name, w in (("gate", gate), ("up", up), ("down", down)):
        q, scale, zero = _quantize_int4(w, symmetric=weight_type == "int4-sym")
        scales[name] = (scale, zero)
        packed.append(q)
    return LayerWeights(shape, weight_type, *packed, router, scales)


def _distinct_int4(shape: LayerShape, shapes: dict, rng: np.random.Generator,
                   weight_type: str = "int4") -> LayerWeights:
    """Random int4 codes, zero points and scales drawn directly (quantising distinct f16 weights of a
    Mixtral layer would need ~10 GB of f32 temporaries)."""
    router = (rng.standard_normal((shape.experts, shape.hidden), dtype=np.float32) * 0.5 / np.sqrt(shape.hidden))
    packed, scales = [], {}
    for name in ("gate", "up", "down"):
        (e, out, inp), fan_in = shapes[name]
        grouped = (e, out, inp // INT4_GROUP)
        codes = np.frombuffer(rng.bytes(e * out * inp), np.uint8).reshape(*grouped, INT4_GROUP) & 0x0F
        scale = (rng.random((*grouped, 1), dtype=np.float32) + 0.5) * 4.0 / 15.0 / np.sqrt(fan_in)
        zero = None if weight_type == "int4-sym" else rng.integers(6, 10, size=(*grouped, 1), dtype=np.uint8)
        packed.append(codes)
        scales[name] = (scale.astype(np.float16), zero)
    return LayerWeights(shape, weight_type, *packed, router.astype(np.float32), scales)


def _quantize_int4(w: np.ndarray, symmetric: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """int4 per group of INT4_GROUP input columns: (codes u8 0..15 [E, out, g, gs], scale, zero). Asymmetric:
    its own zero point per group; symmetric (zero None): value = (code - 8) x scale, scale = max|w| / 8
    (NNCF's int4_sym, llama.cpp's Q4_0)."""
    e, out, inp = w.shape
    grouped = w.astype(np.float32).reshape(e, out, inp // INT4_GROUP, INT4_GROUP)
    if symmetric:
        scale = np.maximum(np.abs(grouped).max(-1, keepdims=True), 1e-6) / SYM_ZERO
        codes = np.clip(np.round(grouped / scale) + SYM_ZERO, 0, 15).astype(np.uint8)
        return codes, scale.astype(np.float16), None
    low, high = grouped.min(-1, keepdims=True), grouped.max(-1, keepdims=True)
    scale = np.maximum(high - low, 1e-6) / 15.0
    zero = np.clip(np.round(-low / scale), 0, 15)
    codes = np.clip(np.round(grouped / scale + zero), 0, 15).astype(np.uint8)
    return codes, scale.astype(np.float16), zero.astype(np.uint8)


def _nibble_constant(codes: np.ndarray, kind: ov.Type = ov.Type.u4) -> ov.Output:
    """A u4 (or i4) Constant from codes 0..15 (one per byte): packed two per byte, low nibble first. i4: the
    codes are the two's-complement nibbles (int4-sym: (code - 8) & 15)."""
    flat = codes.reshape(-1)
    packed = (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)
    tensor = ov.Tensor(kind, ov.Shape(list(codes.shape)))
    tensor.data.view(np.uint8)[...] = packed.reshape(tensor.data.shape)
    return ov.op.Constant(tensor).output(0)


def _const(array: np.ndarray) -> ov.Output:
    # Constant() needs C-contiguous data: a strided f16 view would silently become i16. The Constant shares
    # the array (and keeps it alive) instead of copying it: a 2.8 GB Mixtral layer is then held once, not
    # once per form built from the same weights.
    return ops.constant(np.ascontiguousarray(array), shared_memory=True).output(0)


def _matrix(weights: LayerWeights, name: str, expert: int | None) -> ov.Output:
    """One weight as an exporter stores it, decompressed to f32: all experts `[E, out, in]` (expert None) or
    one expert's `[out, in]`."""
    array = getattr(weights, name)
    part = array if expert is None else array[expert]
    if weights.weight_type == "f16":
        return ops.convert(_const(part), ov.Type.f32).output(0)
    scale, zero = weights.scales[name]
    if expert is not None:
        scale = scale[expert]
        zero = None if zero is None else zero[expert]
    if zero is None:  # int4-sym
        shifted = ops.convert(_nibble_constant(((part - SYM_ZERO) & 0x0F).astype(np.uint8), ov.Type.i4), ov.Type.f16)
    else:
        codes = ops.convert(_nibble_constant(part), ov.Type.f16)
        shifted = ops.subtract(codes, ops.convert(_nibble_constant(zero), ov.Type.f16))
    scaled = ops.multiply(shifted, _const(scale))
    out_major = [*part.shape[:-2], part.shape[-2] * part.shape[-1]]  # groups folded back into `in`
    return ops.convert(ops.reshape(scaled, _i64(out_major), False), ov.Type.f32).output(0)


def _i64(values) -> ov.Output:
    return ops.constant(np.asarray(values, dtype=np.int64)).output(0)


def _router(weights: LayerWeights, x: ov.Output) -> tuple[ov.Output, ov.Output]:
    s = weights.shape
    probs = ops.softmax(ops.matmul(x, _const(weights.router), False, True), 1)
    topk = ops.topk(probs, s.top_k, -1, "max", "value", "i64")
    routing = topk.output(0)
    if s.normalize:
        routing = ops.divide(routing, ops.reduce_sum(routing, _i64([-1]), True)).output(0)
    return routing, topk.output(1)


def _swish(value) -> ov.Output:
    return _OPSET4.create("Swish", [value.output(0) if isinstance(value, ov.Node) else value], {}).output(0)


def loop_layer(weights: LayerWeights) -> ov.Model:
    """F1: the per-expert loop (gen1 Mixtral/Qwen3-MoE export, models/README.md)."""
    s = weights.shape
    e, h, k = s.experts, s.hidden, s.top_k
    hidden = ops.parameter([-1, -1, h], np.float32, name="hidden_states")
    x = ops.reshape(hidden, _i64([-1, h]), False)
    routing, indices = _router(weights, x.output(0))
    mask = ops.transpose(ops.one_hot(indices, e, np.int64(1), np.int64(0), 2), _i64([2, 1, 0]))  # [E, K, T]
    flat_routing = ops.reshape(ops.unsqueeze(routing, _i64([2])), _i64([-1, 1]), False)  # [T*K, 1]
    acc = ops.broadcast(_const(np.array(0.0, np.float32)), ops.shape_of(x)).output(0)
    top_k = _const(np.array(k, np.int64))
    for expert in range(e):
        nonzero = ops.non_zero(ops.gather(mask, _i64(expert), _i64(0)), "i64")  # [2, n]: slot, token
        slot, token = ops.split(nonzero, _i64(0), 2).outputs()
        token = ops.squeeze(token, _i64([0]))
        rows = ops.reshape(ops.gather(x, token, _i64(0)), _i64([-1, h]), False)
        gate = ops.matmul(rows, _matrix(weights, "gate", expert), False, True)
        up = ops.matmul(rows, _matrix(weights, "up", expert), False, True)
        y = ops.matmul(ops.multiply(_swish(gate), up), _matrix(weights, "down", expert), False, True)
        slot_index = ops.add(ops.multiply(token, top_k), ops.squeeze(slot, _i64([0])))
        weight = ops.reshape(ops.gather(flat_routing, slot_index, _i64(0)), _i64([-1, 1]), False)
        update = ops.multiply(y, weight)
        target = ops.broadcast(ops.reshape(ops.convert(token, ov.Type.i32), _i64([-1, 1]), False),
                               ops.shape_of(update))
        acc = ops.scatter_elements_update(acc, target, update, _i64(0), "sum").output(0)
    out = ops.reshape(acc, ops.shape_of(hidden), False)
    return ov.Model([out.output(0)], [hidden], f"{s.name}-loop")


def tiled_layer(weights: LayerWeights) -> ov.Model:
    """F2: the tiled form (gen1 Qwen3-MoE norm_topk_prob=True after FuseMOE; gen2 exports)."""
    s = weights.shape
    e, h = s.experts, s.hidden
    hidden = ops.parameter([-1, -1, h], np.float32, name="hidden_states")
    x = ops.reshape(hidden, _i64([-1, h]), False)
    routing, indices = _router(weights, x.output(0))
    tokens = ops.gather(ops.shape_of(indices), _i64([0]), _i64(0))
    tiled = ops.reshape(ops.tile(x, _i64([e, 1])), ops.concat([_i64([e]), tokens, _i64([h])], 0), False)
    gate = ops.matmul(tiled, _matrix(weights, "gate", None), False, True)
    up = ops.matmul(tiled, _matrix(weights, "up", None), False, True)
    y = ops.matmul(ops.multiply(_swish(gate), up), _matrix(weights, "down", None), False, True)
    y = ops.reshape(y, ops.concat([_i64([e]), tokens, _i64([-1, h])], 0), False)  # [E, T, 1, H]
    zeros = ops.broadcast(_const(np.array(0.0, np.float32)), ops.concat([tokens, _i64([e])], 0))
    dense = ops.scatter_elements_update(zeros, indices, routing, _i64([1]))
    dense = ops.reshape(ops.transpose(dense, _i64([1, 0])), ops.concat([_i64([e]), tokens, _i64([-1])], 0), True)
    out = ops.reduce_sum(ops.multiply(y, ops.unsqueeze(dense, _i64([-1]))), _i64([0]), False)
    out = ops.reshape(out, ops.shape_of(hidden), False)
    return ov.Model([out.output(0)], [hidden], f"{s.name}-tiled")


def batched_mm_layer(weights: LayerWeights) -> ov.Model:
    """The `batched_mm` form `openvino.convert_model` traces from transformers 5 experts (docs/converting.md,
    patterns/batched_mm.py): per (token, slot) the expert's stacked `gate_up [E, 2I, H]` and `down [E, H, I]`
    gathered by the clamped expert id, a batched MatMul each, chunked SwiGLU, routing weight, masked_fill of
    ids >= E, sum over the K slots. f16 weights only (a direct conversion saved with ov.save_model's
    default f16 compression)."""
    if weights.weight_type != "f16":
        raise ValueError("batched_mm_layer: f16 weights only")
    s = weights.shape
    e, h, i, k = s.experts, s.hidden, s.intermediate, s.top_k
    hidden = ops.parameter([-1, -1, h], np.float32, name="hidden_states")
    x = ops.reshape(hidden, _i64([-1, h]), False)
    routing, indices = _router(weights, x.output(0))
    ids = ops.reshape(indices, _i64([-1]), False)
    invalid = ops.unsqueeze(ops.greater_equal(ids, _i64(e)), _i64(-1))
    clamped = ops.convert(ops.clamp(ids, 0, e - 1), ov.Type.i32)
    gate_up = ops.convert(_const(np.concatenate([weights.gate, weights.up], axis=1)), ov.Type.f32)  # [E, 2I, H]
    down = ops.convert(_const(weights.down), ov.Type.f32)  # [E, H, I]
    tokens = ops.gather(ops.shape_of(x), _i64(0), _i64(0))
    token_idx = ops.range(_i64(0), tokens, _i64(1), "i64")
    expanded = ops.broadcast(ops.unsqueeze(token_idx, _i64(1)), _i64([1, k]), broadcast_spec="BIDIRECTIONAL")
    token_idx = ops.reshape(expanded, _i64([-1]), False)
    rows = ops.unsqueeze(ops.gather(x, ops.convert(token_idx, ov.Type.i32), _i64(0)), _i64(-1))  # [S, H, 1]
    projected = ops.squeeze(ops.matmul(ops.gather(gate_up, clamped, _i64(0)), rows, False, False), _i64([-1]))
    gate, up = ops.variadic_split(projected, _i64(-1), _i64([i, i])).outputs()
    act = ops.unsqueeze(ops.multiply(_swish(gate), up), _i64(-1))  # [S, I, 1]
    y = ops.squeeze(ops.matmul(ops.gather(down, clamped, _i64(0)), act, False, False), _i64([-1]))  # [S, H]
    y = ops.multiply(y, ops.unsqueeze(ops.reshape(routing, _i64([-1]), False), _i64(-1)))
    y = ops.select(invalid, _const(np.array(0.0, np.float32)), y)
    out = ops.reduce_sum(ops.reshape(y, _i64([-1, k, h]), False), _i64([1]), False)
    out = ops.reshape(out, ops.shape_of(hidden), False)
    return ov.Model([out.output(0)], [hidden], f"{s.name}-batched_mm")


FORMS = {"loop": loop_layer, "tiled": tiled_layer, "batched_mm": batched_mm_layer}


def reference_output(weights: LayerWeights, x: np.ndarray) -> np.ndarray:
    """The layer in numpy (f32), for checking the builders: x [B, S, H] -> [B, S, H]."""
    from moe_fusion.reference import fused_experts

    s = weights.shape
    flat = x.reshape(-1, s.hidden).astype(np.float32)
    logits = flat @ weights.router.T
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    idx = np.argsort(-probs, axis=-1, kind="stable")[:, : s.top_k]
    rw = np.take_along_axis(probs, idx, -1)
    if s.normalize:
        rw /= rw.sum(-1, keepdims=True)
    mats = [_dequantized(weights, n).swapaxes(1, 2) for n in ("gate", "up", "down")]  # [E, in, out]
    return fused_experts(flat, rw, idx, mats).reshape(x.shape)


def _dequantized(weights: LayerWeights, name: str) -> np.ndarray:
    array = getattr(weights, name)
    if weights.weight_type == "f16":
        return array.astype(np.float32)
    scale, zero = weights.scales[name]
    zero = np.float32(SYM_ZERO) if zero is None else zero.astype(np.float32)
    values = (array.astype(np.float32) - zero) * scale.astype(np.float32)
    return values.reshape(*array.shape[:-2], -1)


def fused_layer(weights: LayerWeights) -> ov.Model:
    """The layer as one FusedExperts, its weights wired the way the rewrite wires them: f16 stacked
    `[E, in, out]` behind a Convert; int4 as `Transpose(decompressed [E, out, in], [0, 2, 1])`, the
    decompression subgraph kept as stored (the form fusing NNCF-compressed exports gives)."""
    from moe_fusion import FusedExperts

    s = weights.shape
    hidden = ops.parameter([-1, -1, s.hidden], np.float32, name="hidden_states")
    x = ops.reshape(hidden, _i64([-1, s.hidden]), False)
    routing, indices = _router(weights, x.output(0))
    names = ("gate", "up", "down")
    if weights.weight_type == "f16":
        mats = [ops.convert(_const(np.swapaxes(getattr(weights, n), 1, 2)), ov.Type.f32) for n in names]
    else:
        mats = [ops.transpose(_matrix(weights, n, None), _i64([0, 2, 1])) for n in names]
    node = FusedExperts(x, routing, indices, *mats)
    out = ops.reshape(node, ops.shape_of(hidden), False)
    return ov.Model([out.output(0)], [hidden], f"{s.name}-fused")
