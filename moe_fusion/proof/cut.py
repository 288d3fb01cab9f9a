"""Cutting a block out of its model for the proof: the nodes between the experts' input (`block.hidden`) and
`block.output`, as a standalone model beside its replacement, with the same inputs.

Values from outside the block that it reads only through ShapeOf (exporters build shapes from
neighbouring tensors) become extra inputs fed with arrays of the hidden input's shape; any other outside
dependency refuses the cut. Forced routing: the routing weights and expert indices pass through a Select
per element, so chosen rows run every expert in every top-k slot.
"""

from __future__ import annotations

from dataclasses import dataclass

import openvino as ov
import openvino.opset14 as ops

from moe_fusion.block import MoEBlock
from moe_fusion.graph import value_key, walk_back

# How far back a value read through ShapeOf may be traced into the block before it counts as outside.
SHAPE_SOURCE_NODES = 10_000


def block_nodes(block: MoEBlock) -> tuple[set[int], list[ov.Output]]:
    """Ids of the nodes between block.hidden and block.output, and outside values read only via ShapeOf
    (exporters take shapes from neighbouring tensors, even ones upstream of the block)."""
    hidden = value_key(block.hidden)
    inside, pending = walk_back([block.output.get_node()], set(), hidden)
    shape_only = {}
    while pending:
        value = pending.pop().input_value(0)
        if value_key(value) == hidden or value.get_node().get_instance_id() in inside:
            continue
        try:  # computed from the block itself (or constants)? then it belongs to the block
            more, shape_ofs = walk_back([value.get_node()], inside, hidden, SHAPE_SOURCE_NODES)
        except ValueError:
            shape_only[value_key(value)] = value
            continue
        inside |= more
        pending.extend(shape_ofs)
    return inside, list(shape_only.values())


def _new_nodes(replacement: ov.Output, inside: set[int], hidden: tuple[int, int]) -> set[int]:
    """The rewrite's nodes (FusedExperts and any it reads besides the block's own values)."""
    new, stack = set(), [replacement.get_node()]
    while stack:
        node = stack.pop()
        if node.get_instance_id() in inside or node.get_instance_id() in new:
            continue
        new.add(node.get_instance_id())
        stack.extend(v.get_node() for v in node.input_values() if value_key(v) != hidden)
    return new


def _reads_router_elsewhere(block: MoEBlock, inside: set[int]) -> bool:
    """Whether the block's output depends on its router other than through the routing weights and indices
    (Llama-4 builds its dense routing from the TopK itself): then forcing those two values forces nothing."""
    stop = {value_key(block.routing_weights), value_key(block.topk_indices), value_key(block.hidden)}
    router, seen, stack = block.router.get_instance_id(), set(), [block.output.get_node()]
    while stack:
        node = stack.pop()
        key = node.get_instance_id()
        if key == router:
            return True
        if key in seen or key not in inside:
            continue
        seen.add(key)
        stack.extend(v.get_node() for v in node.input_values() if value_key(v) not in stop)
    return False


@dataclass
class BlockCut:
    """The block and its replacement as standalone models with the same inputs: hidden rows, then (when
    `forced`) routing weights, expert indices and two masks of their shapes choosing them over the router's
    own per element, then the values the block reads only through ShapeOf. `original` also outputs the
    router's own top-k indices."""

    original: ov.Model
    replacement: ov.Model | None
    forced: bool


def cut(block: MoEBlock, replacement: ov.Output | None, forced: bool = True) -> BlockCut:
    """Cut the block (and `replacement`, built on the block's own values; None: the block only) out of the
    graph. Forced routing is left out when the block reads its router elsewhere (`BlockCut.forced` False). Every
    cut of one block has the same inputs, in the same order."""
    inside, shape_only = block_nodes(block)
    forced = forced and not _reads_router_elsewhere(block, inside)
    if replacement is not None:
        inside |= _new_nodes(replacement, inside, value_key(block.hidden))
    hidden = ops.parameter(block.hidden.get_partial_shape(), block.hidden.get_element_type())
    params, swaps = [hidden], [(block.hidden, hidden.output(0))]
    if forced:
        for value in (block.routing_weights, block.topk_indices):
            given = ops.parameter(value.get_partial_shape(), value.get_element_type())
            mask = ops.parameter(value.get_partial_shape(), ov.Type.boolean)
            params += [given, mask]
            swaps.append((value, ops.select(mask, given, value).output(0)))
    for value in shape_only:
        params.append(ops.parameter(value.get_partial_shape(), value.get_element_type()))
        swaps.append((value, params[-1].output(0)))
    rewired = []
    for value, new in swaps:  # targets first, then rewire: a Select reads the value it replaces
        rewired += [(t, value, new) for t in value.get_target_inputs() if t.get_node().get_instance_id() in inside]
    for target, _value, new in rewired:
        target.replace_source_output(new)
    try:
        original = ov.Model([block.output, block.topk_indices], params, "block").clone()
        rewritten = ov.Model([replacement], params, "fused_block").clone() if replacement is not None else None
    finally:
        for target, value, _new in rewired:
            target.replace_source_output(value)
    return BlockCut(original, rewritten, forced)

