"""F6: Llama-4's MoE, where the routing weight scales the experts' *input* (transformers Llama4TextMoe):

    top_value, top_index = router_logits.topk(1)
    scores = full_like(router_logits, -inf).scatter(1, top_index, top_value).sigmoid()    # [T, E]
    routed_in = hidden_states.repeat(E, 1) * scores.T.reshape(-1, 1)
    gate, up = (routed_in.view(E, -1, H) @ gate_up_proj).chunk(2, dim=-1)               # [E, H, 2I]
    out = ((up * act(gate)) @ down_proj).view(E, -1, H).sum(0)                        # + shared expert

FusedExperts scales the experts' *output*. Because a bias-free SwiGLU expert maps 0 to 0, unselected
experts (score sigmoid(-inf) = 0) contribute nothing, and with top-1 each token has one expert:
`out[t] = expert_i(s_t * x_t)`. So the block fuses exactly as FusedExperts(x * s, routing weights 1): the
block sets `weights_on_input`. With top-k > 1 no FusedExperts computes it, and the block is declined.
"""

from __future__ import annotations

import functools

import numpy as np
import openvino.opset14 as ops

from moe_fusion.block import Decline, MoEBlock, Weight, blocks_or_declines
from moe_fusion.compressed import Compressed
from moe_fusion.pattern import (
    any_input,
    const,
    matches,
    op,
    read_linear,
    reshaped,
    same,
    strip,
    swish,
    swish_beta,
    unsliced,
    weight,
)
from moe_fusion.trace import Walk, indices_port, is_swish

FAMILY = "llama4"


@functools.cache  # built once: patterns are reusable, and every WrapType costs memory
def llama4_block():
    scattered = op(
        "ScatterElementsUpdate",
        reshaped(any_input("fill")),
        reshaped(any_input("topk_indices")),
        any_input("topk_values"),
        const("scatter_axis"),
        name="scatter",
    )
    scores = reshaped(op("Transpose", op("Sigmoid", scattered), const("perm")))
    routed_in = op("Multiply", op("Tile", reshaped(any_input("hidden")), const("repeats")), scores)
    gate_up = op("MatMul", reshaped(routed_in), weight("gate_up"), name="gate_up_matmul")
    chunks = op("VariadicSplit", gate_up, const("chunk_axis"), any_input(), name="chunks")
    experts = op("MatMul", op("Multiply", chunks, swish(chunks), name="act"), weight("down"), name="down_matmul")
    return op("ReduceSum", reshaped(experts), const("sum_axis"), name="sum")


def find(model):
    return blocks_or_declines(matches(model, llama4_block(), "ReduceSum"), _block)


def _numbers(value) -> np.ndarray | None:
    node = strip(value).get_node()
    return np.asarray(node.get_data()).reshape(-1) if node.get_type_name() == "Constant" else None


def _block(values: dict) -> MoEBlock:
    indices = strip(values["topk_indices"])
    router = indices.get_node()
    if router.get_type_name() != "TopK" or indices.get_index() != 1:
        raise Decline("scores are not scattered at a router's top-k indices", values["scatter"].get_node())
    top_value = unsliced(values["topk_values"], indices)
    if not same(top_value, router.output(0)):
        raise Decline("scattered scores are not the router's top-k values", values["scatter"].get_node(), router)
    fill = _numbers(values["fill"])
    if fill is None or not np.all(np.isneginf(fill)):
        raise Decline("unselected experts' scores are not sigmoid(-inf) = 0", values["scatter"].get_node(), router)
    scores, k_dim = router.get_input_partial_shape(0), router.get_output_partial_shape(1)
    if scores.rank.is_dynamic or scores[-1].is_dynamic or k_dim.rank.is_dynamic or k_dim[-1].is_dynamic:
        raise Decline("the router's top-k or expert count is not static", router, router)
    num_experts = scores[-1].get_length()
    checks = {
        "scatter_axis": ([1], [-1]),
        "perm": ([1, 0],),
        "repeats": ([num_experts, 1],),
        "chunk_axis": ([-1], [2]),
        "sum_axis": ([0],),
    }
    for key, allowed in checks.items():
        if list(_numbers(values[key])) not in [list(a) for a in allowed]:
            raise Decline(f"{key} is {list(_numbers(values[key]))}, expected {allowed[0]}", router, router)
    chunks, act = values["chunks"].get_node(), values["act"].get_node()
    swish_input = values["swish"].get_node().input_value(0)
    up = [v for v in act.input_values() if v.get_node().get_type_name() == "VariadicSplit"]
    if swish_input.get_index() != 0 or len(up) != 1 or up[0].get_index() != 1:
        raise Decline("the activation is not act(first chunk) * second chunk", chunks, router)
    if router.get_output_partial_shape(1)[-1].get_length() != 1:
        raise Decline(
            "the routing weight scales the experts' input; FusedExperts scales their output, which is "
            "the same only for top-1",
            router,
            router,
        )

    w_gate_up, gate_up_type = read_linear(values, "gate_up")  # [E, H, 2I], gate lanes first (chunk)
    w_down, down_type = read_linear(values, "down")
    if isinstance(w_gate_up, Compressed):  # splitting gate from up would need Slices of the decompressed weight
        raise Decline("integer-compressed fused gate_up weights are not split yet", router, router)
    if w_gate_up.ndim != 3 or w_down.ndim != 3 or len({w_gate_up.shape[0], w_down.shape[0], num_experts}) != 1:
        raise Decline("expert weights are not stacked [E, ...] for the router's E experts", router, router)
    if gate_up_type != down_type:
        raise Decline("gate_up and down weights differ in precision", router, router)
    half = w_gate_up.shape[-1] // 2
    beta = swish_beta(values)
    return MoEBlock(
        family=FAMILY,
        router=router,
        hidden=strip(values["hidden"]),
        # sigmoid(top value) is what scales the input: computed afresh from the router's TopK.
        routing_weights=ops.sigmoid(router.output(0)).output(0),
        topk_indices=router.output(1),
        output=values["sum"],
        num_experts=num_experts,
        expert_ids=list(range(num_experts)),
        weights={
            "w_gate": Weight([w_gate_up[..., :half]], gate_up_type),
            "w_up": Weight([w_gate_up[..., half:]], gate_up_type),
            "w_down": Weight([w_down], down_type),
        },
        expert_beta=beta,
        weights_on_input=True,
    )


def explain(model, router) -> object:
    """How far this pattern gets from `router` (for `moe-fusion inspect --explain`): top-k scores scattered
    at the indices, sigmoid, transposed, scaling the tiled hidden states, gate_up, chunk, Swish, times up,
    down, summed over experts."""

    walk = Walk(FAMILY, router)
    walk.down("ScatterElementsUpdate", "top-k scores scattered at the indices", port=indices_port(router))
    walk.down("Sigmoid", "sigmoid of the scattered scores").down("Transpose", "scores transposed to [E, T]")
    walk.down("Multiply", "tiled hidden states times their expert's score")
    scaled = walk.at
    walk.up("Tile", "hidden states tiled once per expert").goto(scaled)
    walk.down("MatMul", "gate_up projection on stacked weights").down("VariadicSplit", "gate_up chunked in two")
    walk.down(("Swish", "Multiply"), "Swish (SiLU) of the gate chunk", when=is_swish)
    walk.down("Multiply", "up chunk times activation").down("MatMul", "down projection on stacked weights")
    walk.down("ReduceSum", "sum over experts")
    return walk.trace
