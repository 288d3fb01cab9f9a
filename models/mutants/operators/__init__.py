"""The mutation operators, each `(site, rng) -> Change | None` (None: nothing to change in this block).
Round-robin order is this dict's order: keep it, so (seed, index) keeps naming the same operator."""

from __future__ import annotations

from models.mutants.edits import Operator
from models.mutants.operators.experts import drop_expert, duplicate_expert, swap_gate_up, weights
from models.mutants.operators.graph import (
    activation,
    concat_order,
    convert_type,
    insert_op,
    shape_const,
    split,
    transpose_perm,
)
from models.mutants.operators.routing import clamp, renorm, scatter_reduction, softmax_axis, topk

OPERATORS: dict[str, Operator] = {
    "activation": activation,
    "drop_expert": drop_expert,
    "duplicate_expert": duplicate_expert,
    "weights": weights,
    "shape_const": shape_const,
    "split": split,
    "renorm": renorm,
    "insert_op": insert_op,
    "topk": topk,
    "scatter_reduction": scatter_reduction,
    "softmax_axis": softmax_axis,
    "concat_order": concat_order,
    "swap_gate_up": swap_gate_up,
    "clamp": clamp,
    "convert_type": convert_type,
    "transpose_perm": transpose_perm,
}
