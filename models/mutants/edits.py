"""Editing helpers the operators share: replacing nodes and constants, and reaching one expert's part of a
weight (a per-expert constant, or slab e of a stacked [E, ...] one, behind its decompression)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from models.mutants.engine_api import DECOMPRESSION
from models.mutants.sites import Site, key, weight_value

NUMPY_TYPES = (ov.Type.f32, ov.Type.f16, ov.Type.i8, ov.Type.u8)
FLOATS = (ov.Type.f32, ov.Type.f16)


@dataclass
class Change:
    description: str
    expect: str = ""  # "fused" | "declined" | "" (either may be right)


Operator = Callable[[Site, np.random.Generator], Change | None]


def label(node: ov.Node) -> str:
    return f"{node.get_type_name()} '{node.get_friendly_name()}'"


def replace(old: ov.Node, new: ov.Node) -> None:
    new.set_friendly_name(old.get_friendly_name())
    for i in range(old.get_output_size()):
        old.output(i).replace(new.output(i))


def as_array(array: np.ndarray, like: ov.Output) -> np.ndarray:
    """`array` in `like`'s element type, C-contiguous, in `like`'s shape when it has as many elements
    (np.ascontiguousarray would turn a scalar into a 1-element vector)."""
    array = np.array(array, dtype=like.get_element_type().to_dtype(), order="C")
    shape = list(like.get_shape())
    return array.reshape(shape) if array.size == int(np.prod(shape)) else array


def set_const(node: ov.Node, array: np.ndarray) -> None:
    """Replace Constant `node` by one holding `array` in the same element type and shape."""
    replace(node, ops.constant(as_array(array, node.output(0))))


def set_input_const(node: ov.Node, index: int, array: np.ndarray) -> None:
    """Feed input `index` of `node` from a new Constant (leaves the old one to its other consumers)."""
    new = ops.constant(as_array(array, node.input_value(index)))
    node.input(index).replace_source_output(new.output(0))


def pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))] if items else None


def weight_constants(matmul: ov.Node, readable_only: bool = True) -> list[ov.Node]:
    """The Constants a weight MatMul's weight is decompressed from, largest first: numpy-readable ones only
    (f32, f16, i8, u8), or all with `readable_only=False`."""
    start = weight_value(matmul)
    if start is None:
        return []
    found, stack, seen = [], [start.get_node()], set()
    while stack:
        node = stack.pop()
        if node.get_instance_id() in seen:
            continue
        seen.add(node.get_instance_id())
        if node.get_type_name() == "Constant":
            readable = node.get_element_type() in NUMPY_TYPES or not readable_only
            if readable and node.get_output_shape(0):
                found.append(node)
        elif node.get_type_name() in DECOMPRESSION:
            stack.extend(v.get_node() for v in node.input_values())
    return sorted(found, key=lambda n: -int(np.prod(list(n.get_output_shape(0)))))


def float_weight(matmul: ov.Node) -> ov.Node | None:
    """The float Constant behind a weight: the weight itself (f32/f16 storage) or its scale (int8/int4)."""
    floats = [c for c in weight_constants(matmul) if c.get_element_type() in FLOATS]
    return floats[0] if floats else None


def is_stacked(site: Site, data: np.ndarray) -> bool:
    return data.ndim >= 3 and data.shape[0] == site.num_experts


def edit_weight(site: Site, rng: np.random.Generator, matmul: ov.Node, expert: int | None, fn, what: str) -> str | None:
    """Apply `fn` to one expert's part of `matmul`'s float weight (slab `expert` when stacked)."""
    constant = float_weight(matmul)
    if constant is None:
        return None
    data = np.array(constant.get_data())
    if is_stacked(site, data):
        e = int(rng.integers(data.shape[0])) if expert is None else expert
        data[e] = fn(data[e])
        where = f"expert {e}'s slab of {label(constant)}"
    else:
        data = fn(data)
        where = label(constant)
    set_const(constant, data)
    return f"{what} in {where} (weight of {label(matmul)})"


def down(site: Site, matmuls: list[ov.Node]) -> ov.Node | None:
    """The down projection among `matmuls`: the last one (in graph order) with an H-wide output dim; the
    last dim in most forms, the one before it in `batched_mm` ([S, H, 1])."""
    hidden = ov.Dimension(site.block.hidden_size)
    order = {n.get_instance_id(): i for i, n in enumerate(site.nodes)}
    found = []
    for m in matmuls:
        shape = m.get_output_partial_shape(0)
        rank = shape.rank.get_length()
        column = rank >= 3 and shape[rank - 1] == ov.Dimension(1) and shape[rank - 2] == hidden
        if shape[rank - 1] == hidden or column:
            found.append(m)
    return max(found, key=lambda m: order.get(m.get_instance_id(), -1)) if found else None


def float_edges(site: Site) -> list[tuple[ov.Output, ov.Input]]:
    """(value, consumer input) pairs inside the block carrying f32 data (not into ShapeOf)."""
    inside = {n.get_instance_id() for n in site.nodes}
    edges = []
    for node in site.nodes:
        if node.get_type_name() in ("ShapeOf", "Constant"):
            continue
        for i, value in enumerate(node.input_values()):
            source = value.get_node()
            if value.get_element_type() != ov.Type.f32 or source.get_type_name() == "Constant":
                continue
            if source.get_instance_id() in inside or key(value) == key(site.block.hidden):
                edges.append((value, node.input(i)))
    return edges


def split_after(matmul: ov.Node, steps: int = 4) -> ov.Node | None:
    """The 2-way Split/VariadicSplit that chunks `matmul`'s output (gate_up into halves), following single
    consumers through layout ops, a bias Add and a Concat of per-expert outputs; None if there is none."""
    node = matmul
    for _ in range(steps):
        targets = [t for t in node.output(0).get_target_inputs() if t.get_node().get_type_name() != "ShapeOf"]
        if len(targets) != 1:
            return None
        node = targets[0].get_node()
        if node.get_type_name() in ("Split", "VariadicSplit"):
            used = [i for i in range(node.get_output_size()) if node.output(i).get_target_inputs()]
            return node if len(used) == 2 and node.get_output_size() == 2 else None
        if node.get_type_name() not in ("Squeeze", "Unsqueeze", "Reshape", "Add", "Concat", "Convert"):
            return None
    return None
