"""MoEBlock -> FusedExperts: stack the experts' weights `[E, in, out]` in expert-id order and wire the op."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion import compressed, scratch
from moe_fusion.block import MoEBlock, Weight
from moe_fusion.compressed import Compressed
from moe_fusion.op import FusedExperts


def stacked(weight: Weight, order: list[int], rank: int = 2) -> ov.Output:
    """One constant holding every expert's part in `order`, behind the original's decompression Convert
    (integer-compressed weights: see `moe_fusion.compressed`).

    `rank` is a part's rank per expert (2: `[in, out]` matrix, 1: `[out]` bias); a single part one rank
    higher is already stacked `[E, ...]` (tiled families) and kept as it is."""
    parts = weight.parts
    already = len(parts) == 1 and parts[0].ndim == rank + 1
    if any(isinstance(p, Compressed) for p in parts):
        if not all(isinstance(p, Compressed) for p in parts):
            raise ValueError("experts' weights differ in precision: some compressed, some not")
        return compressed.to_fused(parts if already else [parts[i] for i in order])
    if len({p.dtype for p in parts}) != 1:
        raise ValueError(f"experts' weights differ in storage type: {sorted({str(p.dtype) for p in parts})}")
    # Written once into (file-backed, when large) memory the constant then shares: C-contiguous, as
    # Constant() needs (a strided f16 view would silently become i16).
    if already:
        array = scratch.empty(parts[0].shape, parts[0].dtype)
        for slot, part in enumerate(parts[0]):
            _copy(array[slot], part)
    else:
        array = scratch.empty((len(order), *parts[0].shape), parts[0].dtype)
        for slot, i in enumerate(order):
            _copy(array[slot], parts[i])
    node = scratch.constant(array) if weight.storage is None else \
        scratch.packed_constant(array, weight.storage, list(array.shape))
    if weight.convert_to is None:
        return node
    return compressed.mark_decompression(ops.convert(node, weight.convert_to)).output(0)


def _copy(target: np.ndarray, source: np.ndarray, rows: int = 64) -> None:
    """target[...] = source, in bands of `rows` when source is a transposed view (an exporter's `[out, in]`
    read as `[in, out]`): a band's reads stay in cache, 4x faster than numpy's one strided pass."""
    if source.ndim != 2 or source.flags.c_contiguous:
        target[...] = source
        return
    for start in range(0, source.shape[1], rows):
        target[:, start : start + rows] = source[:, start : start + rows]


def build(block: MoEBlock) -> tuple[FusedExperts, ov.Output]:
    """The FusedExperts for `block` and the value that replaces `block.output` (not yet connected)."""
    order = list(np.argsort(block.expert_ids, kind="stable"))
    # Biases (b_gate_up, b_down) are [out] per expert, matrices [in, out].
    weights = [stacked(w, order, 1 if name.startswith("b_") else 2) for name, w in block.weights.items()]
    hidden, routing = block.hidden, block.routing_weights
    if block.weights_on_input:
        # expert(w * x) with top-1 is FusedExperts on the scaled input with unit routing weights.
        hidden = ops.multiply(ops.reshape(hidden, [-1, block.hidden_size], False), routing).output(0)
        one = ops.constant(np.ones((), routing.get_element_type().to_dtype()))
        routing = ops.broadcast(one, ops.shape_of(routing)).output(0)
    fused = FusedExperts(hidden, routing, block.topk_indices, *weights, **block.attributes)
    fused.set_friendly_name(block.name + "/FusedExperts")
    replacement = fused.output(0)
    if block.output.get_partial_shape().rank != hidden.get_partial_shape().rank:
        # The sum was [T, H] while the experts read [..., H]: flatten the same way.
        replacement = ops.reshape(replacement, [-1, block.hidden_size], False).output(0)
    return fused, replacement


def apply(block: MoEBlock, replacement: ov.Output) -> None:
    """Route every consumer of the block's output to the replacement; the old plumbing becomes dead."""
    names = block.output.get_names()
    block.output.replace(replacement)
    if names:
        replacement.get_tensor().set_names(names)
