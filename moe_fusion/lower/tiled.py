"""The `tiled` form: the tiled MoE block the CPU plugin's `ConvertTiledMoeBlockTo{3,2}GatherMatmuls` matches
(x86-64) and turns into `GatherMatmul` (`GatherMatmulCompressed` for int8/int4 weights), which computes only
the top-k experts of each token. Elsewhere (other devices, a pattern that stops matching) the same graph still
runs correctly, densely: every expert on every token.

Without AMX GatherMatmul runs one GEMV per routed row (`gathermatmul.cpp`): decode at the weight-bandwidth
floor's order, prefill several times slower than one GEMM per expert.
"""

from __future__ import annotations

import openvino as ov
import openvino.opset14 as ops

from moe_fusion.lower.experts import Experts, bias, gemm2_activation, i64, swish
from moe_fusion.reference import GEMM3_SWIGLU


def tiled_reason(experts: Experts) -> str:
    """Why the CPU plugin's pattern would not turn this block's tiled form into GatherMatmul, or ''.

    Then the tiled form runs densely (every expert on every token) and `cpu` lowers the block to `grouped`."""
    if experts.expert_type == GEMM3_SWIGLU:
        return "" if experts.beta == 1.0 else f"swish beta {experts.beta} (the pattern takes a one-input Swish)"
    for value in experts.biases:
        node = value.get_node()
        if node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        if node.get_type_name() != "Constant":
            return "a bias that is not a constant"
        if not node.get_data().any():  # the plugin removes an Add of zeros, and the pattern needs the Add
            return "all-zero biases"
    producer = experts.hidden.get_node().get_type_name()
    rank = experts.hidden.get_partial_shape().rank
    if rank.is_static and rank.get_length() == 2 and producer != "Reshape":
        return "hidden_states already [T, H] (the plugin removes the Reshape the 2-GEMM pattern needs)"
    return ""


def tiled(experts: Experts) -> ov.Output:
    e, h = experts.num_experts, experts.hidden_size
    x = experts.flat_hidden()  # [T, H]
    tokens = ops.gather(ops.shape_of(x), i64([0]), i64(0))
    # The 2-GEMM pattern wants a Reshape feeding the Tile; flat_hidden is one.
    tiled = ops.reshape(ops.tile(x, i64([e, 1])), i64([e, -1, h]), False)  # [E, T, H]

    def gemm(a, w):
        return ops.matmul(a, w, False, True)

    if experts.expert_type == GEMM3_SWIGLU:
        w_gate, w_up, w_down = experts.matrices
        act = ops.multiply(swish(experts, gemm(tiled, w_gate).output(0)), gemm(tiled, w_up))
        y = gemm(act, w_down)
    else:
        w_gate_up, w_down = experts.matrices
        b_gate_up, b_down = experts.biases
        gate_up = ops.add(gemm(tiled, w_gate_up), bias(experts, b_gate_up, [e, 1, -1]))
        act = gemm2_activation(experts, gate_up.output(0), 2)
        y = ops.add(gemm(act, w_down), bias(experts, b_down, [e, 1, h]))
    # The pattern's end Reshape, [E, T, 1, H] as optimum-intel exports it (a no-op [E, T, H] one would be
    # removed before the plugin's pass runs); the pass reshapes the sum to this shape minus E.
    y = ops.reshape(y, i64([e, -1, 1, h]), False)
    # Dense routing [T, E] (zero outside the top-k; a repeated expert adds up), as [E, T, 1, 1].
    zeros = ops.broadcast(experts.scalar(0.0), ops.concat([tokens, i64([e])], 0))
    dense = ops.scatter_elements_update(zeros, experts.indices, experts.routing, 1, "sum")
    routing = ops.unsqueeze(ops.reshape(ops.transpose(dense, i64([1, 0])), i64([e, -1, 1]), False), i64(-1))
    out = ops.reduce_sum(ops.multiply(y, routing), i64([0]), False)  # [T, 1, H]
    return experts.restore_shape(out.output(0))
