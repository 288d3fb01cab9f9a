"""The `batched_mm` experts of transformers 5 (`model.set_experts_implementation("batched_mm")`), as
`openvino.convert_model` traces them: every (token, slot) pair gathers its expert's matrices out of the
stacked `[E, ...]` parameters and runs a batched MatMul on them. The form of DeepSeek-V3, GLM-4-MoE,
ERNIE-4.5-MoE, Hunyuan-MoE, OLMoE, Mixtral, ... converted directly (optimum-intel refuses many of them):

    token_idx = arange(T).unsqueeze(1).expand(-1, K).reshape(-1)          # slot s reads token s // K
    expert_ids = top_k_index.reshape(-1).clamp(0, E - 1)                  # no-op for a TopK over E scores
    gate, up = bmm(gate_up_proj[expert_ids], x[token_idx].unsqueeze(-1)).squeeze(-1).chunk(2, -1)
    y = bmm(down_proj[expert_ids], (act(gate) * up).unsqueeze(-1)).squeeze(-1)
    y = (y * top_k_weights.reshape(-1, 1)).masked_fill(expert_ids_before_clamp >= E, 0)   # no-op, likewise
    out = y.view(T, K, H).sum(1)

The router stays as ops, whichever it is (softmax top-k, sigmoid + correction bias, group-limited top-k
with routed scaling): FusedExperts takes the final TopK's indices and the per-slot weights the block
multiplies by. The Clamp and the masked_fill exist for expert parallelism (ids >= E mark other devices'
experts); both are proven no-ops here from the TopK's width before the block is fused. Weights stored
`[E, out, in]` (bmm(W, x)) or `[E, in, out]` (bmm(x, W), `is_transposed` experts) are both read.
"""

from __future__ import annotations

import functools

import numpy as np
import openvino as ov

from moe_fusion.block import Decline, MoEBlock, Weight, blocks_or_declines
from moe_fusion.compressed import is_plain
from moe_fusion.pattern import any_input, const, either, matches, op, reshaped, same, strip, swish, swish_beta, weight

FAMILY = "batched_mm"


def _gathered(name: str, ids):
    """`proj[expert_ids]`: a Gather of the stacked `[E, ...]` weight along axis 0."""
    return op("Gather", weight(name), ids, const(name + "_axis"), name=name + "_gather")


def _bmm(w, x, name: str):
    """bmm(W, x) on `[S, out, in]` x `[S, in, 1]`, or bmm(x, W) on `[S, 1, in]` x `[S, in, out]`."""
    return either(op("MatMul", w, x, name=name), op("MatMul", x, w, name=name))


@functools.cache  # built once: patterns are reusable, and every WrapType costs memory
def batched_block():
    ids = reshaped(op("Clamp", reshaped(any_input("topk_indices")), name="clamp"))
    tokens = reshaped(op("Gather", reshaped(any_input("hidden")), reshaped(any_input("token_index")),
                         const("token_axis"), name="gather_tokens"))
    gate_up = reshaped(_bmm(_gathered("gate_up", ids), tokens, "gate_up_matmul"))
    split = op(("Split", "VariadicSplit"), gate_up, const("split_axis"), name="split")
    split_lengths = op("VariadicSplit", gate_up, const("split_axis"), any_input(), name="split")
    halves = either(split, split_lengths)
    product = op("Multiply", swish(halves), any_input("up"), name="product")
    down = reshaped(_bmm(_gathered("down", ids), reshaped(product), "down_matmul"))
    weighted = op("Multiply", down, reshaped(any_input("routing_weights")), name="weighted")
    masked = either(op("Select", any_input("invalid"), const("fill"), weighted, name="select"), weighted)
    return op("ReduceSum", reshaped(masked), const("sum_axis"), name="sum")


def find(model):
    return blocks_or_declines(matches(model, batched_block(), "ReduceSum"), _block)


def _scalar(value: ov.Output) -> float | None:
    node = strip(value).get_node()
    if node.get_type_name() != "Constant":
        return None
    data = np.asarray(node.get_data()).reshape(-1)
    return float(data[0]) if data.size == 1 else None


def _stacked(values: dict, name: str, router) -> tuple[np.ndarray, ov.Type | None, bool]:
    """The stacked weight behind `name`'s Gather as `[E, in, out]`, its decompression Convert type, and
    whether the batched MatMul read it as bmm(W, x) (weights `[E, out, in]`)."""
    matmul = values[name + "_matmul"].get_node()
    gather = values[name + "_gather"].get_node()
    if _scalar(values[name + "_axis"]) != 0:
        raise Decline(f"{name} weights are not gathered along the expert axis", gather, router)
    source = gather.input_value(0)
    if not is_plain(source):
        raise Decline(f"{name} weights are integer-compressed (not supported in this form yet)", gather, router)
    convert_to = None
    if source.get_node().get_type_name() == "Convert":
        convert_to, source = source.get_element_type(), source.get_node().input_value(0)
    data = source.get_node().get_data()
    if data.ndim != 3:
        raise Decline(f"{name} weights are not stacked [E, ., .]", gather, router)
    attrs = matmul.get_attributes()
    weight_first = same(strip(matmul.input_value(0)), values[name + "_gather"])
    transposed = attrs["transpose_a"] if weight_first else attrs["transpose_b"]
    if (attrs["transpose_b"] if weight_first else attrs["transpose_a"]):
        raise Decline(f"{name} batched MatMul transposes its activation", matmul, router)
    # y = W @ x reads W as [out, in]; y = x @ W as [in, out]; a transpose flag flips either.
    out_in = weight_first != transposed
    return (np.swapaxes(data, -1, -2) if out_in else data), convert_to, weight_first


def _block(values: dict) -> MoEBlock:
    indices = strip(values["topk_indices"])
    router = indices.get_node()
    if router.get_type_name() != "TopK" or indices.get_index() != 1:
        raise Decline("expert ids do not come straight from a TopK's indices", router)
    width = router.get_input_partial_shape(0)
    if width.rank.is_dynamic or width.rank.get_length() != 2 or width[-1].is_dynamic:
        raise Decline("the router's TopK does not select among a static [tokens, experts] score", router, router)
    num_experts = width[-1].get_length()
    if router.get_attributes()["axis"] not in (-1, 1):
        raise Decline("the router's TopK does not select along the expert axis", router, router)

    # The Clamp and the masked_fill are identities on ids of a TopK over E scores (0 <= id < E).
    clamp = values["clamp"].get_node().get_attributes()
    if clamp["min"] > 0 or clamp["max"] < num_experts - 1:
        raise Decline(f"expert ids clamped to [{clamp['min']:g}, {clamp['max']:g}], which remaps some of the "
                      f"{num_experts} experts", values["clamp"].get_node(), router)
    if "select" in values:
        _check_mask(values, indices, num_experts, router)

    gate_up, gate_up_convert, weight_first = _stacked(values, "gate_up", router)
    down, down_convert, down_first = _stacked(values, "down", router)
    if weight_first != down_first:
        raise Decline("the two batched MatMuls disagree on the weights' side", values["down_matmul"].get_node(), router)
    if gate_up.shape[0] != num_experts or down.shape[0] != num_experts:
        raise Decline(f"stacked weights hold {gate_up.shape[0]} and {down.shape[0]} experts, the router "
                      f"{num_experts}", values["gate_up_gather"].get_node(), router)
    gate, up = _halves(values, gate_up, router)
    _check_tokens(values, router)
    total = values["sum"]
    if _scalar(values["sum_axis"]) not in (1.0, -2.0):
        raise Decline("the sum is not over the top-k slots", total.get_node(), router)
    return MoEBlock(
        family=FAMILY,
        router=router,
        hidden=strip(values["hidden"]),
        routing_weights=strip(values["routing_weights"]),
        topk_indices=indices,
        output=total,
        num_experts=num_experts,
        expert_ids=list(range(num_experts)),
        weights={"w_gate": Weight([gate], gate_up_convert), "w_up": Weight([up], gate_up_convert),
                 "w_down": Weight([down], down_convert)},
        expert_beta=swish_beta(values),
    )


def _halves(values: dict, gate_up: np.ndarray, router) -> tuple[np.ndarray, np.ndarray]:
    """`gate, up = out.chunk(2, -1)`: the activation reads the first half, the up projection the second."""
    split = values["split"].get_node()
    inter = gate_up.shape[-1] // 2
    if _scalar(values["split_axis"]) not in (-1.0, 1.0) or split.get_output_size() != 2:
        raise Decline("the gate_up projection is not split in two along its output", split, router)
    if any(split.get_output_partial_shape(i)[-1] != ov.Dimension(inter) for i in (0, 1)) or gate_up.shape[-1] % 2:
        raise Decline("the gate_up projection is not split into equal halves", split, router)
    swished = values["swish"].get_node().input_value(0)
    up = strip(values["up"])
    if not (same(swished, split.output(0)) and same(up, split.output(1))):
        raise Decline("the activation does not read the first half and the up projection the second", split, router)
    return gate_up[..., :inter], gate_up[..., inter:]


def _check_mask(values: dict, indices: ov.Output, num_experts: int, router) -> None:
    """masked_fill(ids >= E, 0): a Select on GreaterEqual(ids, c >= E) is never taken."""
    condition = strip(values["invalid"]).get_node()
    if (
        condition.get_type_name() != "GreaterEqual"
        or not same(strip(condition.input_value(0)), indices)
        or (_scalar(condition.input_value(1)) or 0) < num_experts
    ):
        raise Decline("slots are masked by something other than expert ids >= E", values["select"].get_node(), router)


def _check_tokens(values: dict, router) -> None:
    """Slot s reads token s // K: arange(T) unsqueezed at axis 1, expanded to [T, K] and flattened."""
    gather = values["gather_tokens"].get_node()
    chain, value = [], gather.input_value(1)
    while value.get_node().get_type_name() in ("Convert", "Reshape", "Broadcast", "Unsqueeze"):
        chain.append(value.get_node())
        value = value.get_node().input_value(0)
    kinds = [n.get_type_name() for n in chain if n.get_type_name() != "Convert"]
    arange = value.get_node()
    if (
        _scalar(values["token_axis"]) == 0
        and kinds[-2:] == ["Broadcast", "Unsqueeze"]
        and _scalar(chain[-1].input_value(1)) in (1.0, -1.0)
        and arange.get_type_name() == "Range"
        and _scalar(arange.input_value(0)) == 0
        and _scalar(arange.input_value(2)) == 1
    ):
        return
    raise Decline("the tokens each slot reads are not arange(T) repeated K times", gather, router)


def explain(model, router) -> object:
    """How far this pattern gets from `router` (for `moe-fusion inspect --explain`): the indices flattened and
    clamped, the stacked gate_up weights gathered by them, the batched MatMul, split, activation, down
    projection on gathered weights, routing weight and the sum over the K slots."""
    from moe_fusion.explain import Walk, consumers, indices_port, is_swish

    def feeds_split(gather) -> bool:
        return any(n.get_type_name() in ("Split", "VariadicSplit") for m in consumers(gather) for n in consumers(m))

    walk = Walk(FAMILY, router)
    walk.down("Clamp", "expert ids clamped to [0, E-1]", port=indices_port(router))
    walk.down("Gather", "stacked gate_up weights gathered per slot", when=feeds_split)
    walk.down("MatMul", "batched MatMul per slot").down(("Split", "VariadicSplit"), "gate_up split into gate and up")
    walk.down(("Swish", "Multiply"), "activation of the gate", when=is_swish)
    walk.down("Multiply", "activation times up").down("MatMul", "down projection on gathered weights")
    walk.down("Multiply", "times the routing weight").down(("Select", "ReduceSum"), "slots of ids >= E zeroed")
    if walk.ok and walk.at.get_type_name() == "Select":
        walk.down("ReduceSum", "sum over the K slots")
    return walk.trace
