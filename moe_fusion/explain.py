"""`inspect --explain`: for each near miss, the first failing condition and the node where matching stopped.

Every skipped row of the report already names its reason and, for a family's Decline, the node it stopped
at. For a router (a TopK, or PhiMoE's sparsemixer Concat) that no family claimed, or whose family declined
it, each family that defines the optional hook

    def explain(model: ov.Model, router: ov.Node) -> Trace | str

says how far its pattern got from that router (`moe_fusion.trace`: the `Walk` built-in families follow
their anchors with, and the `Trace` it records). A user family's hook may return a plain string instead.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import openvino as ov

from moe_fusion import catalogue
from moe_fusion.fusing import fuse
from moe_fusion.report import BlockReport, Report

# What a family's explain hook is written with, also reachable here (where earlier versions defined it).
from moe_fusion.trace import Trace as Trace
from moe_fusion.trace import Walk as Walk

ROUTER_TYPES = ("TopK", "Concat")  # a TopK, or PhiMoE's sparsemixer Concat


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

