"""`value[i]` for every expert i of a stacked `[E, ...]` weight, cut during lowering (never a Gather node at run
time): constants sliced in numpy from their raw storage, decompression subgraphs rebuilt per expert on the
slices, so every expert's weight stays as compressed as it was stored.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion.compressed import mark_decompression
from moe_fusion.lower.experts import i64, is_swap_last_two


def expert_values(value: ov.Output, count: int) -> list[ov.Output]:
    """`value[i]` for every expert i of a stacked `[E, ...]` value, as separate subgraphs.

    Constants are sliced in numpy from their raw storage (u4/i4 nibbles and bf16 bits as stored), and a
    decompression subgraph (Convert, Subtract, Multiply, Reshape with the expert axis first; a
    Transpose(.., [0, 2, 1])) is rebuilt per expert on those slices, so each expert's weight stays
    compressed and reaches the plugin's compressed FullyConnected pattern. Anything else is a Gather."""
    memo: dict = {}
    return [_expert_value(value, i, count, memo) for i in range(count)]


def _expert_value(value: ov.Output, i: int, count: int, memo: dict) -> ov.Output:
    key = (value.get_node(), value.get_index(), i)
    if key not in memo:
        memo[key] = _slice_expert(value, i, count, memo)
    return memo[key]


def _slice_expert(value: ov.Output, i: int, count: int, memo: dict) -> ov.Output:
    node, kind = value.get_node(), value.get_node().get_type_name()
    shape = value.get_partial_shape()
    index = i if shape.is_static and shape[0].get_length() == count else 0  # a leading 1 broadcasts
    if kind == "Constant" and shape.is_static:
        return _constant_slice(node, index)
    rank = shape.rank.get_length()
    if kind == "Convert":
        inner = _expert_value(node.input_value(0), i, count, memo)
        convert = ops.convert(inner, value.get_element_type())
        if inner.get_node().get_type_name() == "Constant" and inner.get_element_type().is_real():
            # f16/bf16 storage: marked as decompression, or the plugin folds it into an f32 copy
            mark_decompression(convert)
        return convert.output(0)
    if kind in ("Subtract", "Multiply", "Add") and node.get_attributes().get("auto_broadcast", "numpy") == "numpy":
        inputs = [  # an input of lower rank broadcasts from the right: it holds no expert axis
            _expert_value(v, i, count, memo) if v.get_partial_shape().rank.get_length() == rank else v
            for v in node.input_values()
        ]
        return {"Subtract": ops.subtract, "Multiply": ops.multiply, "Add": ops.add}[kind](*inputs).output(0)
    target = node.input_value(1).get_node() if node.get_input_size() > 1 else None
    if kind == "Reshape" and target.get_type_name() == "Constant" and shape.is_static:
        dims = [int(d) for d in target.get_data()]
        if dims[0] == shape[0].get_length() and 0 not in dims[1:]:
            inner = _expert_value(node.input_value(0), i, count, memo)
            return ops.reshape(inner, i64(dims[1:]), False).output(0)
    if kind == "Transpose" and rank == 3 and is_swap_last_two(node):
        inner = _expert_value(node.input_value(0), i, count, memo)
        if inner.get_node().get_type_name() == "Constant":
            return _constant_transposed(inner.get_node())
        return ops.transpose(inner, i64([1, 0])).output(0)
    return ops.gather(value, i64(index), i64(0)).output(0)  # scalar index: the expert axis goes


def _raw(const: ov.Node) -> np.ndarray:
    """A Constant's storage as stored: packed nibbles as uint8, bf16 as uint16."""
    data = np.asarray(const.get_tensor_view().data)
    return data.view(np.uint16) if const.get_element_type() == ov.Type.bf16 else data


def _constant_slice(const: ov.Node, index: int) -> ov.Output:
    """`const[index]` as a new Constant of the same element type (sub-byte data sliced as whole bytes)."""
    element_type, shape = const.get_element_type(), list(const.get_output_shape(0))
    tensor = ov.Tensor(element_type, ov.Shape(shape[1:]))
    raw, out = _raw(const).reshape(-1), tensor.data
    if element_type == ov.Type.bf16:
        out = out.view(np.uint16)
    if element_type.bitwidth < 8:  # packed: expert i's elements are bytes [i * n, (i + 1) * n)
        per = int(np.prod(shape[1:], dtype=np.int64)) * element_type.bitwidth
        if per % 8:
            return ops.gather(const, i64(index), i64(0)).output(0)
        n = per // 8
        out.reshape(-1)[:] = raw[index * n:(index + 1) * n]
    else:
        out[...] = raw.reshape(shape)[index]
    return ov.op.Constant(tensor).output(0)


def _constant_transposed(const: ov.Node) -> ov.Output:
    """A 2-D Constant `[in, out]` copied as `[out, in]`; packed types stay a Transpose for the plugin."""
    element_type = const.get_element_type()
    if element_type.bitwidth < 8:
        return ops.transpose(const, i64([1, 0])).output(0)
    data = _raw(const)
    tensor = ov.Tensor(element_type, ov.Shape([data.shape[1], data.shape[0]]))
    tensor.data.view(data.dtype)[...] = data.T
    return ov.op.Constant(tensor).output(0)
