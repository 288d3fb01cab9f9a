"""How far a family's pattern got from a router, for `inspect --explain`: the `Walk` a family's optional
`explain(model, router)` hook follows its anchors with, and the `Trace` it returns. Families import this
(the match tier); the explain command (moe_fusion.explain) only collects and prints the traces.

A Walk goes from the router downstream (through layout-only ops) and back upstream into the experts,
recording each anchor met and, at the first one missing, the node found there instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import openvino as ov

from moe_fusion.graph import LAYOUT, constant_data, describe, strip

constant = constant_data  # a family's explain hook reads small constants (expert ids, bounds) with it

IGNORED = ("ShapeOf", "Result")  # consumers that are not data flow to follow


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
        if child.get_type_name() in LAYOUT:
            queue.extend(_readers(child.outputs()))
        else:
            found.append(child)
    return found


def producers(node: ov.Node) -> list[ov.Node]:
    """The non-constant nodes `node` reads, in input order, looking through layout-only ops."""
    nodes = [strip(v).get_node() for v in node.input_values()]
    return [n for n in nodes if n.get_type_name() != "Constant"]


def is_constant(value: ov.Output, number: float) -> bool:
    """A one-element Constant (behind layout-only ops) holding `number`."""
    data = constant_data(value)
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

