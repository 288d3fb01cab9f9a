"""Broken exports: MoE graphs that can only come from a trace that froze data-dependent routing.

`torch.jit.trace` (under `openvino.convert_model`) records one run of the model's Python. MoE code that
loops over the experts the input hit, or turns routing counts into Python numbers (`.tolist()`,
`.item()`), leaves an IR that is right for the example input only. No rewrite can repair it: the weights
of the lost experts may be in the file, but the graph no longer routes tokens to them. These checks find
the traces of that, so the report says the *model* is wrong and how to convert it instead:

- **hit-expert loop** (e.g. transformers 5 `eager` experts): `expert_hit = (one_hot(ids).sum(...) > 0).nonzero()`
  iterated in Python: a Split of that NonZero into N pieces, N the experts the example input hit. Other
  inputs fail (`Split ... dimension_at_axis % num_splits`) or silently lose experts.
- **constant expert ids**: the one-hot mask read at constant expert ids that do not cover 0..E-1 (a loop
  over a traced `.item()` / `.tolist()` of expert ids).
- **frozen split sizes** (JetMoE, GraniteMoE-shared `ParallelExperts`: `expert_size.tolist()`): the routed
  rows split per expert with constant sizes, on a dynamic number of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import openvino as ov

from moe_fusion.block import block_name, module_path
from moe_fusion.graph import constant_data
from moe_fusion.report import BlockReport

BATCHED_MM = (
    "convert it again with every expert in the graph: call model.set_experts_implementation(\"batched_mm\") "
    "(transformers >= 5) before openvino.convert_model, or export with optimum-intel (docs/converting.md)"
)
FROZEN = (
    "this architecture's MoE code turns routing counts into Python numbers, so no experts switch helps: patch "
    "its experts to split by tensors (as optimum-intel does for GraniteMoE) or export with optimum-intel where "
    "it supports the architecture (docs/converting.md)"
)
LOOP_OVER_HIT = (
    "the MoE code loops over the hit experts as Python numbers (.item(), .tolist(), or a skip of empty experts): "
    "convert with transformers >= 5 and model.set_experts_implementation(\"batched_mm\") where the "
    "architecture's experts support it, otherwise patch the loop to run every expert (docs/converting.md)"
)
# Likely causes, said after the evidence: the graph shows what is wrong, not how it was made.
HIT_LOOP_CAUSE = (
    "a trace of MoE code that loops over the experts its example input hit (transformers 5's `eager` experts "
    "under openvino.convert_model do)"
)
CONSTANT_IDS_CAUSE = (
    "a trace that froze the expert ids its example input hit (a loop over `.item()` / `.tolist()` of expert "
    "ids), or an edit of the graph that dropped or duplicated an expert"
)
FROZEN_CAUSE = "a trace that froze the routing counts as Python numbers (`expert_size.tolist()`)"
_PLUMBING = ("Convert", "Reshape", "Squeeze", "Unsqueeze", "Transpose", "ReduceSum", "Greater", "NotEqual")


@dataclass
class Finding:
    """One broken MoE block: the evidence first (what the graph does wrong, read from the graph itself),
    then the likely cause (a guess from the graph's shape: the model may come from anywhere), then how
    to convert it correctly."""

    node: ov.Node  # where the evidence is
    problem: str  # the evidence: what is wrong with the model, e.g. "experts [3] of 8 are never computed"
    cause: str  # how such a graph usually comes about
    fix: str  # how to convert it correctly

    @property
    def message(self) -> str:
        return f"{self.problem}; likely cause: {self.cause}; {self.fix}"


def _one_hot_above(value: ov.Output, depth: int = 8) -> ov.Node | None:
    """The OneHot a value is computed from through mask plumbing (permute, sum, > 0, reshapes), if any."""
    for _ in range(depth):
        node = value.get_node()
        if node.get_type_name() == "OneHot":
            return node
        if node.get_type_name() not in (*_PLUMBING, "NonZero", "Gather"):
            return None
        value = node.input_value(0)
    return None


def _experts(one_hot: ov.Node) -> int:
    depth = constant_data(one_hot.input_value(1))
    return int(depth.reshape(-1)[0]) if depth is not None and depth.size == 1 else 0


def _hit_expert_loops(model: ov.Model) -> list[Finding]:
    """NonZero of the experts-hit mask split into a fixed number of pieces: one loop body per hit expert."""
    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() not in ("Split", "VariadicSplit"):
            continue
        source = node.input_value(0)
        while source.get_node().get_type_name() in ("Reshape", "Transpose", "Squeeze", "Convert"):
            source = source.get_node().input_value(0)
        nonzero = source.get_node()
        if nonzero.get_type_name() != "NonZero":
            continue
        one_hot = _one_hot_above(nonzero.input_value(0))
        # only the per-expert hit mask (reduced over tokens and slots), not torch.where of one expert's rows
        reduced = any(n.get_type_name() == "ReduceSum" for n in _chain(nonzero.input_value(0), one_hot))
        experts = _experts(one_hot) if one_hot is not None else 0
        if not experts or not reduced:
            continue
        pieces = node.get_output_size()
        found.append(Finding(node, f"the loop over experts is unrolled for {pieces} of {experts} experts (a "
                             f"{node.get_type_name()} of the experts-hit mask into {pieces} pieces): inputs that "
                             "hit fewer fail to run ('Split ... dimension_at_axis % num_splits'), inputs that hit "
                             "others silently lose them", HIT_LOOP_CAUSE, BATCHED_MM))
    return found


def _chain(value: ov.Output, stop: ov.Node | None) -> list[ov.Node]:
    nodes = []
    while stop is not None and value.get_node().get_instance_id() != stop.get_instance_id():
        nodes.append(value.get_node())
        value = value.get_node().input_value(0)
    return nodes


def _constant_expert_ids(model: ov.Model) -> list[Finding]:
    """The one-hot expert mask read at constant expert ids that leave some experts out."""
    ids: dict[int, tuple[ov.Node, int, set[int]]] = {}
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Gather":
            continue
        one_hot = _one_hot_above(node.input_value(0), depth=3)
        index, axis = constant_data(node.input_value(1)), constant_data(node.input_value(2))
        if one_hot is None or index is None or axis is None or index.size != 1 or int(axis.reshape(-1)[0]) != 0:
            continue
        experts = _experts(one_hot)
        if experts:
            entry = ids.setdefault(one_hot.get_instance_id(), (node, experts, set()))
            entry[2].add(int(index.reshape(-1)[0]))
    found = []
    for node, experts, seen in ids.values():
        missing = sorted(set(range(experts)) - seen)
        if missing:
            kept = sorted(seen)
            found.append(Finding(node, f"experts {missing} of {experts} are never computed: the expert mask is "
                                 f"read only at constant expert ids {kept}, so tokens routed to the others get "
                                 "nothing", CONSTANT_IDS_CAUSE, LOOP_OVER_HIT))
    return found


def _frozen_splits(model: ov.Model) -> list[Finding]:
    """Routed rows (a dynamic count) split per expert by constant sizes: counts frozen at trace time."""
    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "VariadicSplit" or node.get_output_size() < 2:
            continue
        axis, lengths = constant_data(node.input_value(1)), constant_data(node.input_value(2))
        shape = node.get_input_partial_shape(0)
        if axis is None or lengths is None or shape.rank.is_dynamic or int(axis.reshape(-1)[0]) != 0:
            continue
        if not shape[0].is_dynamic or (lengths < 0).any():  # a dynamic row count split by constants
            continue
        if not any(o.get_target_inputs() and _feeds_matmul(node, i) for i, o in enumerate(node.outputs())):
            continue
        sizes = lengths.reshape(-1).tolist()
        idle = [i for i, size in enumerate(sizes) if size == 0]
        never = f"; experts {idle} got no rows at trace time and never run" if idle else ""
        found.append(Finding(node, f"the rows routed to each expert are split with constant sizes {sizes} "
                             f"(the example input's {sum(sizes)} routed rows), not the router's counts: the "
                             f"model runs only on inputs routed exactly like the example{never}", FROZEN_CAUSE,
                             FROZEN))
    return found


def _feeds_matmul(node: ov.Node, port: int) -> bool:
    return any(t.get_node().get_type_name() == "MatMul" for t in node.output(port).get_target_inputs())


def findings(model: ov.Model) -> list[Finding]:
    """Every trace of frozen routing in `model` (empty for a sound export)."""
    return _hit_expert_loops(model) + _constant_expert_ids(model) + _frozen_splits(model)


def attribute(found: list[Finding], routers: dict[str, ov.Node | None]) -> dict[str, list[Finding]]:
    """Each finding to the report row (key) whose router shares the longest module path with it; findings
    no row claims come back under the finding's own module path."""
    by_row: dict[str, list[Finding]] = {}
    for finding in found:
        best, depth = None, 0
        for key, router in routers.items():
            common = block_name(router, finding.node) if router is not None else "(top level)"
            if common != "(top level)" and len(common) > depth:
                best, depth = key, len(common)
        by_row.setdefault(best if best is not None else module_path(finding.node) or "(top level)", []).append(finding)
    return by_row


def summary(found: list[Finding]) -> str:
    """One line per distinct problem, e.g. for `check`."""
    problems = {f.problem.split(":")[0] for f in found}
    return (f"broken export ({len(found)} MoE block(s)): " + "; ".join(sorted(problems))
            + f"; likely cause: {found[0].cause}; {found[0].fix}")


def mark(model: ov.Model, rows: list) -> list:
    """Name broken exports in the report: each skipped row (`BlockReport`) a finding is attributed to gets
    the reason "broken export: ..." and `broken_export` set; returns new rows for findings no row claims."""
    found = findings(model)
    if not found:
        return []
    nodes = {n.get_friendly_name(): n for n in model.get_ordered_ops()}
    by_name = {row.name: row for row in rows}
    routers = {row.name: nodes.get(row.router_node) for row in rows}
    extra = []
    for key, mine in attribute(found, routers).items():
        row = by_name.get(key)
        if row is None:
            row = BlockReport(key, "-", "skipped", router_node="")
            extra.append(row)
        problems = list(dict.fromkeys(f.problem for f in mine))
        row.broken_export = "; ".join(problems) + f"; likely cause: {mine[0].cause}; {mine[0].fix}"
        row.reason = "broken export: " + row.broken_export
        row.stopped_at = f"{mine[0].node.get_type_name()} '{mine[0].node.get_friendly_name()}'"
    return extra
