"""Expert weights behind a decompression subgraph (NNCF int8/int4: Constant u8/i8/u4/i4 -> Convert ->
[Subtract zero point] -> Multiply scale -> [Reshape groups away] -> [Convert]), kept compressed.

Per-expert weights (F1) are stacked by stacking each *compressed* constant (4-bit data as packed bytes)
and rebuilding the same decompression ops with a leading expert axis, so every expert dequantises bit
for bit as before. Weights that are stacked already (F2) are used as they are. Either way the
decompressed `[E, out, in]` weight reaches FusedExperts through a Transpose to `[E, in, out]`, which
OpenVINO folds at compile time and lowering removes again (the CPU plugin's compressed kernels want
`[E, out, in]`): no dequantised or transposed copy is written to the file.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion import scratch
from moe_fusion.graph import DECOMPRESSION

_PACKED = {ov.Type.u4, ov.Type.i4, ov.Type.u2, ov.Type.u1, ov.Type.nf4, ov.Type.f4e2m1}


def is_weight(value: ov.Output, depth: int = 8) -> bool:
    """A value computed from Constants only, through decompression ops."""
    node = value.get_node()
    if node.get_type_name() == "Constant":
        return True
    return (
        depth > 0
        and node.get_type_name() in DECOMPRESSION
        and all(is_weight(v, depth - 1) for v in node.input_values())
    )


def is_plain(value: ov.Output) -> bool:
    """A Constant, or a Constant behind one Convert (f16/bf16 storage): read as a numpy array instead."""
    node = value.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    return node.get_type_name() == "Constant" and node.get_element_type() not in _PACKED and not _quantized(value)


def plain_weight(value: ov.Output) -> tuple[np.ndarray, dict]:
    """A plain weight's (`is_plain`) stored array and the `Weight` fields that keep its storage: the Convert's
    type, and bf16 named (numpy shows bf16 as float16 bits)."""
    convert_to = None
    if value.get_node().get_type_name() == "Convert":
        convert_to, value = value.get_element_type(), value.get_node().input_value(0)
    node = value.get_node()
    storage = ov.Type.bf16 if node.get_element_type() == ov.Type.bf16 else None
    return np.asarray(node.get_data()), {"convert_to": convert_to, "storage": storage}


def _quantized(value: ov.Output) -> bool:
    source = value.get_node().input_value(0) if value.get_node().get_type_name() == "Convert" else value
    return source.get_element_type().is_integral()


@dataclass
class Compressed:
    """One expert's (or all experts' stacked) weight as the MatMul reads it, through its decompression.
    `out_major`: the value is `[..., out, in]` (the MatMul had transpose_b)."""

    value: ov.Output
    out_major: bool

    @property
    def shape(self) -> tuple[int, ...]:
        """Oriented `[..., in, out]` like the numpy weights."""
        dims = list(self.value.get_shape())
        if self.out_major:
            dims[-2:] = dims[-1], dims[-2]
        return tuple(dims)

    @property
    def ndim(self) -> int:
        return len(self.shape)


def to_fused(parts: list[Compressed]) -> ov.Output:
    """The `[E, in, out]` input of FusedExperts from per-expert parts (in expert order) or one stacked part."""
    value = parts[0].value if len(parts) == 1 else stack([p.value for p in parts])
    if not parts[0].out_major:
        return value
    rank = value.get_partial_shape().rank.get_length()
    return ops.transpose(value, [*range(rank - 2), rank - 1, rank - 2]).output(0)


def stack(values: list[ov.Output]) -> ov.Output:
    """One decompression subgraph computing `stack(values)`, from the experts' stacked constants.
    Raises ValueError naming the difference when the experts' subgraphs differ in structure."""
    nodes = [v.get_node() for v in values]
    kinds = {n.get_type_name() for n in nodes}
    if len(kinds) != 1:
        raise ValueError(f"experts' weight decompression differs: {sorted(kinds)}")
    kind = kinds.pop()
    shapes = {tuple(v.get_shape()) for v in values}
    if len(shapes) != 1:
        raise ValueError(f"experts' compressed {kind} shapes differ: {sorted(shapes)}")
    shape = list(shapes.pop())
    if kind == "Constant":
        return _stacked_constant(nodes)
    if kind in ("Reshape", "Unsqueeze", "Squeeze"):  # layout: the same static shape with the expert axis first
        return ops.reshape(stack([n.input_value(0) for n in nodes]), [len(values), *shape], False).output(0)
    attributes = [n.get_attributes() for n in nodes]
    if any(a != attributes[0] for a in attributes):
        raise ValueError(f"experts' {kind} attributes differ")
    if kind == "Convert":
        return ops.convert(stack([n.input_value(0) for n in nodes]), values[0].get_element_type()).output(0)
    if attributes[0].get("auto_broadcast", "numpy") != "numpy":
        raise ValueError(f"{kind} broadcasts as {attributes[0]['auto_broadcast']}")
    inputs = [_aligned(stack([n.input_value(i) for n in nodes]), len(shape)) for i in range(2)]
    return (ops.subtract if kind == "Subtract" else ops.multiply)(*inputs).output(0)


def _aligned(value: ov.Output, rank: int) -> ov.Output:
    """`[E, *s]` as `[E, 1.., *s]` of rank `rank + 1`, so numpy broadcasting pairs the expert axes."""
    shape = list(value.get_shape())
    if len(shape) == rank + 1:
        return value
    return ops.reshape(value, [shape[0], *[1] * (rank + 1 - len(shape)), *shape[1:]], False).output(0)


def _stacked_constant(nodes: list[ov.Node]) -> ov.Output:
    """The experts' constants stacked, from their raw storage: packed sub-byte data and bf16 stay as they are."""
    element_type = nodes[0].get_element_type()
    if any(n.get_element_type() != element_type for n in nodes):
        raise ValueError("experts' compressed constants differ in element type")
    shape = [len(nodes), *nodes[0].get_output_shape(0)]
    if int(np.prod(shape[1:])) * element_type.bitwidth % 8:  # sub-byte data concatenates as whole bytes only
        raise ValueError(f"{element_type} constant of {shape[1:]} does not fill whole bytes")
    # the raw storage (packed nibbles, bf16 bits) of each expert, one after the other
    views = [np.asarray(n.get_tensor_view().data).reshape(-1) for n in nodes]
    raw = scratch.empty((sum(v.size for v in views),), views[0].dtype)
    np.concatenate(views, out=raw)
    return scratch.packed_constant(raw, element_type, shape)


# A Convert carrying the "decompression" runtime attribute, read from IR: the attribute's type cannot be
# made from Python, only copied (set_rt_info takes the OVAny as it is).
_MARKED_CONVERT_IR = """<?xml version="1.0"?>
<net name="mark" version="11"><layers>
<layer id="0" name="c" type="Const" version="opset1"><data element_type="f16" shape="1" offset="0" size="2"/>
<output><port id="0" precision="FP16"><dim>1</dim></port></output></layer>
<layer id="1" name="cv" type="Convert" version="opset1"><data destination_type="f32"/>
<rt_info><attribute name="decompression" version="0"/></rt_info>
<input><port id="0" precision="FP16"><dim>1</dim></port></input>
<output><port id="1" precision="FP32"><dim>1</dim></port></output></layer>
<layer id="2" name="r" type="Result" version="opset1"><input><port id="0" precision="FP32"><dim>1</dim></port></input>
</layer></layers>
<edges><edge from-layer="0" from-port="0" to-layer="1" to-port="0"/>
<edge from-layer="1" from-port="1" to-layer="2" to-port="0"/></edges></net>"""


@functools.cache
def _decompression_mark() -> ov.OVAny:
    model = ov.Core().read_model(_MARKED_CONVERT_IR, ov.Tensor(np.zeros(1, np.float16)))
    convert = next(n for n in model.get_ordered_ops() if n.get_type_name() == "Convert")
    return convert.get_rt_info()["decompression_0"]


def mark_decompression(convert: ov.Node) -> ov.Node:
    """Mark a Convert of stored f16/bf16 weights as their decompression, as OpenVINO's own IR does: unmarked,
    the CPU plugin folds it at compile time into an f32 copy of the weights (twice the memory)."""
    convert.set_rt_info(_decompression_mark(), "decompression_0")
    return convert
