"""Reading a FusedExperts for lowering, and the pieces every form builds from: out-major weights, biases,
the SwiGLU activations in the op order the CPU plugin's patterns read, the routing slots sorted by expert.

Expert GEMMs are written `MatMul(x, W, transpose_b=True)` on out-major weights `[E, out, in]`, the layout the
plugin's GatherMatmul and its compressed kernels read. A weight that arrives as
`Transpose(decompressed [E, out, in], [0, 2, 1])` (compressed weights: Constant u8/i8/u4/i4 -> Convert ->
[Subtract] -> Multiply -> [Reshape] -> [Convert]) is used without that Transpose; plain constants (or
Convert(Constant)) are transposed once in numpy here, so the saved IR already holds the layout and compiling
does no folding. The Convert after f16/bf16 storage is marked `decompression`, so the plugin keeps the
storage type instead of folding an f32 copy.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset11 as ops11
import openvino.opset14 as ops
from openvino.utils.node_factory import NodeFactory

from moe_fusion.compressed import mark_decompression
from moe_fusion.lower.policy import LowerError
from moe_fusion.reference import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU, bf16_to_f32, f32_to_bf16

I64_MAX = np.iinfo(np.int64).max
_OPSET4 = NodeFactory("opset4")


class Experts:
    """A FusedExperts' inputs and attributes, weights re-expressed out-major `[E, out, in]`."""

    def __init__(self, node: ov.Node, copy_weights: bool = True, store: ov.Type | None = None) -> None:
        """`store`: keep plain float weights (f16/bf16/f32 constants) in this type (see `out_major`)."""
        attrs = node.get_attributes()
        self.name = node.get_friendly_name()
        self.expert_type = str(attrs["expert_type"])
        self.alpha = float(attrs["expert_alpha"])
        self.beta = float(attrs["expert_beta"])
        self.gate_idx = int(attrs["gate_idx"])
        self.hidden = node.input_value(0)
        self.float_type = self.hidden.get_element_type()
        self.routing = as_type(node.input_value(1), self.float_type)
        self.indices = node.input_value(2)
        first = node.get_input_partial_shape(3)
        self.num_experts, self.hidden_size = first[0].get_length(), first[1].get_length()
        if self.expert_type == GEMM3_SWIGLU:
            self.matrices = [out_major(node.input_value(i), copy_weights, store) for i in (3, 4, 5)]  # gate, up, down
            self.biases: list[ov.Output | None] = [None, None]
        elif self.expert_type == GEMM2_BIAS_SWIGLU_CLAMP:
            self.matrices = [out_major(node.input_value(i), copy_weights, store) for i in (3, 5)]  # gate_up, down
            self.biases = [node.input_value(4), node.input_value(6)]
        else:
            raise LowerError(f"{self.name}: expert_type {self.expert_type!r} cannot be lowered")
        self.matrices = [as_type(m, self.float_type) for m in self.matrices]

    def flat_hidden(self) -> ov.Output:
        return ops.reshape(self.hidden, i64([-1, self.hidden_size]), False).output(0)

    def restore_shape(self, out: ov.Output) -> ov.Output:
        """[T, H] back to hidden_states' shape (and name it after the FusedExperts)."""
        result = ops.reshape(out, ops.shape_of(self.hidden), False)
        result.set_friendly_name(self.name)
        return result.output(0)

    def scalar(self, value: float) -> ov.Output:
        return ops.constant(np.array(value, dtype=self.float_type.to_dtype())).output(0)


def i64(values) -> ov.Output:
    return ops.constant(np.asarray(values, dtype=np.int64)).output(0)


def as_type(value: ov.Output, element_type: ov.Type) -> ov.Output:
    return value if value.get_element_type() == element_type else ops.convert(value, element_type).output(0)


def transposed_constant(const: ov.Node, store: ov.Type | None = None) -> ov.Output:
    """A Constant `[E, in, out]` copied out-major `[E, out, in]` (done once here, not at every compile), in
    its own type or as `store` (f32: exact from f16/bf16; bf16: rounded to nearest even, as the CPU plugin
    converts f16/f32 weights for bf16 inference). One expert at a time: no whole-weight f32 transient."""
    element_type = const.get_element_type()
    data = const.get_data()
    if element_type == ov.Type.bf16:  # get_data shows bf16 as float16: move the raw bits
        data = data.view(np.uint16)
    target = store if store is not None else element_type
    tensor = ov.Tensor(target, ov.Shape([data.shape[0], data.shape[2], data.shape[1]]))
    for expert, part in enumerate(data):
        if target != element_type:
            part = _as_store(part, element_type, target)
        tensor.data.view(part.dtype)[expert] = part.T  # one strided copy into the new storage
    return ov.op.Constant(tensor).output(0)


def _as_store(values: np.ndarray, element_type: ov.Type, store: ov.Type) -> np.ndarray:
    """Float values stored as `element_type` (bf16: its raw uint16 bits) as `store` (f32 as float32; bf16 as
    its raw uint16 bits)."""
    values = bf16_to_f32(values) if element_type == ov.Type.bf16 else values.astype(np.float32)
    if store == ov.Type.f32:
        return values
    if store != ov.Type.bf16:
        raise LowerError(f"weights cannot be stored as {store}")
    return f32_to_bf16(values)


def is_swap_last_two(node: ov.Node) -> bool:
    if node.get_type_name() != "Transpose":
        return False
    perm = node.input_value(1).get_node()
    return perm.get_type_name() == "Constant" and list(perm.get_data()) == [0, 2, 1]


def out_major(weight: ov.Output, copy: bool = True, store: ov.Type | None = None) -> ov.Output:
    """The same weight `[E, in, out]` as an out-major `[E, out, in]` value for `MatMul(transpose_b=True)`.

    `store`: plain float weights are copied in that type (the inference precision of the CPU the model will
    run on). GatherMatmul keeps the output of the decompression Convert in front of it alive beside its packed
    copy (measured: 2.0x the f16 bytes at bf16 inference, 4.0x at f32); weights already in the precision it
    computes in skip that copy (1.0x at bf16, 2.0x at f32)."""
    node = weight.get_node()
    if is_swap_last_two(node):  # compressed weights: read the decompression subgraph as it is stored
        return node.input_value(0)
    decompress = None  # f16/bf16 storage behind a Convert: move the storage, keep the Convert after it
    if node.get_type_name() == "Convert" and node.input_value(0).get_node().get_type_name() == "Constant":
        decompress, node = node.get_output_element_type(0), node.input_value(0).get_node()
    if node.get_type_name() == "Constant" and node.get_element_type().bitwidth >= 8:
        if not (copy and store is not None and node.get_element_type().is_real()):
            store = None
        moved = transposed_constant(node, store) if copy else ops.transpose(node, i64([0, 2, 1])).output(0)
        target = decompress or node.get_element_type()
        if moved.get_element_type() == target:
            return moved
        return mark_decompression(ops.convert(moved, target)).output(0)
    return ops.transpose(weight, i64([0, 2, 1])).output(0)  # anything else: the plugin folds or runs it


def bias(experts: Experts, value: ov.Output, shape: list[int]) -> ov.Output:
    """A bias `[E, out]` as an f32/hidden-typed Constant of `shape` when it is constant (the plugin's 2-GEMM
    pattern wants a Constant there); otherwise a Reshape of the value."""
    node, target = value.get_node(), experts.float_type
    if node.get_type_name() == "Convert" and node.input_value(0).get_node().get_type_name() == "Constant":
        node = node.input_value(0).get_node()
    if node.get_type_name() == "Constant" and node.get_element_type() != ov.Type.bf16:
        data = node.get_data().astype(np.float32).reshape(shape)
        if target == ov.Type.bf16:
            return ops.convert(ops.constant(data), target).output(0)
        return ops.constant(np.ascontiguousarray(data.astype(target.to_dtype()))).output(0)
    return as_type(ops.reshape(value, i64(shape), False).output(0), target)


def gemm2_activation(experts: Experts, gate_up: ov.Output, axis: int) -> ov.Output:
    """`(clamp(up) + 1) * swish(min(gate, limit), beta)` on interleaved lanes, in the op order the CPU
    plugin's 2-GEMM pattern reads (Slice -> Clamp -> Add; Slice -> Minimum -> Swish; Multiply)."""
    limit = experts.alpha if experts.alpha > 0 else np.inf  # no clamp: +-inf keeps the pattern's shape
    lane = experts.gate_idx
    up = ops.slice(gate_up, i64([1 - lane]), i64([I64_MAX]), i64([2]), i64([axis]))
    up = ops.add(ops.clamp(up, -limit, limit), experts.scalar(1.0))
    gate = ops.slice(gate_up, i64([lane]), i64([I64_MAX]), i64([2]), i64([axis]))
    gate = ops.swish(ops.minimum(gate, experts.scalar(limit)), experts.scalar(experts.beta))
    return ops.multiply(up, gate).output(0)


def swish(experts: Experts, gate: ov.Output) -> ov.Output:
    # The plugin's 3-GEMM pattern matches a one-input Swish only; opset Python's swish(x) always adds a
    # beta input, so build it through the node factory. Another beta keeps its input (and no GatherMatmul).
    if experts.beta == 1.0:
        return _OPSET4.create("Swish", [gate], {}).output(0)
    return ops.swish(gate, experts.scalar(experts.beta)).output(0)



def sorted_slots(experts: Experts) -> tuple[ov.Output, ov.Output, ov.Output, int]:
    """The T*K routing slots sorted by expert (stable: slot order within an expert is kept): (expert of each
    sorted slot, slot order, the sorted rows of hidden [T*K, H], K)."""
    top_k = experts.indices.get_partial_shape()[-1].get_length()
    slot_expert = ops.convert(ops.reshape(experts.indices, i64([-1]), False), ov.Type.i32)  # [T*K]
    slots = ops.shape_of(slot_expert, ov.Type.i32)
    by_expert = ops11.topk(slot_expert, ops.squeeze(slots, i64([0])), 0, "min", "value", "i32", stable=True)
    sorted_expert, order = by_expert.output(0), by_expert.output(1)
    token = ops.divide(order, ops.constant(np.array(top_k, np.int32)))  # integer division: slot // K
    rows = ops.gather(experts.flat_hidden(), token, i64(0))  # [T*K, H], grouped by expert
    return sorted_expert, order, rows.output(0), top_k


def combine(experts: Experts, y: ov.Output, order: ov.Output, top_k: int) -> ov.Output:
    """Rows `y` [T*K, H] in sorted slot order -> weighted by their routing weight, back to slot order (order is
    a permutation), each token's K slots summed, in hidden_states' shape."""
    h = experts.hidden_size
    weight = ops.gather(ops.reshape(experts.routing, i64([-1, 1]), False), order, i64(0))  # [T*K, 1]
    y = ops.multiply(y, weight)
    placed = ops.scatter_update(ops.broadcast(experts.scalar(0.0), ops.shape_of(y)), order, y, i64(0))
    out = ops.reduce_sum(ops.reshape(placed, i64([-1, top_k, h]), False), i64([1]), False)
    return experts.restore_shape(out.output(0))
