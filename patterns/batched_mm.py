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
GPT-OSS's experts in this form (`gemm2_block`) are GEMM2: biases gathered like the weights, gate and up
interleaved lanes of one projection, both clamped, `(up + 1) * gate * sigmoid(beta * gate)`.
"""

from __future__ import annotations

import functools

import numpy as np
import openvino as ov

from moe_fusion.block import Decline, MoEBlock, Weight, blocks_or_declines
from moe_fusion.compressed import is_plain, plain_weight
from moe_fusion.pattern import any_input, const, either, matches, op, reshaped, same, strip, swish, swish_beta, weight
from moe_fusion.reference import GEMM2_BIAS_SWIGLU_CLAMP
from moe_fusion.trace import Walk, consumers, indices_port, is_swish, producers

FAMILY = "batched_mm"


def _gathered(name: str, ids):
    """`proj[expert_ids]`: a Gather of the stacked `[E, ...]` weight along axis 0."""
    return op("Gather", weight(name), ids, const(name + "_axis"), name=name + "_gather")


def _bmm(w, x, name: str):
    """bmm(W, x) on `[S, out, in]` x `[S, in, 1]`, or bmm(x, W) on `[S, 1, in]` x `[S, in, out]`."""
    return either(op("MatMul", w, x, name=name), op("MatMul", x, w, name=name))


def _ids():
    """The flattened router ids, clamped to [0, E-1] (transformers 5.5) or only under expert parallelism
    (5.23: no Clamp when the model is not sharded)."""
    return either(reshaped(op("Clamp", reshaped(any_input("topk_indices")), name="clamp")),
                  reshaped(any_input("topk_indices")))


def _tokens():
    return reshaped(op("Gather", reshaped(any_input("hidden")), reshaped(any_input("token_index")),
                       const("token_axis"), name="gather_tokens"))


def _summed(down):
    """`(y * w).masked_fill(ids >= E, 0).view(T, K, H).sum(1)`, rooted at the ReduceSum."""
    weighted = op("Multiply", down, reshaped(any_input("routing_weights")), name="weighted")
    masked = either(op("Select", any_input("invalid"), const("fill"), weighted, name="select"), weighted)
    return op("ReduceSum", reshaped(masked), const("sum_axis"), name="sum")


@functools.cache  # built once: patterns are reusable, and every WrapType costs memory
def batched_block():
    """GEMM3: `gate, up = bmm(gate_up[ids], x).chunk(2)`, `bmm(down[ids], act(gate) * up)`."""
    ids = _ids()
    gate_up = reshaped(_bmm(_gathered("gate_up", ids), _tokens(), "gate_up_matmul"))
    split = op(("Split", "VariadicSplit"), gate_up, const("split_axis"), name="split")
    split_lengths = op("VariadicSplit", gate_up, const("split_axis"), any_input(), name="split")
    product = op("Multiply", swish(either(split, split_lengths)), any_input("up"), name="product")
    return _summed(reshaped(_bmm(_gathered("down", ids), reshaped(product), "down_matmul")))


def _lane(gate_up, name: str):
    """`gate_up[..., start::2]`: a Slice with or without its axes input."""
    return either(op("Slice", gate_up, const(), const(), const(), const(), name=name),
                  op("Slice", gate_up, const(), const(), const(), name=name))


@functools.cache
def gemm2_block():
    """GEMM2 (GPT-OSS): biased gate_up with interleaved lanes, gate clamped above, up clamped and + 1,
    `gate * sigmoid(beta * gate)`, biased down; the biases gathered per slot like the weights."""
    ids = _ids()
    gate_up = op("Add", reshaped(_bmm(_gathered("gate_up", ids), _tokens(), "gate_up_matmul")),
                 reshaped(_gathered("gate_up_bias", ids)), name="gate_up_add")
    gate = op("Minimum", _lane(gate_up, "gate_slice"), const("gate_limit"), name="gate_min")
    up = op("Add", op("Clamp", _lane(gate_up, "up_slice"), name="up_clamp"), const("up_offset"))
    glu = either(op("Swish", gate, const("swish_beta"), name="swish"), op("Swish", gate, name="swish"))
    down = reshaped(_bmm(_gathered("down", ids), reshaped(op("Multiply", up, glu)), "down_matmul"))
    return _summed(op("Add", down, reshaped(_gathered("down_bias", ids)), name="down_add"))


def find(model):
    yield from blocks_or_declines(matches(model, batched_block(), "ReduceSum"), _block)
    yield from blocks_or_declines(matches(model, gemm2_block(), "ReduceSum"), _gemm2)


def _scalar(value: ov.Output) -> float | None:
    node = strip(value).get_node()
    if node.get_type_name() != "Constant":
        return None
    data = np.asarray(node.get_data()).reshape(-1)
    return float(data[0]) if data.size == 1 else None


def _stacked(values: dict, name: str, router) -> tuple[np.ndarray, dict, bool]:
    """The stacked weight behind `name`'s Gather as `[E, in, out]`, its storage (Weight fields), and
    whether the batched MatMul read it as bmm(W, x) (weights `[E, out, in]`)."""
    matmul = values[name + "_matmul"].get_node()
    gather = values[name + "_gather"].get_node()
    if _scalar(values[name + "_axis"]) != 0:
        raise Decline(f"{name} weights are not gathered along the expert axis", gather, router)
    source = gather.input_value(0)
    if not is_plain(source):
        raise Decline(f"{name} weights are integer-compressed (not supported in this form yet)", gather, router)
    data, kind = plain_weight(source)
    if data.ndim != 3:
        raise Decline(f"{name} weights are not stacked [E, ., .]", gather, router)
    attrs = matmul.get_attributes()
    weight_first = same(strip(matmul.input_value(0)), values[name + "_gather"])
    transposed = attrs["transpose_a"] if weight_first else attrs["transpose_b"]
    if (attrs["transpose_b"] if weight_first else attrs["transpose_a"]):
        raise Decline(f"{name} batched MatMul transposes its activation", matmul, router)
    # y = W @ x reads W as [out, in]; y = x @ W as [in, out]; a transpose flag flips either.
    out_in = weight_first != transposed
    return (np.swapaxes(data, -1, -2) if out_in else data), kind, weight_first


def _routing(values: dict) -> tuple[ov.Node, ov.Output, int]:
    """The router TopK, its indices and E, after checking what both forms share: the id Clamp and the
    masked_fill are identities on ids of a TopK over E scores (0 <= id < E), slot s reads token s // K, and
    the sum is over the K slots."""
    indices = strip(values["topk_indices"])
    topks = _router_topks(indices)
    if not topks:
        raise Decline("expert ids do not come straight from a TopK's indices", indices.get_node())
    router = topks[0]
    widths = {str(topk.get_input_partial_shape(0)) for topk in topks}
    width = router.get_input_partial_shape(0)
    if len(widths) > 1 or width.rank.is_dynamic or width.rank.get_length() != 2 or width[-1].is_dynamic:
        raise Decline("the router's TopK does not select among a static [tokens, experts] score", router, router)
    num_experts = width[-1].get_length()
    if any(topk.get_attributes()["axis"] not in (-1, 1) for topk in topks):
        raise Decline("the router's TopK does not select along the expert axis", router, router)
    clamp = values["clamp"].get_node().get_attributes() if "clamp" in values else {"min": 0, "max": num_experts}
    if clamp["min"] > 0 or clamp["max"] < num_experts - 1:
        raise Decline(f"expert ids clamped to [{clamp['min']:g}, {clamp['max']:g}], which remaps some of the "
                      f"{num_experts} experts", values["clamp"].get_node(), router)
    if "select" in values:
        _check_mask(values, indices, num_experts, router)
    _check_tokens(values, router)
    if _scalar(values["sum_axis"]) not in (1.0, -2.0):
        raise Decline("the sum is not over the top-k slots", values["sum"].get_node(), router)
    return router, indices, num_experts


def _router_topks(indices: ov.Output) -> list[ov.Node]:
    """The TopKs the expert ids come from: one TopK's indices, or the indices of several TopKs over the same
    scores' shape concatenated along the slot axis (PhiMoE's sparsemixer picks one expert per pass, twice).
    Either way every id is in [0, E) and slot k of token t is the k-th id picked for t."""
    node = indices.get_node()
    if node.get_type_name() == "TopK" and indices.get_index() == 1:
        return [node]
    if node.get_type_name() != "Concat" or node.get_attributes()["axis"] not in (-1, 1):
        return []
    parts = [strip(value) for value in node.input_values()]
    if all(p.get_node().get_type_name() == "TopK" and p.get_index() == 1 for p in parts):
        return [p.get_node() for p in parts]
    return []


def _matrices(values: dict, num_experts: int, router) -> tuple:
    """gate_up and down `[E, in, out]` with their storage (Weight fields: decompression Convert, bf16)."""
    gate_up, gate_up_kind, weight_first = _stacked(values, "gate_up", router)
    down, down_kind, down_first = _stacked(values, "down", router)
    if weight_first != down_first:
        raise Decline("the two batched MatMuls disagree on the weights' side", values["down_matmul"].get_node(), router)
    if gate_up.shape[0] != num_experts or down.shape[0] != num_experts:
        raise Decline(f"stacked weights hold {gate_up.shape[0]} and {down.shape[0]} experts, the router "
                      f"{num_experts}", values["gate_up_gather"].get_node(), router)
    return gate_up, gate_up_kind, down, down_kind


def _new_block(values: dict, router, indices, num_experts: int, weights: dict, **attributes) -> MoEBlock:
    # every token gathers its K experts' matrices (then MatMuls them in f32): that much memory per token
    expert_elements = sum(int(np.prod(w.parts[0].shape[1:])) for w in weights.values())
    top_k = indices.get_partial_shape()[-1].get_length() if indices.get_partial_shape()[-1].is_static else 1
    return MoEBlock(
        bytes_per_token=2 * 4 * top_k * expert_elements,
        family=FAMILY,
        router=router,
        hidden=strip(values["hidden"]),
        routing_weights=strip(values["routing_weights"]),
        topk_indices=indices,
        output=values["sum"],
        num_experts=num_experts,
        expert_ids=list(range(num_experts)),
        weights=weights,
        **attributes,
    )


def _block(values: dict) -> MoEBlock:
    router, indices, num_experts = _routing(values)
    gate_up, gate_up_kind, down, down_kind = _matrices(values, num_experts, router)
    gate, up = _halves(values, gate_up, router)
    weights = {"w_gate": Weight([gate], **gate_up_kind), "w_up": Weight([up], **gate_up_kind),
               "w_down": Weight([down], **down_kind)}
    return _new_block(values, router, indices, num_experts, weights, expert_beta=swish_beta(values))


def _gemm2(values: dict) -> MoEBlock:
    router, indices, num_experts = _routing(values)
    gate_up, gate_up_kind, down, down_kind = _matrices(values, num_experts, router)
    width = gate_up.shape[-1]
    starts = {}
    for lane in ("gate_slice", "up_slice"):
        node = values[lane].get_node()
        start, stop, step = (_scalar(node.input_value(i)) for i in (1, 2, 3))
        axis = _scalar(node.input_value(4)) if node.get_input_size() > 4 else None
        if axis not in (-1.0, 1.0) or step != 2 or start not in (0.0, 1.0) or stop is None or stop < width:
            raise Decline(f"{lane.split('_')[0]} lane is not gate_up[..., 0::2] or [..., 1::2]", node, router)
        if not same(node.input_value(0), values["gate_up_add"]):
            raise Decline("gate and up lanes are not slices of the one biased gate_up", node, router)
        starts[lane] = int(start)
    if starts["gate_slice"] == starts["up_slice"]:
        raise Decline("gate and up lanes overlap", values["up_slice"].get_node(), router)
    limit, offset = _scalar(values["gate_limit"]), _scalar(values["up_offset"])
    clamp = values["up_clamp"].get_node().get_attributes()
    if limit is None or not 0 < limit < np.inf or np.float32(clamp["max"]) != np.float32(limit) or \
            np.float32(clamp["min"]) != -np.float32(limit) or offset != 1.0:
        raise Decline(f"gate clamp {limit}, up clamp [{clamp['min']:g}, {clamp['max']:g}] + {offset} is not "
                      "GPT-OSS's clamp(max=limit), clamp(-limit, limit) + 1", values["up_clamp"].get_node(), router)
    beta = _scalar(values["swish_beta"]) if "swish_beta" in values else 1.0
    if beta is None:
        raise Decline("the Swish beta is not a constant", values["swish"].get_node(), router)
    biases = {}
    for name, size in (("gate_up_bias", width), ("down_bias", down.shape[-1])):
        bias, kind = _stacked_bias(values, name, router)
        if bias.shape != (num_experts, size):
            raise Decline(f"{name} {list(bias.shape)} is not [{num_experts}, {size}]", router, router)
        biases[name] = Weight([bias], **kind)
    weights = {"w_gate_up": Weight([gate_up], **gate_up_kind), "b_gate_up": biases["gate_up_bias"],
               "w_down": Weight([down], **down_kind), "b_down": biases["down_bias"]}
    return _new_block(values, router, indices, num_experts, weights, expert_type=GEMM2_BIAS_SWIGLU_CLAMP,
                      expert_alpha=float(limit), expert_beta=float(beta), gate_idx=starts["gate_slice"])


def _stacked_bias(values: dict, name: str, router) -> tuple[np.ndarray, dict]:
    gather = values[name + "_gather"].get_node()
    if _scalar(values[name + "_axis"]) != 0:
        raise Decline(f"{name} is not gathered along the expert axis", gather, router)
    source = gather.input_value(0)
    if not is_plain(source):
        raise Decline(f"{name} is not a constant", gather, router)
    return plain_weight(source)


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


def _repeat_interleaved(value: ov.Output) -> bool:
    """`x.repeat_interleave(K, dim=0)` as traced (transformers 5.23): Gather of x at
    Reshape(Transpose(Tile(Unsqueeze(arange(T), 0), [K, 1]), [1, 0])), i.e. index s // K at slot s."""
    chain = []
    while value.get_node().get_type_name() in ("Convert", "Reshape", "Transpose", "Tile", "Unsqueeze"):
        chain.append(value.get_node())
        value = value.get_node().input_value(0)
    kinds = [n.get_type_name() for n in chain if n.get_type_name() != "Convert"]
    if kinds[-4:] != ["Reshape", "Transpose", "Tile", "Unsqueeze"] or value.get_node().get_type_name() != "Range":
        return False
    reshape, transpose, tile, unsqueeze = [n for n in chain if n.get_type_name() != "Convert"][-4:]
    arange = value.get_node()
    perm = strip(transpose.input_value(1)).get_node()
    repeats = tile.input_value(1).get_node()
    repeat_one = repeats.get_type_name() == "Concat" and repeats.get_input_size() == 2 and \
        _scalar(repeats.input_value(1)) == 1
    rank = reshape.get_output_partial_shape(0).rank
    return (perm.get_type_name() == "Constant" and list(np.asarray(perm.get_data()).reshape(-1)) == [1, 0]
            and repeat_one and _scalar(unsqueeze.input_value(1)) == 0 and rank.is_static and rank.get_length() == 1
            and _scalar(arange.input_value(0)) == 0 and _scalar(arange.input_value(2)) == 1)


def _check_tokens(values: dict, router) -> None:
    """Slot s reads token s // K: arange(T) unsqueezed at axis 1, expanded to [T, K] and flattened (5.5), or
    the hidden states repeat-interleaved K times (5.23)."""
    gather = values["gather_tokens"].get_node()
    if _scalar(values["token_axis"]) == 0 and _repeat_interleaved(gather.input_value(1)):
        return
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
    clamped, the stacked gate_up weights gathered by them, the batched MatMul on the gathered tokens, the split
    (GEMM3) or biased interleaved lanes (GEMM2), activation, down projection on gathered weights, routing weight
    and the sum over the K slots."""

    def reads_tokens(gather) -> bool:  # the gate_up Gather: its MatMul's other operand is the gathered tokens
        return any(p.get_type_name() == "Gather" and p != gather
                   for m in consumers(gather) if m.get_type_name() == "MatMul" for p in producers(m))

    walk = Walk(FAMILY, router)
    walk.down(("Clamp", "Gather"), "expert ids clamped to [0, E-1], or the stacked weights gathered by them",
              port=indices_port(router), when=lambda n: n.get_type_name() == "Clamp" or reads_tokens(n))
    if walk.ok and walk.at.get_type_name() == "Clamp":
        walk.down("Gather", "stacked gate_up weights gathered per slot", when=reads_tokens)
    walk.down("MatMul", "batched MatMul on the gathered tokens")
    walk.down(("Split", "VariadicSplit", "Add"), "gate_up split into gate and up, or its gathered bias added")
    gemm2 = walk.ok and walk.at.get_type_name() == "Add"
    if gemm2:
        walk.down("Slice", "interleaved gate lane", when=lambda n: any(c.get_type_name() == "Minimum"
                                                                        for c in consumers(n)))
        walk.down("Minimum", "gate clamped above")
        walk.down("Swish", "Swish(beta) of the gate").down("Multiply", "times (clamped up + 1)")
    else:
        walk.down(("Swish", "Multiply"), "activation of the gate", when=is_swish)
        walk.down("Multiply", "activation times up")
    walk.down("MatMul", "down projection on gathered weights")
    if gemm2:
        walk.down("Add", "its gathered bias added")
    walk.down("Multiply", "times the routing weight").down(("Select", "ReduceSum"), "slots of ids >= E zeroed")
    if walk.ok and walk.at.get_type_name() == "Select":
        walk.down("ReduceSum", "sum over the K slots")
    return walk.trace
