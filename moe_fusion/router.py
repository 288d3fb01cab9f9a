"""Naming the router that feeds a block, for the report. The router itself stays as ordinary ops."""

from __future__ import annotations

import openvino as ov

from moe_fusion.pattern import strip


def _kind(value: ov.Output) -> str:
    return strip(value).get_node().get_type_name()


def describe(routing_weights: ov.Output, topk_indices: ov.Output) -> str:
    selector = strip(topk_indices).get_node()
    if selector.get_type_name() != "TopK":
        return "sparsemixer" if selector.get_type_name() == "Concat" else f"{selector.get_type_name()} selection"
    scores = _kind(selector.input_value(0))
    weights = strip(routing_weights).get_node()
    kind = weights.get_type_name()
    if scores == "Softmax" and kind == "TopK":
        return "softmax -> top-k"
    if scores == "Softmax" and kind == "Divide":
        return "softmax -> top-k -> renormalise"
    if kind == "Softmax":
        return "top-k on logits -> softmax over k"
    if scores in ("Add", "Sigmoid") or kind == "Multiply":
        return "sigmoid + bias -> group top-k -> scaled"
    return f"{scores} -> top-k"
