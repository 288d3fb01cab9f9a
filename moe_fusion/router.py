"""Routers, for the report: what kind feeds a block, and router-like TopKs that no family claimed.
The router itself always stays as ordinary ops."""

from __future__ import annotations

from collections.abc import Iterable

import openvino as ov

from moe_fusion.compressed import is_weight
from moe_fusion.pattern import strip, unsliced


def describe(routing_weights: ov.Output, topk_indices: ov.Output, weights_on_input: bool = False) -> str:
    selector = strip(topk_indices).get_node()
    if selector.get_type_name() != "TopK":
        return "sparsemixer" if selector.get_type_name() == "Concat" else f"{selector.get_type_name()} selection"
    scores = strip(selector.input_value(0)).get_node().get_type_name()
    kind = unsliced(strip(routing_weights), strip(topk_indices)).get_node().get_type_name()
    if weights_on_input:
        return "top-k on logits -> sigmoid, scales the expert input"
    if scores == "Softmax" and kind == "TopK":
        return "softmax -> top-k"
    if scores == "Softmax" and kind == "Divide":
        return "softmax -> top-k -> renormalise"
    if kind == "Softmax":
        return "top-k on logits -> softmax over k"
    biased = strip(selector.input_value(0)).get_node()
    if scores == "Add" and any(strip(v).get_node().get_type_name() == "Softmax" for v in biased.input_values()):
        return "softmax + bias -> top-k" + (" -> renormalise" if kind == "Divide" else "")  # ERNIE-4.5-MoE
    if scores in ("Add", "Sigmoid") or kind == "Multiply":
        return "sigmoid + bias -> group top-k -> scaled"
    return f"{scores} -> top-k"


def _reads_linear(topk: ov.Node) -> bool:
    """Scores computed from a Linear (MatMul with a constant weight) within a few elementwise ops, through a
    masked_fill (Select; DeepSeek/GLM mask the scores of groups not chosen)."""
    value = topk.input_value(0)
    for _ in range(8):
        node = strip(value).get_node()
        kind = node.get_type_name()
        if kind == "MatMul":  # a constant weight, compressed ones included
            return any(is_weight(v) for v in node.input_values())
        if kind == "Select":  # the scores are the one branch that is not a constant fill value
            branches = [v for v in node.input_values()[1:] if strip(v).get_node().get_type_name() != "Constant"]
            if len(branches) != 1:
                return False
            value = branches[0]
            continue
        if kind not in ("Softmax", "Sigmoid", "Add", "Multiply", "Divide"):
            return False
        value = node.input_value(0)
    return False


def _feeds_topk(topk: ov.Node, others: set[int], depth: int = 12) -> bool:
    """Whether `topk`'s outputs reach one of the TopKs `others` within `depth` ops: a group-limited router's
    within-group TopK, which only masks the scores the final (expert) TopK selects from."""
    frontier, seen = [topk], set()
    for _ in range(depth):
        frontier = [t.get_node() for n in frontier for out in n.outputs() for t in out.get_target_inputs()]
        frontier = [n for n in frontier if n.get_instance_id() not in seen]
        seen.update(n.get_instance_id() for n in frontier)
        if seen & others:
            return True
    return False


def _upstream(value: ov.Output, stop: ov.Output, limit: int = 10_000) -> set[int]:
    """Ids of the nodes between `stop` (excluded) and `value`: a block's router ops."""
    seen, stack = set(), [value.get_node()]
    stop_id = stop.get_node().get_instance_id()
    while stack and len(seen) < limit:
        node = stack.pop()
        if node.get_instance_id() in seen or node.get_instance_id() == stop_id:
            continue
        seen.add(node.get_instance_id())
        stack.extend(v.get_node() for v in node.input_values())
    return seen


def unclaimed(model: ov.Model, blocks: Iterable, known: set[int]) -> list[ov.Node]:
    """TopKs that select among a Linear's outputs along the last axis, as MoE routers do, that are neither
    in `known` (routers already reported) nor among the router ops of `blocks`."""
    seen = set(known)
    for block in blocks:
        for value in (block.routing_weights, block.topk_indices):
            seen |= _upstream(value, block.hidden)
    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "TopK" or node.get_instance_id() in seen:
            continue
        rank = node.get_input_partial_shape(0).rank
        axis = node.get_attributes()["axis"]
        if rank.is_static and axis in (-1, rank.get_length() - 1) and _reads_linear(node):
            found.append(node)
    ids = {n.get_instance_id() for n in found}
    return [n for n in found if not _feeds_topk(n, ids - {n.get_instance_id()})]
