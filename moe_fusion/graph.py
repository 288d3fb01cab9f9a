"""Graph helpers every tier uses, each written once: value keys, output names, the Constant behind a
decompression, node descriptions, and walking back from a block's output."""

from __future__ import annotations

import numpy as np
import openvino as ov

# Ops that change a value's layout or type, never its numbers' meaning: a pattern looks through them.
LAYOUT = ("Reshape", "Squeeze", "Unsqueeze", "Convert", "Broadcast")
# Ops between a stored weight and the value a MatMul reads (f16 Convert; int8/int4 Convert, Subtract zero
# point, Multiply scale, group Reshape).
DECOMPRESSION = ("Convert", "Subtract", "Multiply", "Reshape", "Unsqueeze", "Squeeze")
# How far back a block may reach from its output before it is taken as unbounded (the largest real
# blocks, 256-expert per-expert loops, hold ~20k nodes).
MAX_BLOCK_NODES = 200_000

ValueKey = tuple[int, int]


def value_key(value: ov.Output) -> ValueKey:
    """A graph value's identity: (node instance, output port)."""
    return value.get_node().get_instance_id(), value.get_index()


def same(a: ov.Output, b: ov.Output) -> bool:
    """The same graph value (node and output port)."""
    return value_key(a) == value_key(b)


def output_name(value: ov.Output) -> str:
    """A value's name as users see it: its first tensor name, else its node's friendly name."""
    names = sorted(value.get_names())
    return names[0] if names else value.get_node().get_friendly_name()


def describe(node: ov.Node | None) -> str:
    """`Type 'name'`, the way reasons and traces name nodes ('' for None)."""
    return f"{node.get_type_name()} '{node.get_friendly_name()}'" if node is not None else ""


def strip(value: ov.Output) -> ov.Output:
    """The value before any chain of layout-only ops (LAYOUT)."""
    while value.get_node().get_type_name() in LAYOUT:
        value = value.get_node().input_value(0)
    return value


def constant_data(value: ov.Output) -> np.ndarray | None:
    """The numbers of a Constant behind layout-only ops, or None."""
    node = strip(value).get_node()
    return np.asarray(node.get_data()) if node.get_type_name() == "Constant" else None


def constant_behind(value: ov.Output, depth: int = 8) -> ov.Node | None:
    """The stored Constant a decompression chain starts from (following each op's first input through
    DECOMPRESSION and Transpose), or None."""
    for _ in range(depth):
        node = value.get_node()
        kind = node.get_type_name()
        if kind == "Constant":
            return node
        if kind not in (*DECOMPRESSION, "Transpose"):
            return None
        value = node.input_value(0)
    return None


def walk_back(
    start: list[ov.Node], known: set[int], hidden: ValueKey, limit: int = MAX_BLOCK_NODES
) -> tuple[set[int], list]:
    """Nodes reached backwards from `start` without crossing the `hidden` value, Constants, `known` nodes
    or ShapeOf inputs; returns their ids and the ShapeOf nodes met. Raises ValueError on a Parameter or
    ReadValue (the block reads more than its hidden input) or past `limit` nodes (it is not bounded)."""
    reached, shape_ofs, stack = set(), [], list(start)
    while stack:
        node = stack.pop()
        key = node.get_instance_id()
        if key in reached or key in known:
            continue
        kind = node.get_type_name()
        if kind in ("Parameter", "ReadValue"):
            raise ValueError(f"the block reads {kind} '{node.get_friendly_name()}' besides its hidden input")
        reached.add(key)
        if len(reached) > limit:
            raise ValueError("the block reaches too far back: it is not bounded by its hidden input")
        if kind == "ShapeOf":
            shape_ofs.append(node)
            continue
        stack.extend(
            v.get_node()
            for v in node.input_values()
            if value_key(v) != hidden and v.get_node().get_type_name() != "Constant"
        )
    return reached, shape_ofs
