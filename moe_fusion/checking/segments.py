"""A model cut into segments at its MoE blocks, so `check --mode layers` compiles one layer at a time.

Segment k+1 starts at the node producing MoE block k's hidden input (its *anchor*) and runs to just
before the next anchor: one layer's MoE block, the residual add after it, the next layer's attention.
Every node lands in the segment of its latest input (`max`), anchors at least in their own, so values
only flow forward; nodes computed from Constants alone are copied into each segment that reads them,
the model's Parameters are inputs of every segment that reads them, and a ReadValue joins the segment
of its Assign so each KV-cache variable lives in one compiled segment. A value produced in one segment
and read in a later one is a *cut*: an output of the first, an input of the second, named
`<friendly name>:<port>` so the same value is found in the fused model (fusing and lowering keep every
node outside the MoE blocks, names included).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import openvino as ov
import openvino.opset14 as ops

from moe_fusion import catalogue
from moe_fusion.candidates import candidates
from moe_fusion.graph import output_name

FREE = -1  # computed from Constants only: belongs to every segment that reads it


@dataclass
class Segment:
    index: int
    model: ov.Model  # inputs: `inputs` in order; outputs: `outputs` in order
    inputs: list[str]  # model Parameter names, or cut keys
    outputs: list[str]  # output_key(i) for the model's i-th output, or cut keys


def cut_key(value: ov.Output) -> str:
    """A cut's name, the same in the original and the fused model: `<friendly name>:<port>`."""
    return f"{value.get_node().get_friendly_name()}:{value.get_index()}"


def output_key(index: int) -> str:
    """The model's `index`-th output, named by position (the fused model's tensor names may differ)."""
    return f"@output{index}"


def anchors(original: ov.Model) -> list[str]:
    """Names of the nodes producing each MoE block's hidden input, as the fusing engine finds the blocks."""
    blocks, _ = candidates(original, catalogue.load(()))
    return [b.hidden.get_node().get_friendly_name() for b in blocks]


def _variable(node: ov.Node) -> str:
    return str(node.get_attributes().get("variable_id", node.get_friendly_name()))


def assign(model: ov.Model, anchor_names: list[str]) -> dict[int, int]:
    """Segment of every node (instance id -> index; FREE for Constant-only values, 0 for Parameters)."""
    order = model.get_ordered_ops()
    names = [n.get_friendly_name() for n in order]
    duplicated = {a for a in anchor_names if names.count(a) != 1}
    if duplicated:
        raise ValueError(f"cannot cut the model at its MoE blocks: node name(s) {sorted(duplicated)} "
                         "are not found exactly once")
    floor = {a: k + 1 for k, a in enumerate(anchor_names)}
    variable_floor: dict[str, int] = {}
    for _ in range(8):  # a ReadValue moves to its Assign's segment; repeat until nothing moves
        seg: dict[int, int] = {}
        for node in order:
            kind = node.get_type_name()
            inputs = [seg[v.get_node().get_instance_id()] for v in node.input_values()]
            if kind == "Constant" or (inputs and all(s == FREE for s in inputs) and kind not in ("ReadValue",)):
                s = FREE
            else:
                s = max([0, *inputs])
            if kind == "ReadValue":
                s = max(s, variable_floor.get(_variable(node), 0))
            if kind != "Parameter" and node.get_friendly_name() in floor:
                s = max(s, floor[node.get_friendly_name()])
            seg[node.get_instance_id()] = s
        moved = {_variable(n): seg[n.get_instance_id()] for n in order if n.get_type_name() == "Assign"}
        if moved == variable_floor:
            return seg
        variable_floor = moved
    raise ValueError("cannot cut the model at its MoE blocks: its state variables do not settle in one segment")


class Segments:
    """The segments of `model` cut at `anchor_names`: `count` of them, built one at a time when iterated
    (each a standalone clone; the model itself is left as it was)."""

    def __init__(self, model: ov.Model, anchor_names: list[str]) -> None:
        self.model = model
        self.sid = assign(model, anchor_names)
        order = model.get_ordered_ops()
        last = max([0, *self.sid.values()])
        self.results: dict[int, list] = {s: [] for s in range(last + 1)}
        for i, result in enumerate(model.get_results()):  # named by position: the fused model's may differ
            value = result.input_value(0)
            self.results[max(0, self.sid[value.get_node().get_instance_id()])].append((output_key(i), value))
        self.cuts: dict[int, dict[str, ov.Output]] = {s: {} for s in self.results}  # made in s, read later
        self.reads: dict[int, dict[str, ov.Output]] = {s: {} for s in self.results}  # read in s, made earlier
        for node in order:
            s = self.sid[node.get_instance_id()]
            for value in node.input_values():
                p = self.sid[value.get_node().get_instance_id()]
                if s == FREE or p in (FREE, s) or value.get_node().get_type_name() == "Parameter":
                    continue
                self.cuts[p][cut_key(value)] = value
                self.reads[s][cut_key(value)] = value
        self.sinks = {s: [n for n in model.get_sinks() if self.sid[n.get_instance_id()] == s] for s in self.results}
        self.indices = [s for s in self.results if self.results[s] or self.cuts[s] or self.sinks[s]]

    @property
    def count(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[Segment]:
        for s in self.indices:
            outputs = [*self.results[s], *self.cuts[s].items()]
            yield _cut(self.model, s, self.reads[s], outputs, self.sinks[s], self.sid)


def _cut(model: ov.Model, s: int, reads: dict[str, ov.Output], outputs: list, sinks: list, sid: dict) -> Segment:
    """Segment `s` as its own model: values from earlier segments become Parameters (rewired for the
    moment of cloning, then restored)."""
    rewired, params, names = [], [], []
    for name, value in reads.items():
        param = ops.parameter(value.get_partial_shape(), value.get_element_type(), name=name)
        params.append(param)
        names.append(name)
        for target in list(value.get_target_inputs()):
            if sid.get(target.get_node().get_instance_id()) in (s, FREE):
                target.replace_source_output(param.output(0))
                rewired.append((target, value))
    try:
        used = [p for p in model.get_parameters()
                if any(sid.get(t.get_node().get_instance_id()) == s for t in p.output(0).get_target_inputs())]
        result_values = [v for _, v in outputs]
        cut_model = ov.Model(result_values, sinks, [*used, *params], f"segment{s}").clone()
    finally:
        for target, value in rewired:
            target.replace_source_output(value)
    inputs = [output_name(p.output(0)) for p in used] + names
    return Segment(s, cut_model, inputs, [n for n, _ in outputs])
