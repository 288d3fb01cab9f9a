"""F1: the per-expert loop of transformers < 5 (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, PhiMoE), as
optimum-intel 1.x exports it, one copy of the loop body per expert:

    expert_mask = one_hot(selected_experts, num_classes=E).permute(2, 1, 0)
    for e in range(E):
        idx, top_x = torch.where(expert_mask[e])
        current_state = hidden_states[None, top_x].reshape(-1, H)
        current_hidden = expert[e](current_state) * routing_weights[top_x, idx, None]
        final_hidden_states.index_add_(0, top_x, current_hidden)

The same loop exported to ONNX by optimum's exporter (torch.onnx) and read with `ov.Core().read_model` spells
some steps differently, and the pattern accepts both spellings: OneHot's depth behind a Convert and its
on/off values split out of one `[off, on]` Constant; `torch.where` as NonZero -> Transpose -> VariadicSplit
(columns); SiLU as x * Sigmoid(x); weights `[in, out]` without transpose_b; and `index_add_` as
`acc + ScatterElements(zeros_like(acc), index, update)` (reduction none, then Add).
"""

from __future__ import annotations

import functools
from collections import defaultdict

import numpy as np
import openvino as ov

from moe_fusion.block import Decline, MoEBlock, Weight
from moe_fusion.pattern import (
    any_input,
    const,
    either,
    match,
    op,
    read_linear,
    reshaped,
    same,
    strip,
    swiglu_mlp,
    swish_beta,
)
from moe_fusion.trace import Trace, Walk, constant, consumers, indices_port, is_constant, is_swish

FAMILY = "per_expert_loop"


def one_hot_value():
    """OneHot's on/off value: a Constant, or (ONNX frontend) a piece of the split `[off, on]` Constant."""
    return either(const(), reshaped(op("Split", const(), const()), 2))


@functools.cache  # built once: patterns are reusable, and every WrapType costs memory
def expert_slot():
    """One loop iteration, rooted at its index_add_: a ScatterElementsUpdate/ScatterNDUpdate with sum, or the
    ONNX exporter's Add of the accumulator and a ScatterElements into zeros."""
    depth = reshaped(const("num_experts"), 2)
    one_hot = op("OneHot", reshaped(any_input("topk_indices")), depth, one_hot_value(), one_hot_value())
    expert_mask = op("Gather", op("Transpose", one_hot, const()), const("expert_id"), const())
    nonzero = op("NonZero", reshaped(expert_mask))
    coordinates = either(op("Transpose", nonzero, const()), nonzero)  # ONNX: NonZero(x).T, split by column
    where = either(op("Split", coordinates, const()), op("VariadicSplit", coordinates, const(), const()))
    top_x = reshaped(where)
    current_state = reshaped(op("Gather", reshaped(any_input("hidden")), top_x, const(), name="gather_tokens"))
    routing = reshaped(op("Gather", reshaped(any_input("routing_weights")), any_input(), const()))
    current_hidden = op("Multiply", swiglu_mlp(current_state), routing)
    index, update = reshaped(any_input("scatter_index")), reshaped(current_hidden)
    # torch.onnx's index_add_: acc + scatter(zeros_like(acc), index, update); exact because top_x, the tokens
    # routed to one expert, has no duplicates (top-k picks distinct experts), so nothing is overwritten
    zeros = op("Broadcast", const("scatter_zero"), any_input())
    added = op("ScatterElementsUpdate", zeros, index, update, const(), name="scatter")
    return either(
        op("ScatterElementsUpdate", any_input("accumulator"), index, update, const(), name="index_add"),
        op("ScatterNDUpdate", any_input("accumulator"), index, update, name="index_add"),
        op("Add", any_input("accumulator"), added, name="index_add"),
    )


SCATTERS = ("ScatterElementsUpdate", "ScatterNDUpdate")


def find(model):
    """Yield one MoEBlock per router whose loop copies all match, or a Decline saying what is off."""
    pattern = expert_slot()
    matches = []
    for node in model.get_ordered_ops():
        if node.get_type_name() in SCATTERS:
            adds = [c.get_node() for c in node.output(0).get_target_inputs() if c.get_node().get_type_name() == "Add"]
            for root in (node, *adds):
                values = match(pattern, root.output(0))
                if values is not None:
                    matches.append(values)
    # a scatter into zeros matched on its own and as part of its Add counts once, as the Add
    inner = {v["scatter"].get_node().get_instance_id() for v in matches if "scatter" in v}
    slots = defaultdict(list)
    for values in matches:
        if values["index_add"].get_node().get_instance_id() not in inner:
            # one block per (router, input): a router driving two blocks is the pipeline's to report
            hidden = strip(values["hidden"])
            key = (strip(values["topk_indices"]).get_node().get_instance_id(), hidden.get_node().get_instance_id())
            slots[(*key, hidden.get_index())].append(values)
    for group in slots.values():
        try:
            yield _block(group)
        except Decline as decline:
            yield decline


def _block(group: list[dict]) -> MoEBlock:
    first = group[0]
    router = strip(first["topk_indices"]).get_node()  # a TopK, or PhiMoE's sparsemixer Concat
    if strip(first["topk_indices"]).get_partial_shape().rank != ov.Dimension(2):
        raise Decline("selected experts are not a [tokens, top_k] tensor", router)
    for values in group:
        # top_x must index both the tokens gathered and the rows accumulated into
        token_index = values["gather_tokens"].get_node().input_value(1)
        if not same(strip(token_index), strip(values["scatter_index"])):
            raise Decline("index_add_ rows differ from the gathered tokens", values["index_add"].get_node(), router)
        for key in ("hidden", "routing_weights"):
            if not same(strip(values[key]), strip(first[key])):
                raise Decline(f"experts read different {key}", values["index_add"].get_node(), router)
        if "scatter" in values:  # Add(acc, scatter into zeros): the scatter's target must be all zeros
            scatter = values["scatter"].get_node()
            if np.any(values["scatter_zero"].get_node().get_data()):
                raise Decline("index_add_ scatters into a non-zero tensor before the Add", scatter, router)
            if scatter.get_attributes()["reduction"] not in ("none", "sum"):
                reduction = scatter.get_attributes()["reduction"]
                raise Decline(f"scatter into zeros reduces with {reduction}", scatter, router)
        else:
            scatter = values["index_add"].get_node()
            if scatter.get_type_name() == "ScatterElementsUpdate" and scatter.get_attributes()["reduction"] != "sum":
                raise Decline("scatter does not accumulate (reduction != sum)", scatter, router)

    num_experts = int(first["num_experts"].get_node().get_data())
    missing = sorted(set(range(num_experts)) - {int(v["expert_id"].get_node().get_data()) for v in group})
    if missing:
        raise Decline(
            f"experts {missing} of {num_experts} are missing or do not match the SwiGLU expert pattern", router, router
        )

    # The loop copies form one chain: each index_add_ accumulates into the previous one's result.
    outputs = {v["index_add"].get_node().get_instance_id(): v for v in group}
    accumulated = {v["accumulator"].get_node().get_instance_id() for v in group}
    last = [v for k, v in outputs.items() if k not in accumulated]
    if len(last) != 1:
        raise Decline(f"expert index_add_ ops form {len(last)} chains, expected one", router, router)
    chain, values = [], last[0]
    while values is not None:
        chain.append(values)
        values = outputs.get(values["accumulator"].get_node().get_instance_id())
    if len(chain) != len(group):
        raise Decline("expert index_add_ ops do not form one chain", router, router)
    chain.reverse()

    parts: dict[str, list] = {"w_gate": [], "w_up": [], "w_down": []}
    convert: dict[str, object] = {}
    betas: set[float] = set()
    for values in chain:
        for name, key in (("w_gate", "gate"), ("w_up", "up"), ("w_down", "down")):
            try:
                array, convert_to = read_linear(values, key)
            except ValueError as error:
                raise Decline(str(error), values[key + "_matmul"].get_node(), router) from None
            parts[name].append(array)
            if convert.setdefault(name, convert_to) != convert_to:
                raise Decline(
                    f"experts' {name} weights differ in precision", values[key + "_matmul"].get_node(), router
                )
        betas.add(swish_beta(values))
    if len(betas) != 1:
        raise Decline(f"experts' Swish betas differ: {sorted(betas)}", router, router)

    return MoEBlock(
        family=FAMILY,
        router=router,
        hidden=strip(first["hidden"]),
        routing_weights=strip(first["routing_weights"]),
        topk_indices=strip(first["topk_indices"]),
        output=chain[-1]["index_add"],
        num_experts=num_experts,
        expert_ids=[int(v["expert_id"].get_node().get_data()) for v in chain],
        weights={name: Weight(parts[name], convert[name]) for name in parts},
        expert_beta=betas.pop(),
    )


def explain(model, router) -> object:
    """How far this pattern gets from `router` (for `moe-fusion inspect --explain`), per expert slot e:
    OneHot of its indices -> the mask's row e -> NonZero -> top_x -> the tokens gathered and the index_add_
    at top_x; then up from the index_add_ through routing weight, down, activation, gate to those tokens.
    The trace of the first slot that does not match, or of the last one when all do."""

    def feeds_matmul(node) -> bool:
        return any(c.get_type_name() == "MatMul" for c in consumers(node))

    first = Walk(FAMILY, router).down("OneHot", "OneHot of the router's indices", port=indices_port(router))
    if not first.ok:
        return first.trace
    depth = constant(first.at.input_value(1))
    experts = int(depth.reshape(-1)[0]) if depth is not None and depth.size == 1 else 0
    if experts < 1:
        return first.fail("a constant OneHot depth (the number of experts)", first.at).trace
    traces = []
    for e in range(experts):
        walk = Walk(FAMILY, router).down("OneHot", "OneHot of the router's indices", port=indices_port(router))
        walk.down("Transpose", "expert mask permuted to [E, K, T]")
        walk.down("Gather", f"expert {e}'s row of the mask", when=lambda n, e=e: is_constant(n.input_value(1), e))
        walk.down("NonZero", f"torch.where of expert {e}'s mask")
        walk.down(("Split", "VariadicSplit", "Transpose"), "top_x split from the coordinates")
        if walk.ok and walk.at.get_type_name() == "Transpose":
            walk.down(("Split", "VariadicSplit"), "top_x split from the coordinates")
        split = walk.at
        walk.down("Gather", f"the tokens routed to expert {e}", when=feeds_matmul)
        tokens = walk.at
        walk.goto(split).down(("ScatterElementsUpdate", "ScatterNDUpdate"), f"expert {e}'s index_add_ at top_x")
        walk.up("Multiply", f"expert {e}'s output times its routing weight")
        walk.up("MatMul", f"expert {e}'s down projection").up("Multiply", "activation times up projection")
        walk.up(("Swish", "Multiply"), f"Swish (SiLU) of expert {e}'s gate projection", when=is_swish)
        walk.up("MatMul", f"expert {e}'s gate projection")
        walk.up("Gather", f"expert {e}'s gate reading the tokens routed to it", when=lambda n, t=tokens: n == t)
        traces.append(walk.trace)
    failed = [t for t in traces if t.expected]
    trace: Trace = failed[0] if failed else traces[-1]
    trace.note = f"{experts - len(failed)} of {experts} expert slots match"
    return trace
