"""The pipeline: find candidates -> match a family -> prove complete -> rewrite -> prove equal -> apply."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import openvino as ov

from moe_fusion import broken, catalogue, router
from moe_fusion.block import WEIGHT_NAMES, Decline, MoEBlock, block_name, has_shared_expert, module_path
from moe_fusion.pattern import same
from moe_fusion.prove import Pending, Proof, begin, cancel, finish, start_workers
from moe_fusion.report import BlockReport, Report
from moe_fusion.rewrite import apply, build

Progress = Callable[[int, int], None]


def _where(node: ov.Node | None) -> str:
    return f"{node.get_type_name()} '{node.get_friendly_name()}'" if node is not None else ""


def _row(block: MoEBlock, status: str, reason: str = "") -> BlockReport:
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
        stopped_at=_where(block.router) if status == "skipped" else "",
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
                row = BlockReport(name, family.FAMILY, "skipped", found.reason, stopped_at=_where(found.node))
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
            misses.append((key, _row(block, "skipped", f"its router drives {len(group)} expert blocks ({outputs})")))
    for topk in router.unclaimed(model, blocks, {key for key, _ in misses}):
        reason = f"a router (TopK over {topk.get_input_partial_shape(0)[-1]} scores) whose experts match no family"
        row = BlockReport(module_path(topk), "-", "skipped", reason, router_node=topk.get_friendly_name())
        misses.append((topk.get_instance_id(), row))
    fused = {b.router.get_instance_id() for b in blocks}
    return blocks, [row for key, row in misses if key not in fused]


def fuse(
    model: ov.Model,
    *,
    patterns: Iterable[str | Path] = (),
    verify: bool = True,
    dry_run: bool = False,
    progress: Progress | None = None,
) -> Report:
    """Fuse every MoE block of `model` in place into FusedExperts; return the report.

    Blocks that are incomplete, or (with `verify`) not proven equivalent on their own, are left as they
    were and reported as skipped with the reason. `dry_run` (what `inspect` does) changes nothing.
    """
    start = time.perf_counter()
    families = catalogue.load(patterns)
    blocks, misses = candidates(model, families)
    misses += broken.mark(model, misses)  # traces that froze routing: the model is wrong, not unfused
    report = Report(blocks=list(misses))
    if verify and blocks and not dry_run:
        start_workers()
    if progress:
        progress(0, len(blocks))
    for done, block in enumerate(blocks, start=1):
        reason = completeness(block)
        if reason:
            report.blocks.append(_row(block, "skipped", reason))
        elif dry_run:
            report.blocks.append(_row(block, "fusable"))
        else:
            report.blocks.append(_rewrite(block, verify))
        if progress:
            progress(done, len(blocks))
    if not dry_run and report.fused:
        model.validate_nodes_and_infer_types()
    report.blocks.sort(key=lambda b: b.name)
    report.seconds = time.perf_counter() - start
    return report


def _rewrite(block: MoEBlock, verify: bool) -> BlockReport:
    # The original side of the proof starts first: it compiles in its worker while the weights are stacked.
    proving = begin(block) if verify else None
    try:
        _fused, replacement = build(block)
    except BaseException as error:
        if isinstance(proving, Pending):
            cancel(proving)
        if isinstance(error, ValueError):  # FusedExperts validation: shapes that do not fit the op
            return _row(block, "skipped", str(error))
        raise
    row = _row(block, "fused")
    if verify:
        proof = proving if isinstance(proving, Proof) else finish(proving, replacement)
        row.max_abs_error, row.experts_covered = proof.max_abs_error, proof.experts_covered
        row.experts_routed, row.proof_notes = proof.experts_routed, list(proof.notes)
        if not proof.ok:
            row.status, row.reason = "skipped", f"not proven equivalent: {proof.reason}"
            return row
    apply(block, replacement)
    return row


class FuseMoE(ov.passes.ModelPass):
    """`fuse` as an `openvino.passes` pass: `manager.register_pass(FuseMoE())`; the report is kept."""

    def __init__(self, *, patterns: Iterable[str | Path] = (), verify: bool = True) -> None:
        super().__init__()
        self.patterns, self.verify = list(patterns), verify
        self.report: Report | None = None

    def run_on_model(self, model: ov.Model) -> bool:
        self.report = fuse(model, patterns=self.patterns, verify=self.verify)
        return bool(self.report.fused)
