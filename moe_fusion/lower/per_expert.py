"""The `per-expert` form: tokens sorted by expert, one `VariadicSplit` hands every expert its run of rows, and
each expert's GEMMs are plain `MatMul(transpose_b=True)` on that expert's own `[out, in]` weights (the CPU
plugin's FullyConnected; compressed ones for int8/int4; f16 kept f16 behind a marked Convert): one GEMM per
expert over its rows, the peers' prefill algorithm. Its price: 2-3 FullyConnected nodes per expert, whose
dynamic shapes are re-inferred at every decode step (idle experts' nodes do not run: empty input).
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import openvino.opset15 as ops15

from moe_fusion.lower.experts import Experts, bias, combine, gemm2_activation, i64, sorted_slots, swish
from moe_fusion.lower.slicing import expert_values
from moe_fusion.reference import GEMM3_SWIGLU


def per_expert(experts: Experts) -> ov.Output:
    e = experts.num_experts
    sorted_expert, order, rows, top_k = sorted_slots(experts)
    ends = ops.convert(ops15.search_sorted(sorted_expert, ops.constant(np.arange(e, dtype=np.int32)),
                                           right_mode=True), ov.Type.i64)
    counts = ops.subtract(ends, ops.concat([i64([0]),
                                            ops.slice(ends, i64([0]), i64([e - 1]), i64([1]))], 0))
    # One VariadicSplit hands every expert its run of rows ([0, H] when it has none): the plugin skips the
    # nodes of an expert whose input is empty, and one node instead of 3E Gathers/Slices keeps decode cheap.
    mine_all = ops.variadic_split(rows, i64(0), counts).outputs()
    matrices = [expert_values(m, e) for m in experts.matrices]
    biases = [expert_values(bias(experts, b, [e, -1]), e) for b in experts.biases if b is not None]

    pieces = []
    for i in range(e):

        def gemm(a, w, what: str, i: int = i) -> ov.Node:  # named per expert: profiles and tests find them
            matmul = ops.matmul(a, w, False, True)
            matmul.set_friendly_name(f"{experts.name}/expert{i}/{what}")
            return matmul

        mine = mine_all[i]  # this expert's rows; [0, H] if none
        if experts.expert_type == GEMM3_SWIGLU:
            w_gate, w_up, w_down = (m[i] for m in matrices)
            act = ops.multiply(swish(experts, gemm(mine, w_gate, "gate").output(0)), gemm(mine, w_up, "up"))
            y = gemm(act, w_down, "down")
        else:
            (w_gate_up, w_down), (b_gate_up, b_down) = (m[i] for m in matrices), (b[i] for b in biases)
            gate_up = ops.add(gemm(mine, w_gate_up, "gate_up"), b_gate_up)
            act = gemm2_activation(experts, gate_up.output(0), 1)
            y = ops.add(gemm(act, w_down, "down"), b_down)
        pieces.append(y.output(0))
    y = ops.concat(pieces, 0)  # [T*K, H] in sorted slot order
    return combine(experts, y.output(0), order, top_k)
