"""F5: GraniteMoE's sort-and-slice block (transformers 4.5x and 5, both optimum-intel generations): the
token-expert slots are sorted by expert, each expert's run of rows is sliced out, and one Concat per
linear layer puts the results back together:

    order = selected_experts.flatten().sort()            # slots grouped by expert id
    tokens = order // K
    x = hidden_states[tokens]
    h = cat([x[start[e]:end[e]] @ input_linear[e].T for e in range(E)])     # [T*K, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = cat([(act(gate) * up)[start[e]:end[e]] @ output_linear[e].T for e in range(E)])
    out = zeros.index_add(0, tokens, y * gates.flatten()[order, None])

with `end = cumsum(expert_size)`, `start` the previous `end`. The runs are proven to be experts 0..E-1 in
order from the graph itself: slice e ends at `start[e] + expert_size[e]`.
"""

from __future__ import annotations

import functools

import numpy as np

from moe_fusion.block import Decline, MoEBlock, Weight, blocks_or_declines
from moe_fusion.compressed import Compressed
from moe_fusion.graph import constant_data
from moe_fusion.pattern import (
    any_input,
    const,
    match,
    matches,
    op,
    read_linear,
    reshaped,
    same,
    strip,
    swish_beta,
    weight,
)
from moe_fusion.trace import Walk, indices_port

FAMILY = "sort_and_slice"


@functools.cache  # built once: patterns are reusable, and every WrapType costs memory
def combine():
    """`zeros.index_add(0, tokens, y * gates.flatten()[order, None])`, y the down projections' Concat."""
    slot_gates = op("Gather", reshaped(any_input("routing_weights")), reshaped(any_input("order")), const())
    weighted = op("Multiply", op("Concat", name="down_cat"), reshaped(slot_gates))
    return op(
        "ScatterElementsUpdate",
        reshaped(any_input("accumulator")),
        reshaped(any_input("tokens")),
        reshaped(weighted),
        const("axis"),
        name="index_add",
    )


def expert_run(rows, name: str):
    """One expert's linear layer on its run of rows: `rows[start:end] @ W.T`."""
    run = op("Slice", rows, any_input("start"), any_input("end"), const("step"), const("slice_axis"), name="slice")
    return op("MatMul", run, weight(name), name=name + "_matmul")


def activation():
    """`act(gate) * up` with `gate, up = h.chunk(2, dim=-1)`."""
    chunks = op("VariadicSplit", any_input("gate_up"), const("chunk_axis"), any_input(), name="chunks")
    return op("Multiply", op("Swish", chunks, name="swish"), chunks)


@functools.cache
def _down_run():
    return expert_run(activation(), "down")


@functools.cache
def _gate_up_run():
    return expert_run(reshaped(any_input("rows")), "gate_up")


def find(model):
    return blocks_or_declines(matches(model, combine(), "ScatterElementsUpdate"), _block)


def _constant(value) -> np.ndarray | None:
    data = constant_data(value)
    return None if data is None else data.reshape(-1)


def _same_value(a, b) -> bool:
    """One graph value, or two Constants holding the same numbers."""
    if same(a, b):
        return True
    x, y = _constant(a), _constant(b)
    return x is not None and y is not None and np.array_equal(x, y)


def _router(values: dict):
    """The router TopK, from the sort: `order` must be the full ascending sort of its flattened indices."""
    sort = strip(values["order"]).get_node()
    if sort.get_type_name() != "TopK" or sort.get_attributes()["mode"] != "min":
        raise Decline("slot order is not an ascending sort", sort)
    selected = strip(sort.input_value(0))
    router = selected.get_node()
    if router.get_type_name() != "TopK" or selected.get_index() != 1:
        raise Decline("the sorted slots are not a router's top-k indices", router)
    if strip(sort.input_value(1)).get_node().get_type_name() != "ShapeOf":
        raise Decline("the sort does not keep every slot", sort, router)
    return sort, router


def _block(values: dict) -> MoEBlock:
    sort, router = _router(values)
    k_dim, scores = router.get_output_partial_shape(1), router.get_input_partial_shape(0)
    if k_dim.rank.is_dynamic or k_dim[-1].is_dynamic or scores.rank.is_dynamic or scores[-1].is_dynamic:
        raise Decline("the router's top-k or expert count is not static", router, router)
    top_k = k_dim[-1].get_length()
    scatter = values["index_add"].get_node()
    if scatter.get_attributes()["reduction"] != "sum" or list(_constant(values["axis"])) != [0]:
        raise Decline("slots are not summed into their tokens (index_add along dim 0)", scatter, router)
    accumulator = _constant(values["accumulator"])
    if accumulator is None or np.any(accumulator):
        raise Decline("slots are not accumulated into zeros", scatter, router)
    # tokens = order // K, read through the exporter's casts
    tokens = strip(values["tokens"]).get_node()
    if (
        tokens.get_type_name() != "Divide"
        or not same(strip(tokens.input_value(0)), sort.output(1))
        or _constant(tokens.input_value(1)) is None
        or list(_constant(tokens.input_value(1))) != [top_k]
    ):
        raise Decline("accumulated rows are not order // top_k", tokens, router)

    # Down projections: one run per Concat input; their rows come from act(gate) * up.
    down = [match(_down_run(), v) for v in values["down_cat"].get_node().input_values()]
    if any(d is None for d in down):
        raise Decline("a Concat input is not an expert's output_linear on its run of rows", scatter, router)
    act = down[0]
    if not all(same(d["chunks"], act["chunks"]) for d in down):
        raise Decline("experts read different activations", values["down_cat"].get_node(), router)
    chunks = act["chunks"].get_node()
    if list(_constant(act["chunk_axis"])) not in ([-1], [1]):
        raise Decline("gate_up is not chunked along its last dimension", chunks, router)
    if act["swish"].get_node().input_value(0).get_index() != 0:
        raise Decline("the activation is applied to the second chunk", chunks, router)
    gate_up_cat = strip(act["gate_up"]).get_node()
    if gate_up_cat.get_type_name() != "Concat":
        raise Decline("gate_up is not a Concat of per-expert runs", gate_up_cat, router)
    gate_up = [match(_gate_up_run(), v) for v in gate_up_cat.input_values()]
    if any(g is None for g in gate_up) or len(gate_up) != len(down):
        raise Decline("a Concat input is not an expert's input_linear on its run of rows", gate_up_cat, router)

    rows = strip(gate_up[0]["rows"]).get_node()
    if rows.get_type_name() != "Gather" or not same(strip(rows.input_value(1)), strip(values["tokens"])):
        raise Decline("experts do not read hidden_states[order // top_k]", rows, router)
    _check_runs(gate_up, down, router)

    parts: dict[str, list] = {"w_gate": [], "w_up": [], "w_down": []}
    convert = set()
    for g, d in zip(gate_up, down, strict=True):
        w_gate_up, gate_up_type = read_linear(g, "gate_up")  # [H, 2I], gate lanes first (chunk)
        w_down, down_type = read_linear(d, "down")
        if isinstance(w_gate_up, Compressed):  # splitting gate from up would need Slices of the decompressed weight
            raise Decline("integer-compressed fused gate_up weights are not split yet", gate_up_cat, router)
        half = w_gate_up.shape[-1] // 2
        parts["w_gate"].append(w_gate_up[:, :half])
        parts["w_up"].append(w_gate_up[:, half:])
        parts["w_down"].append(w_down)
        convert |= {gate_up_type, down_type}
    if len(convert) != 1:
        raise Decline("experts' weights differ in precision", gate_up_cat, router)
    convert_to = convert.pop()
    beta = swish_beta(act)
    return MoEBlock(
        family=FAMILY,
        router=router,
        hidden=strip(rows.input_value(0)),
        routing_weights=strip(values["routing_weights"]),
        topk_indices=router.output(1),
        output=scatter.output(0),
        num_experts=router.input_value(0).get_partial_shape()[-1].get_length(),
        expert_ids=list(range(len(down))),
        weights={name: Weight(p, convert_to) for name, p in parts.items()},
        expert_beta=beta,
    )


def _check_runs(gate_up: list[dict], down: list[dict], router) -> None:
    """Run e of both layers is `[end[e-1], end[e])` on axis 0 with step 1, `end[e] = end[e-1] + count[e]`,
    all counts read from one per-expert histogram: so Concat position e is expert e."""
    counts = None
    previous_end = None
    for e, (g, d) in enumerate(zip(gate_up, down, strict=True)):
        slice_node = g["slice"].get_node()
        if not (_same_value(g["start"], d["start"]) and _same_value(g["end"], d["end"])):
            raise Decline(f"expert {e}'s two layers slice different rows", d["slice"].get_node(), router)
        for run in (g, d):
            if list(_constant(run["step"])) != [1] or list(_constant(run["slice_axis"])) != [0]:
                raise Decline(f"expert {e}'s run is not a contiguous row range", run["slice"].get_node(), router)
        start = _constant(g["start"])
        if (e == 0 and (start is None or list(start) != [0])) or (e > 0 and not same(g["start"], previous_end)):
            raise Decline(f"expert {e}'s run does not start where expert {e - 1}'s ends", slice_node, router)
        end = strip(g["end"]).get_node()
        count = end if e == 0 else end.input_value(1).get_node() if end.get_type_name() == "Add" else None
        if e > 0 and (count is None or not same(strip(end.input_value(0)), strip(previous_end))):
            raise Decline(f"expert {e}'s run length is not added to the previous end", slice_node, router)
        if count is None or count.get_type_name() != "Gather" or list(_constant(count.input_value(1))) != [e]:
            raise Decline(f"expert {e}'s run length is not expert_size[{e}]", slice_node, router)
        histogram = strip(count.input_value(0))
        if counts is not None and not same(histogram, counts):
            raise Decline(f"expert {e}'s run length comes from another histogram", slice_node, router)
        counts, previous_end = histogram, g["end"]
    _check_histogram(counts, router)


def _check_histogram(counts, router) -> None:
    """`expert_size = zeros(T, E).scatter(1, selected_experts, 1).sum(0)`: slots per expert."""
    total = counts.get_node()
    one_hot = strip(total.input_value(0)).get_node()
    if (
        total.get_type_name() != "ReduceSum"
        or list(_constant(total.input_value(1))) != [0]
        or one_hot.get_type_name() != "ScatterElementsUpdate"
        or not same(strip(one_hot.input_value(1)), router.output(1))
    ):
        raise Decline("run lengths are not the per-expert slot counts of the router's selection", total, router)


def explain(model, router) -> object:
    """How far this pattern gets from `router` (for `moe-fusion inspect --explain`), along expert 0's run:
    ascending sort of the indices, order // K, the rows gathered, the run sliced, input_linear, Concat,
    chunk, Swish, times up, the run of the activation, output_linear, Concat, times routing, index_add_."""

    walk = Walk(FAMILY, router)
    walk.down("TopK", "ascending sort of the selected experts", port=indices_port(router),
              when=lambda n: n.get_attributes()["mode"] == "min")
    walk.down("Divide", "slot order // top-k: the tokens", port=1).down("Gather", "hidden_states[tokens]")
    walk.down("Slice", "expert 0's run of rows").down("MatMul", "input_linear on the run")
    walk.down("Concat", "the runs put back together").down("VariadicSplit", "gate_up chunked in two")
    walk.down("Swish", "Swish (SiLU) of the gate chunk").down("Multiply", "activation times up chunk")
    walk.down("Slice", "expert 0's run of the activation").down("MatMul", "output_linear on the run")
    walk.down("Concat", "the runs put back together").down("Multiply", "times the routing weights")
    walk.down("ScatterElementsUpdate", "index_add_ into the tokens")
    return walk.trace
