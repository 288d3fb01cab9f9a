"""Finding the MoE blocks of a model: every family's matches and near misses, one block per router, and
whether a matched block is complete (experts 0..E-1 once each, shapes that agree)."""

from __future__ import annotations

import openvino as ov

from moe_fusion import router
from moe_fusion.block import WEIGHT_NAMES, Decline, MoEBlock, block_name, has_shared_expert, module_path
from moe_fusion.graph import describe, same
from moe_fusion.report import BlockReport


def block_row(block: MoEBlock, status: str, reason: str = "") -> BlockReport:
    """The report row of a matched block."""
    return BlockReport(
        name=block.name,
        family=block.family,
        status=status,
        reason=reason,
        expert_type=block.expert_type,
        num_experts=block.num_experts,
        top_k=block.top_k,
        hidden=block.hidden_size,
        intermediate=block.intermediate_size,
        router=router.describe(block.routing_weights, block.topk_indices, block.weights_on_input),
        shared_expert=block.shared_expert or has_shared_expert(block.output, block.hidden),
        router_node=block.router.get_friendly_name(),
        stopped_at=describe(block.router) if status == "skipped" else "",
    )


def completeness(block: MoEBlock) -> str:
    """Why the block is not exactly experts 0..E-1 once each with agreeing shapes, or ''."""
    ids, count = block.expert_ids, block.num_experts
    if block.hidden.get_partial_shape().rank.is_dynamic:  # unprovable: the CPU plugin compiles no such input
        return "hidden states have a dynamic rank"
    if not block.top_k:
        return f"top-k is not a constant: selected experts have shape {block.topk_indices.get_partial_shape()}"
    missing = sorted(set(range(count)) - set(ids))
    if missing:
        return f"experts {missing} of {count} are missing from the graph (traced with a data-dependent loop?)"
    if len(ids) != count or sorted(ids) != list(range(count)):
        return f"expert ids {sorted(ids)} are not 0..{count - 1} exactly once"
    if list(block.weights) != list(WEIGHT_NAMES[block.expert_type]):
        return f"weights {list(block.weights)} do not fit {block.expert_type}"
    for name, weight in block.weights.items():
        shapes = {p.shape for p in weight.parts}
        if len(shapes) != 1:
            return f"experts' {name} shapes differ: {sorted(shapes)}"
    if block.top_k > count:
        return f"top-k {block.top_k} exceeds the {count} experts"
    return ""


def candidates(model: ov.Model, families) -> tuple[list[MoEBlock], list[BlockReport]]:
    """Every family's blocks and near misses. A block is claimed by the first family that finds it; a
    router driving two different blocks is declined for both (no MoE model does that: a mis-match)."""
    found_by_router: dict[int, list[MoEBlock]] = {}
    misses: list[tuple[int | None, BlockReport]] = []  # (router id, row)
    for family in families:
        for found in family.find(model):
            if isinstance(found, Decline):
                key = found.router.get_instance_id() if found.router is not None else None
                name = block_name(found.router, found.node)
                row = BlockReport(name, family.FAMILY, "skipped", found.reason, stopped_at=describe(found.node))
                row.router_node = found.router.get_friendly_name() if found.router is not None else ""
                misses.append((key, row))
                continue
            claimed = found_by_router.setdefault(found.router.get_instance_id(), [])
            if not any(same(found.output, other.output) for other in claimed):
                claimed.append(found)
    blocks = []
    for key, group in found_by_router.items():
        if len(group) == 1:
            blocks.extend(group)
            continue
        outputs = ", ".join(f"'{b.output.get_node().get_friendly_name()}'" for b in group)
        for block in group:
            reason = f"its router drives {len(group)} expert blocks ({outputs})"
            misses.append((key, block_row(block, "skipped", reason)))
    for topk in router.unclaimed(model, blocks, {key for key, _ in misses}):
        reason = f"a router (TopK over {topk.get_input_partial_shape(0)[-1]} scores) whose experts match no family"
        row = BlockReport(module_path(topk), "-", "skipped", reason, router_node=topk.get_friendly_name())
        misses.append((topk.get_instance_id(), row))
    fused = {b.router.get_instance_id() for b in blocks}
    return blocks, [row for key, row in misses if key not in fused]

