"""GPT-OSS experts (GEMM2): transformers' `GptOssExperts` in its tiled form, as optimum-intel 1.x and 2.x
export it. Every expert runs on every token against stacked weights; gate and up share one GEMM with a bias,
their lanes interleaved, both clamped:

    x = hidden_states.reshape(-1, H).repeat(E, 1).view(E, -1, H)
    gate_up = torch.bmm(x, gate_up_proj) + gate_up_proj_bias[..., None, :]       # [E, T, 2I]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]                               # stride-2 Slices
    gate = gate.clamp(max=limit)                                                   # Minimum
    up = up.clamp(min=-limit, max=limit)                                           # Clamp
    glu = gate * torch.sigmoid(gate * alpha)                                       # Swish(beta=alpha)
    y = torch.bmm((up + 1) * glu, down_proj) + down_proj_bias[..., None, :]        # [E, T, H]
    out = (y.view(E, T, ..., H) * dense.T.view(E, T, ...)[..., None]).sum(0)      # dense: [T, E] routing

The router stays as ops: top-k on `x @ W + b`, softmax over the k values, scattered into zeros `[T, E]`.
All-zero expert biases are folded away at export, and OpenVINO then also leaves the weights in PyTorch's
`[E, in, out]` layout (`transpose_b=False`): such a block fuses with zero biases. Limit, beta and which lane
is the gate are read from the graph.
"""

from __future__ import annotations

import functools

import numpy as np
import openvino as ov

from moe_fusion.block import Decline, MoEBlock, Weight, blocks_or_declines
from moe_fusion.pattern import (
    any_input,
    const,
    either,
    matches,
    op,
    read_linear,
    reshaped,
    same,
    strip,
    unsliced,
    weight,
)
from moe_fusion.reference import GEMM2_BIAS_SWIGLU_CLAMP
from moe_fusion.trace import Walk, indices_port, is_constant, is_swish

FAMILY = "gptoss"


def biased(x, name: str):
    """`x + bias`, or `x` alone where an all-zero bias was folded away at export."""
    return either(op("Add", x, weight(name + "_bias"), name=name + "_add"), x)


def lane(gate_up, name: str):
    """`gate_up[..., start::step]`: a Slice with or without its axes input."""
    return either(
        op("Slice", gate_up, any_input(), any_input(), any_input(), any_input(), name=name),
        op("Slice", gate_up, any_input(), any_input(), any_input(), name=name),
    )


def scaled_swish(x):
    """`x * sigmoid(beta * x)`: Swish with or without beta, or spelt out."""
    return either(
        op("Swish", x, any_input("swish_beta"), name="swish"),
        op("Swish", x, name="swish"),
        op("Multiply", x, op("Sigmoid", op("Multiply", x, any_input("swish_beta"))), name="swish"),
        op("Multiply", x, op("Sigmoid", x), name="swish"),
    )


@functools.cache  # built once: patterns are reusable, and every WrapType costs memory
def gptoss_block():
    x = reshaped(op("Tile", reshaped(any_input("hidden")), any_input("repeats"), name="tile"))
    gate_up = biased(op("MatMul", x, weight("gate_up"), name="gate_up_matmul"), "gate_up")
    gate = op("Minimum", lane(gate_up, "gate_slice"), any_input("gate_limit"), name="gate_min")
    up = op("Add", op("Clamp", lane(gate_up, "up_slice"), name="up_clamp"), any_input("up_offset"))
    glu = scaled_swish(gate)
    y = biased(op("MatMul", op("Multiply", up, glu), weight("down"), name="down_matmul"), "down")
    dense = op(
        "ScatterElementsUpdate",
        any_input("dense_zeros"),
        reshaped(any_input("topk_indices")),
        reshaped(any_input("routing_weights")),
        const("scatter_axis"),
        name="dense_routing",
    )
    routing = reshaped(op("Transpose", dense, const()))
    return op("ReduceSum", op("Multiply", reshaped(y), routing), const("sum_axis"), name="sum")


def find(model: ov.Model):
    return blocks_or_declines(matches(model, gptoss_block(), "ReduceSum"), _block)


# ---- reading the match ---------------------------------------------------------------------------


def _constant(value: ov.Output, what: str, router: ov.Node) -> np.ndarray:
    """The data of a Constant (optionally behind a Convert) or Decline."""
    node = value.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        raise Decline(f"{what} is not a constant", node, router)
    return np.asarray(node.get_data())


def _scalar(value: ov.Output, what: str, router: ov.Node) -> float:
    """One number held by a Constant, possibly broadcast (every element equal), or Decline."""
    data = _constant(value, what, router).astype(np.float64).reshape(-1)
    if data.size == 0 or not (data == data[0]).all():
        raise Decline(f"{what} is not one value: {np.unique(data)[:4].tolist()}", value.get_node(), router)
    return float(data[0])


def _lane_start(node: ov.Node, width: int, rank: int, router: ov.Node) -> int:
    """Where a stride-2 lane of the [E, T, 2I] gate_up starts (0 or 1); Decline for any other slicing."""
    start, stop, step = (_constant(node.input_value(i), "lane slice bound", router).reshape(-1) for i in (1, 2, 3))
    axes = _constant(node.input_value(4), "lane slice axes", router).reshape(-1) if node.get_input_size() > 4 else None
    if start.size != 1 or (axes is not None and axes.size != 1):
        raise Decline("gate/up lane is sliced along more than one axis", node, router)
    if axes is None or int(axes[0]) % rank != rank - 1:
        raise Decline("gate/up lane is not sliced along the last axis", node, router)
    if int(step[0]) != 2:
        raise Decline(f"gate/up lanes are not interleaved: slice step {int(step[0])}, not 2", node, router)
    if int(start[0]) not in (0, 1) or int(stop[0]) < width:
        raise Decline(f"lane slice [{int(start[0])}:{int(stop[0])}:2] is not a whole lane of {width}", node, router)
    return int(start[0])


def _bias(values: dict, name: str, experts: int, width: int, dtype: np.dtype, router: ov.Node) -> Weight:
    """The `[E, out]` bias of a matched `biased(..., name)`; zeros where the Add was folded away."""
    if name + "_add" not in values:
        return Weight([np.zeros((experts, width), dtype)])
    add = values[name + "_add"].get_node()
    matmul = values[name + "_matmul"]
    source = add.input_value(1) if same(add.input_value(0), matmul) else add.input_value(0)
    data = _constant(source, f"{name} bias", router)
    convert_to = source.get_element_type() if source.get_node().get_type_name() == "Convert" else None
    if data.ndim == 3:  # [E, 1, out]: broadcast over the tokens
        if data.shape[1] != 1:
            raise Decline(f"{name} bias {list(data.shape)} is not one row per expert", add, router)
        data = data[:, 0, :]
    try:
        data = np.broadcast_to(data, (experts, width))
    except ValueError:
        raise Decline(f"{name} bias {list(data.shape)} does not fit [{experts}, {width}]", add, router) from None
    return Weight([data], convert_to)


def _last_dim(value: ov.Output) -> int | None:
    """The last dimension when rank and that dimension are static, else None."""
    shape = value.get_partial_shape()
    return shape[-1].get_length() if shape.rank.is_static and shape.rank.get_length() and shape[-1].is_static else None


def _block(values: dict) -> MoEBlock:
    indices = strip(values["topk_indices"])
    router = indices.get_node()
    if router.get_type_name() != "TopK" or indices.get_partial_shape().rank != ov.Dimension(2):
        raise Decline("selected experts are not a [tokens, top_k] TopK output", router, router)
    dense = values["dense_routing"].get_node()
    if _last_dim(dense.output(0)) is None:  # e.g. a routing matrix reshaped with a dynamic shape
        raise Decline("the dense routing matrix's expert axis is not static", dense, router)
    if int(_scalar(values["scatter_axis"], "scatter axis", router)) not in (1, -1):
        raise Decline("routing is not scattered along the expert axis", dense, router)
    zeros = strip(values["dense_zeros"])
    if zeros.get_node().get_type_name() != "Constant" or np.asarray(zeros.get_node().get_data()).any():
        raise Decline("routing is not scattered into zeros", dense, router)
    if int(_scalar(values["sum_axis"], "sum axis", router)) != 0:
        raise Decline("the sum is not over the expert axis", values["sum"].get_node(), router)

    # Weights: [E, H, 2I] and [E, I, H] whatever transpose_b the conversion left.
    try:
        w_gate_up, gate_up_convert = read_linear(values, "gate_up")
        w_down, down_convert = read_linear(values, "down")
    except ValueError as error:  # transpose_a
        raise Decline(str(error), values["gate_up_matmul"].get_node(), router) from None
    hidden = strip(values["hidden"])
    hidden_size = _last_dim(hidden)
    if hidden_size is None:
        raise Decline("the experts' input has no static hidden size", values["gate_up_matmul"].get_node(), router)
    if w_gate_up.ndim != 3 or w_down.ndim != 3:
        raise Decline("expert weights are not stacked [E, in, out]", values["gate_up_matmul"].get_node(), router)
    experts, _, width = w_gate_up.shape
    repeats = _constant(values["repeats"], "Tile repeats", router).reshape(-1)
    if repeats.size < 1 or int(repeats[0]) != experts or any(int(r) != 1 for r in repeats[1:]):
        # any other tiling hands each expert other rows; the CPU plugin's own MoE fusion ignores the repeats,
        # so neither the proof nor `check` (both on CPU) would see it
        tile = values["tile"].get_node()
        raise Decline(f"hidden states tiled {repeats.tolist()}, not once per expert along tokens", tile, router)

    # The lanes: both Slices of the one gate_up, stride 2, one starting at 0 and the other at 1.
    gate_slice, up_slice = values["gate_slice"].get_node(), values["up_slice"].get_node()
    gate_up = values.get("gate_up_add", values["gate_up_matmul"])
    if not (same(gate_slice.input_value(0), gate_up) and same(up_slice.input_value(0), gate_up)):
        raise Decline("gate and up lanes are not slices of the one gate_up GEMM", gate_slice, router)
    if gate_up.get_partial_shape().rank.is_dynamic:
        raise Decline("gate_up has a dynamic rank", gate_slice, router)
    rank = gate_up.get_partial_shape().rank.get_length()
    gate_idx = _lane_start(gate_slice, width, rank, router)
    if _lane_start(up_slice, width, rank, router) != 1 - gate_idx:
        raise Decline("gate and up lanes overlap: both Slices start at the same column", up_slice, router)
    if w_gate_up.shape[1] != hidden_size or w_down.shape != (experts, width // 2, hidden_size) or width % 2:
        shapes = f"gate_up {list(w_gate_up.shape)}, down {list(w_down.shape)}"
        raise Decline(f"weights {shapes} are not [E, {hidden_size}, 2I] and [E, I, {hidden_size}]", router, router)

    # The clamp: Minimum(limit) on the gate, Clamp(-limit, limit) on the up lane, the same limit.
    limit = _scalar(values["gate_limit"], "gate clamp limit", router)
    clamp = values["up_clamp"].get_node().get_attributes()
    low, high = np.float32(clamp["min"]), np.float32(clamp["max"])
    if low != -high:
        raise Decline(f"up lane clamp [{low}, {high}] is not symmetric", values["up_clamp"].get_node(), router)
    if high != np.float32(limit):
        raise Decline(f"gate limit {limit} and up limit {high} differ", values["up_clamp"].get_node(), router)
    if not 0 < limit < np.inf:
        raise Decline(f"clamp limit {limit} is not a positive number", values["gate_min"].get_node(), router)
    offset = _scalar(values["up_offset"], "up lane offset", router)
    if offset != 1.0:
        raise Decline(f"up lane adds {offset}, not 1", values["up_clamp"].get_node(), router)
    beta = _scalar(values["swish_beta"], "swish beta", router) if "swish_beta" in values else 1.0

    dtype = values["gate_up_matmul"].get_element_type().to_dtype()
    weights = {
        "w_gate_up": Weight([w_gate_up], gate_up_convert),
        "b_gate_up": _bias(values, "gate_up", experts, width, dtype, router),
        "w_down": Weight([w_down], down_convert),
        "b_down": _bias(values, "down", experts, hidden_size, dtype, router),
    }

    # The module's output is the Reshape of the sum back to the input's shape, when there is one.
    output = values["sum"]
    consumers = list(output.get_target_inputs())
    if len(consumers) == 1 and consumers[0].get_node().get_type_name() == "Reshape":
        output = consumers[0].get_node().output(0)
    notes = [] if "gate_up_add" in values and "down_add" in values else ["bias Adds folded away: zero biases"]
    return MoEBlock(
        family=FAMILY,
        router=router,
        hidden=hidden,
        routing_weights=unsliced(strip(values["routing_weights"]), indices),
        topk_indices=indices,
        output=output,
        num_experts=_last_dim(dense.output(0)),
        expert_ids=list(range(experts)),
        weights=weights,
        expert_type=GEMM2_BIAS_SWIGLU_CLAMP,
        expert_alpha=float(np.float32(limit)),
        expert_beta=beta,
        gate_idx=gate_idx,
        notes=notes,
    )


def explain(model: ov.Model, router: ov.Node) -> object:
    """How far this pattern gets from `router` (for `moe-fusion inspect --explain`): dense routing, the sum
    over experts, then up: down (+ bias), (up + 1) * glu, the up lane's Clamp and Slice, the gate lane's
    Swish, Minimum and Slice, the fused gate_up (+ bias) and the Tile it reads."""

    walk = Walk(FAMILY, router)
    walk.down("ScatterElementsUpdate", "dense [T, E] routing scattered at the indices", port=indices_port(router))
    walk.down("Transpose", "routing transposed to [E, T]").down("Multiply", "experts' outputs times routing")
    product = walk.at
    walk.down("ReduceSum", "sum over experts").goto(product)
    walk.up(("Add", "MatMul"), "down projection (+ bias)")
    if walk.ok and walk.at.get_type_name() == "Add":
        walk.up("MatMul", "down projection")
    walk.up("Multiply", "(up + 1) * glu")
    glu = walk.at
    one = "the up lane + 1"
    walk.up("Add", one, when=lambda n: any(is_constant(v, 1.0) for v in n.input_values()))
    walk.up("Clamp", "the up lane clamped to [-limit, limit]").up("Slice", "the up lane: a stride-2 Slice")
    walk.goto(glu).up(("Swish", "Multiply"), "Swish (beta) of the gate lane", when=is_swish)
    walk.up("Minimum", "the gate lane clamped to limit").up("Slice", "the gate lane: a stride-2 Slice")
    walk.up(("Add", "MatMul"), "the fused gate_up projection (+ bias)")
    if walk.ok and walk.at.get_type_name() == "Add":
        walk.up("MatMul", "the fused gate_up projection")
    walk.up("Tile", "hidden states tiled once per expert")
    return walk.trace
