"""`inspect --explain`: for each near miss, the first failing condition and the node where matching stopped.

Every skipped row of the report already names its reason and, for a family's Decline, the node it stopped
at. For a router (a TopK, or PhiMoE's sparsemixer Concat) that no family claimed, or whose family declined
it, each family that defines the optional hook

    def explain(model: ov.Model, router: ov.Node) -> Trace | str

says how far its pattern got from that router. Built-in families follow their pattern's anchors with a
`Walk`: from the router downstream (through layout-only ops) and back upstream into the experts, recording
each anchor met and, at the first one missing, the node found there instead. A user family's hook may
return a plain string instead of a Trace.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from moe_fusion import catalogue
from moe_fusion.fuse import fuse
from moe_fusion.pattern import RESHAPES, strip
from moe_fusion.report import BlockReport, Report

ROUTER_TYPES = ("TopK", "Concat")  # a TopK, or PhiMoE's sparsemixer Concat
IGNORED = ("ShapeOf", "Result")  # consumers that are not data flow to follow


def describe(node: ov.Node | None) -> str:
    """`Type 'name'`, the way Decline reasons name nodes."""
    return f"{node.get_type_name()} '{node.get_friendly_name()}'" if node is not None else ""


@dataclass
class Trace:
    """How far one family's pattern got from a router."""

    family: str
    matched: list[str] = field(default_factory=list)  # anchors met, in order: "what: Type 'name'"
    stopped_at: str = ""  # "Type 'name'": the node found where the next anchor was expected
    expected: str = ""  # the first condition not met; "" when every anchor matched
    note: str = ""  # e.g. "7 of 8 expert slots match"

    def text(self) -> str:
        name = f"{self.family} ({self.note})" if self.note else self.family
        if not self.matched:  # a family's own words (an explain hook returning a string)
            return f"{name}: {self.expected}"
        last = self.matched[-1]
        if not self.expected:
            return f"{name}: every anchor matched, up to {last}"
        where = f", stopped at {self.stopped_at}" if self.stopped_at else ""
        return f"{name}: matched up to {last}{where}: expected {self.expected}"


def _readers(outputs: Iterable[ov.Output]) -> list[ov.Node]:
    """The nodes reading `outputs`, in a stable order (by name: target inputs come as a set)."""
    targets = [t for out in outputs for t in out.get_target_inputs()]
    return [t.get_node() for t in sorted(targets, key=lambda t: (t.get_node().get_friendly_name(), t.get_index()))]


def consumers(node: ov.Node, port: int | None = None) -> list[ov.Node]:
    """The nodes reading `node` (all outputs, or output `port`), looking through layout-only ops."""
    found, seen = [], set()
    queue = _readers(node.outputs() if port is None else [node.output(port)])
    while queue:
        child = queue.pop(0)
        if child.get_instance_id() in seen or child.get_type_name() in IGNORED:
            continue
        seen.add(child.get_instance_id())
        if child.get_type_name() in RESHAPES:
            queue.extend(_readers(child.outputs()))
        else:
            found.append(child)
    return found


def producers(node: ov.Node) -> list[ov.Node]:
    """The non-constant nodes `node` reads, in input order, looking through layout-only ops."""
    nodes = [strip(v).get_node() for v in node.input_values()]
    return [n for n in nodes if n.get_type_name() != "Constant"]


def constant(value: ov.Output) -> np.ndarray | None:
    """The data of a Constant behind layout-only ops, or None."""
    node = strip(value).get_node()
    return np.asarray(node.get_data()) if node.get_type_name() == "Constant" else None


def is_constant(value: ov.Output, number: float) -> bool:
    """A one-element Constant (behind layout-only ops) holding `number`."""
    data = constant(value)
    return data is not None and data.size == 1 and float(data.reshape(-1)[0]) == number


def is_swish(node: ov.Node) -> bool:
    """SiLU/Swish as exporters leave it: a Swish, or x * Sigmoid(...)."""
    kind = node.get_type_name()
    return kind == "Swish" or (kind == "Multiply" and any(n.get_type_name() == "Sigmoid" for n in producers(node)))


def indices_port(router: ov.Node) -> int | None:
    """The router's output holding the selected experts: a TopK's indices; any output otherwise."""
    return 1 if router.get_type_name() == "TopK" else None


class Walk:
    """A family's anchors followed one by one from a router. Each step moves to a neighbour of the current
    node of one of `types` for which `when` holds, or records what was expected and the node found there
    instead; after the first failure, later steps do nothing. Steps chain: `walk.down(...).up(...)`."""

    def __init__(self, family: str, start: ov.Node, what: str = "router") -> None:
        self.trace = Trace(family, [f"{what}: {describe(start)}"])
        self.at: ov.Node | None = start

    @property
    def ok(self) -> bool:
        return not self.trace.expected

    def goto(self, node: ov.Node | None) -> Walk:
        """Continue from an anchor met earlier (a pattern branches)."""
        if self.ok and node is not None:
            self.at = node
        return self

    def down(self, types: str | tuple[str, ...], what: str, *, port: int | None = None,
             when: Callable[[ov.Node], bool] | None = None) -> Walk:
        """Move to a consumer of the current node (its output `port`, or any)."""
        if self.ok:
            self._step(consumers(self.at, port), types, what, when)
        return self

    def up(self, types: str | tuple[str, ...], what: str, *, when: Callable[[ov.Node], bool] | None = None) -> Walk:
        """Move to a non-constant input of the current node."""
        if self.ok:
            self._step(producers(self.at), types, what, when)
        return self

    def fail(self, what: str, node: ov.Node | None) -> Walk:
        if self.ok:
            self.trace.expected, self.trace.stopped_at = what, describe(node)
        return self

    def _step(self, candidates: list[ov.Node], types, what: str, when) -> None:
        types = (types,) if isinstance(types, str) else types
        for node in candidates:
            if node.get_type_name() in types and (when is None or when(node)):
                self.at = node
                self.trace.matched.append(f"{what}: {describe(node)}")
                return
        # where matching stopped: the first neighbour that is not of the expected kind, else the first one
        others = [n for n in candidates if n.get_type_name() not in types]
        self.fail(what, (others or candidates or [self.at])[0])


# ---- the report, explained --------------------------------------------------------------------------


@dataclass
class Explanation:
    """One near miss: its report row, the first failing condition, where it stopped, and each family's
    trace from its router."""

    row: BlockReport
    traces: list[Trace] = field(default_factory=list)

    @property
    def condition(self) -> str:
        reason = self.row.reason
        suffix = f" (at {self.row.stopped_at})"
        return reason[: -len(suffix)] if self.row.stopped_at and reason.endswith(suffix) else reason

    def to_dict(self) -> dict:
        return {
            "condition": self.condition,
            "stopped_at": self.row.stopped_at,
            "families": [asdict(t) for t in self.traces],
        }

    def text(self) -> str:
        family = self.row.family if self.row.family != "-" else "no family"
        lines = [f"{self.row.name}  ({family})", f"  condition:  {self.condition}"]
        if self.row.stopped_at:
            lines.append(f"  stopped at: {self.row.stopped_at}")
        lines += [f"  {t.text()}" for t in self.traces]
        return "\n".join(lines)


def family_trace(family, model: ov.Model, router: ov.Node) -> Trace | None:
    """A family's own account of how far it got from `router`, or None if it defines no `explain`."""
    hook = getattr(family, "explain", None)
    if hook is None:
        return None
    name = getattr(family, "FAMILY", "?")
    try:
        result = hook(model, router)
    except Exception as error:  # a user's hook may fail in any way: say so in its line
        return Trace(name, expected=f"its explain() failed: {type(error).__name__}: {error}")
    return result if isinstance(result, Trace) else Trace(name, expected=str(result))


def _router(model: ov.Model, name: str) -> ov.Node | None:
    if not name:
        return None
    found = [n for n in model.get_ordered_ops() if n.get_friendly_name() == name]
    return next((n for n in found if n.get_type_name() in ROUTER_TYPES), found[0] if found else None)


def explain(model: ov.Model, patterns: Iterable[str | Path] = ()) -> tuple[Report, list[Explanation]]:
    """`inspect`'s report (nothing is changed) and one Explanation per skipped row. The families traced
    from its router are every family for a router none claimed, else the family that declined it."""
    report = fuse(model, patterns=patterns, dry_run=True)
    families = catalogue.load(patterns)
    explanations = []
    for row in report.skipped:
        router = _router(model, row.router_node)
        traces = []
        if router is not None:
            chosen = [f for f in families if row.family in ("-", f.FAMILY)]
            traces = [t for t in (family_trace(f, model, router) for f in chosen) if t is not None]
        explanations.append(Explanation(row, traces))
    return report, explanations


def to_json(report: Report, explanations: list[Explanation]) -> str:
    """The report's JSON with an `explain` object on every skipped block."""
    data = json.loads(report.to_json())
    by_row = {id(e.row): e for e in explanations}
    for block, row in zip(data["blocks"], report.blocks, strict=True):
        if id(row) in by_row:
            block["explain"] = by_row[id(row)].to_dict()
    return json.dumps(data, indent=2)


def text(report: Report, explanations: list[Explanation]) -> str:
    """The report's table, then one paragraph per near miss."""
    if not explanations:
        return report.table() + "\n\nevery block found would fuse: nothing to explain"
    return "\n\n".join([report.table(), "why not fused:", *(e.text() for e in explanations)])
