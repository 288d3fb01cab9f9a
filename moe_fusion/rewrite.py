"""MoEBlock -> FusedExperts: stack the experts' weights `[E, in, out]` in expert-id order and wire the op."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion.block import MoEBlock, Weight
from moe_fusion.op import FusedExperts


def stacked(weight: Weight, order: list[int]) -> ov.Output:
    """One constant holding every expert's part in `order`, behind the original's decompression Convert."""
    parts = weight.parts
    array = parts[0] if len(parts) == 1 and parts[0].ndim == 3 else np.stack([parts[i] for i in order])
    # Constant() needs C-contiguous data: a strided f16 view would silently become i16.
    node = ops.constant(np.ascontiguousarray(array))
    return node.output(0) if weight.convert_to is None else ops.convert(node, weight.convert_to).output(0)


def build(block: MoEBlock) -> tuple[FusedExperts, ov.Output]:
    """The FusedExperts for `block` and the value that replaces `block.output` (not yet connected)."""
    order = list(np.argsort(block.expert_ids, kind="stable"))
    weights = [stacked(w, order) for w in block.weights.values()]
    fused = FusedExperts(block.hidden, block.routing_weights, block.topk_indices, *weights, **block.attributes)
    fused.set_friendly_name(block.name + "/FusedExperts")
    replacement = fused.output(0)
    if block.output.get_partial_shape().rank != block.hidden.get_partial_shape().rank:
        # The sum was [T, H] while the experts read [..., H]: flatten the same way.
        replacement = ops.reshape(replacement, [-1, block.hidden_size], False).output(0)
    return fused, replacement


def apply(block: MoEBlock, replacement: ov.Output) -> None:
    """Route every consumer of the block's output to the replacement; the old plumbing becomes dead."""
    names = block.output.get_names()
    block.output.replace(replacement)
    if names:
        replacement.get_tensor().set_names(names)
