"""The `hybrid` form: one `If` on the token count, the per-expert form for more than one token (prefill: one
GEMM per expert over its rows, the peers' algorithm) and the `cpu` form for one token (decode: GatherMatmul
reads only the top-k experts, one node per GEMM).

Why an `If` and not one graph: without AMX no single graph found prefills like per-expert and decodes like
GatherMatmul (docs/lowering.md). The CPU plugin compiles both bodies and runs only the taken one; the
condition is one scalar comparison.

Memory: each body holds its own weight constants, so the IR file holds the layer twice. One shared copy (the
parent's constants fed to both bodies) does reach the kernels, but every variant measured kept ~1 layer more
anonymous memory at run time (1.50x native's, against 1.01x: docs/lowering.md, "What did not work"). At run time each
body's kernel packs one copy; the decode body stores plain float weights in the CPU's inference precision
(`store`), so GatherMatmul packs straight from them instead of also keeping a decompressed copy: the two
bodies together then hold about what native GatherMatmul alone holds (docs/lowering.md, "Memory").
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset8 as ops8
import openvino.opset14 as ops

from moe_fusion.lower.experts import Experts


def body_node(node: ov.Node) -> tuple[ov.Node, list[ov.Node]]:
    """A copy of the FusedExperts `node` reading three new Parameters (hidden, routing, indices) and the same
    weight values: what one body of the If lowers. The copy is never placed in a graph."""
    params = [ops.parameter(node.input_value(i).get_partial_shape(), node.input_value(i).get_element_type())
              for i in range(3)]
    weights = [node.input_value(i) for i in range(3, node.get_input_size())]
    return node.clone_with_new_inputs([p.output(0) for p in params] + weights), params


def hybrid(node: ov.Node, prefill, decode, copy_weights: bool = True, store: ov.Type | None = None) -> ov.Output:
    """`If(T > 1)`: `prefill(Experts)` in the then-body, `decode(Experts)` in the else-body, both built from
    the FusedExperts `node`'s inputs; returns the If's output (named after the node). `store`: the type the
    decode body keeps plain float weights in (`Experts`; the inference precision of the CPU it is for)."""
    bodies = []
    for form, copy, as_type in ((prefill, False, None), (decode, copy_weights, store)):
        clone, params = body_node(node)
        out = form(Experts(clone, copy, as_type))
        bodies.append((ov.Model([ops.result(out)], params), params))
    (then_body, then_params), (else_body, else_params) = bodies
    top_k = node.get_input_partial_shape(2)[-1].get_length()
    slots = ops.reduce_prod(ops.shape_of(node.input_value(2)), ops.constant(np.int64(0)), False)  # T*K
    branch = ops8.if_op(ops.greater(slots, ops.constant(np.int64(top_k))).output(0))
    branch.set_then_body(then_body)
    branch.set_else_body(else_body)
    for i, (then_param, else_param) in enumerate(zip(then_params, else_params, strict=True)):
        branch.set_input(node.input_value(i), then_param, else_param)
    out = branch.set_output(then_body.get_results()[0], else_body.get_results()[0])
    branch.set_friendly_name(node.get_friendly_name())
    return out
