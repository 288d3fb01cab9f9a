"""F2: the tiled (vectorised) block: every expert runs on every token against stacked weights, and a
dense routing matrix zeroes the unselected ones. optimum-intel 1.x emits it for Qwen3-MoE with
norm_topk_prob=True (via OpenVINO's conversion-time fusion), optimum-intel 2.x with transformers 5 for
most MoE models:

    x = hidden_states.reshape(-1, H).repeat(E, 1).view(E, -1, H)
    y = down_proj(act(gate_proj(x)) * up_proj(x))                    # batched over E, [E, T, H]
    dense = zeros(T, E).scatter(1, selected_experts, routing_weights)  # [T, E]
    out = (y.view(E, T, ..., H) * dense.T.view(E, T, ..., 1)).sum(0)
"""

from __future__ import annotations

import functools

import numpy as np
import openvino as ov

from moe_fusion.block import Decline, MoEBlock, Weight, blocks_or_declines
from moe_fusion.pattern import any_input, const, matches, op, read_linear, reshaped, strip, swiglu_mlp, swish_beta
from moe_fusion.trace import Walk, indices_port, is_swish

FAMILY = "tiled"


@functools.cache  # built once: patterns are reusable, and every WrapType costs memory
def tiled_block():
    tiled = reshaped(op("Tile", reshaped(any_input("hidden")), any_input("repeats"), name="tile"))
    experts_out = reshaped(swiglu_mlp(tiled))
    dense = op(
        "ScatterElementsUpdate",
        any_input(),
        reshaped(any_input("topk_indices")),
        reshaped(any_input("routing_weights")),
        const("scatter_axis"),
        name="dense_routing",
    )
    routing = reshaped(op("Transpose", dense, const()))
    return op("ReduceSum", op("Multiply", experts_out, routing), const("sum_axis"), name="sum")


def find(model):
    return blocks_or_declines(matches(model, tiled_block(), "ReduceSum"), _block)


def _block(values: dict) -> MoEBlock:
    router = strip(values["topk_indices"]).get_node()  # a TopK, or PhiMoE's sparsemixer Concat
    if strip(values["topk_indices"]).get_partial_shape().rank != ov.Dimension(2):
        raise Decline("selected experts are not a [tokens, top_k] tensor", router)
    dense = values["dense_routing"].get_node()
    if _router_width(values["dense_routing"]) is None:  # e.g. a routing matrix reshaped with a dynamic shape
        raise Decline("the dense routing matrix's expert axis is not static", dense, router)
    if int(np.asarray(values["scatter_axis"].get_node().get_data()).reshape(-1)[0]) not in (1, -1):
        raise Decline("routing is not scattered along the expert axis", values["dense_routing"].get_node(), router)
    weights, num = {}, set()
    for name, key in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down")):
        array, convert_to = read_linear(values, key)
        if array.ndim != 3:
            raise Decline(f"{key} weights are not stacked per expert", values[key + "_matmul"].get_node(), router)
        weights[name] = Weight([array], convert_to)
        num.add(array.shape[0])
    if len(num) != 1:
        raise Decline(f"stacked weights disagree on the expert count: {sorted(num)}", router, router)
    _check_tile(values, next(iter(num)), router)
    beta = swish_beta(values)

    # The module's output is the Reshape of the sum back to the input's shape, when there is one.
    total = values["sum"]
    consumers = list(total.get_target_inputs())
    output = total
    if len(consumers) == 1 and consumers[0].get_node().get_type_name() == "Reshape":
        output = consumers[0].get_node().output(0)
    return MoEBlock(
        family=FAMILY,
        router=router,
        hidden=strip(values["hidden"]),
        routing_weights=strip(values["routing_weights"]),
        topk_indices=strip(values["topk_indices"]),
        output=output,
        num_experts=_router_width(values["dense_routing"]),
        expert_ids=list(range(num.pop())),
        weights=weights,
        expert_beta=beta,
    )


def _check_tile(values: dict, experts: int, router) -> None:
    """The hidden states must be repeated E times along the token axis and nothing else (`repeat(E, 1)`):
    any other tiling hands each expert other rows. (OpenVINO's CPU plugin ignores the repeats when it
    fuses this block itself, so neither the proof nor `check`, which run on CPU, would see it.)"""
    tile = values["tile"].get_node()
    repeats = strip(values["repeats"]).get_node()
    data = np.asarray(repeats.get_data()).reshape(-1) if repeats.get_type_name() == "Constant" else None
    rank = tile.get_input_partial_shape(0).rank
    if data is None or rank.is_dynamic or data.size != rank.get_length():
        raise Decline("the hidden states' Tile repeats are not constant", tile, router)
    if int(data[0]) != experts or any(int(r) != 1 for r in data[1:]):
        raise Decline(f"hidden states tiled {data.tolist()}, not once per expert along tokens ([{experts}, 1])",
                      tile, router)


def _router_width(dense_routing) -> int | None:
    """E as the router sees it: the width of the dense [T, E] routing matrix (None: not static)."""
    shape = dense_routing.get_partial_shape()
    return shape[-1].get_length() if shape.rank.is_static and shape.rank.get_length() and shape[-1].is_static else None


def explain(model, router) -> object:
    """How far this pattern gets from `router` (for `moe-fusion inspect --explain`): the dense routing
    scattered at its indices, transposed, times the experts' outputs, summed; then up into the stacked
    SwiGLU experts and the Tile they read."""

    walk = Walk(FAMILY, router)
    walk.down("ScatterElementsUpdate", "dense [T, E] routing scattered at the indices", port=indices_port(router))
    walk.down("Transpose", "routing transposed to [E, T]").down("Multiply", "experts' outputs times routing")
    product = walk.at
    walk.down("ReduceSum", "sum over experts").goto(product)
    walk.up("MatMul", "down projection on stacked weights").up("Multiply", "activation times up projection")
    walk.up(("Swish", "Multiply"), "Swish (SiLU) of the gate projection", when=is_swish)
    walk.up("MatMul", "gate projection").up("Tile", "hidden states tiled once per expert")
    return walk.trace
