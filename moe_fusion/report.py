"""What `fuse` and `inspect` tell the user: one row per MoE block, fused or skipped with the reason."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field


@dataclass
class BlockReport:
    name: str
    family: str
    status: str  # "fused" | "skipped" | "fusable" (inspect)
    reason: str = ""
    expert_type: str = ""
    num_experts: int = 0
    top_k: int = 0
    hidden: int = 0
    intermediate: int = 0
    router: str = ""
    shared_expert: bool = False
    max_abs_error: float | None = None
    experts_covered: int | None = None  # experts the proof ran and compared, routed or forced
    experts_routed: int | None = None  # of those, the ones the block's own router selected
    proof_notes: list[str] = field(default_factory=list)
    router_node: str = ""  # the router's node name (TopK, or PhiMoE's sparsemixer Concat)
    stopped_at: str = ""  # skipped: "Type 'name'" of the node where matching stopped
    broken_export: str = ""  # the export froze data-dependent routing: what is wrong and how to convert it


@dataclass
class Report:
    blocks: list[BlockReport] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def fused(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "fused"]

    @property
    def skipped(self) -> list[BlockReport]:
        return [b for b in self.blocks if b.status == "skipped"]

    def to_json(self) -> str:
        return json.dumps({"blocks": [asdict(b) for b in self.blocks], "seconds": round(self.seconds, 3)}, indent=2)

    def table(self) -> str:
        header = ("block", "family", "experts", "top-k", "hidden", "inter", "router", "status")
        rows = [header] + [
            (
                b.name,
                b.family,
                str(b.num_experts or "-"),
                str(b.top_k or "-"),
                str(b.hidden or "-"),
                str(b.intermediate or "-"),
                b.router or "-",
                b.status + (f": {b.reason}" if b.reason else ""),
            )
            for b in self.blocks
        ]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header) - 1)]
        return "\n".join(
            "  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows
        )
