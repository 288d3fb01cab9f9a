"""The pipeline: find candidates -> match a family -> prove complete -> rewrite -> prove equal -> apply.

`fuse` (exported as `moe_fusion.fuse`) is the one function; `FuseMoE` wraps it as an `openvino.passes` pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from pathlib import Path

import openvino as ov

from moe_fusion import broken, catalogue
from moe_fusion.block import MoEBlock
from moe_fusion.candidates import block_row, candidates, completeness
from moe_fusion.proof import Pending, Proof, begin, cancel, finish, start_workers
from moe_fusion.report import BlockReport, Report
from moe_fusion.rewrite import apply, build

Progress = Callable[[int, int], None]


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
            report.blocks.append(block_row(block, "skipped", reason))
        elif dry_run:
            report.blocks.append(block_row(block, "fusable"))
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
            return block_row(block, "skipped", str(error))
        raise
    row = block_row(block, "fused")
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

