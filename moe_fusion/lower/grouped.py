"""The `grouped` form: tokens sorted by expert, then opset17 `GroupedMatMul` with cumulative end offsets per
expert (the CPU plugin turns it into SearchSorted + GatherMatmul). `cpu` uses it where the tiled pattern
would not form (`tiled_reason`).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import openvino.opset15 as ops15
import openvino.opset17 as ops17

from moe_fusion.lower.experts import Experts, bias, combine, gemm2_activation, i64, sorted_slots, swish
from moe_fusion.reference import GEMM3_SWIGLU


def grouped(experts: Experts) -> ov.Output:
    e, h = experts.num_experts, experts.hidden_size
    sorted_expert, order, rows, top_k = sorted_slots(experts)
    ends = ops15.search_sorted(sorted_expert, ops.constant(np.arange(e, dtype=np.int32)), right_mode=True)

    def gemm(a, w):
        return ops17.grouped_matmul(a, w, ends)

    if experts.expert_type == GEMM3_SWIGLU:
        w_gate, w_up, w_down = experts.matrices
        act = ops.multiply(swish(experts, gemm(rows, w_gate).output(0)), gemm(rows, w_up))
        y = gemm(act, w_down)
    else:
        w_gate_up, w_down = experts.matrices
        b_gate_up, b_down = experts.biases
        bias_up = ops.gather(bias(experts, b_gate_up, [e, -1]), sorted_expert, i64(0))
        act = gemm2_activation(experts, ops.add(gemm(rows, w_gate_up), bias_up).output(0), 1)
        y = ops.add(gemm(act, w_down), ops.gather(bias(experts, b_down, [e, h]), sorted_expert, i64(0)))
    return combine(experts, y.output(0), order, top_k)
