"""The oracle: what became of one mutant. Fuse a copy; every fused block must leave the model equivalent to
the mutant itself (`moe_fusion.check`), every skipped block must carry a reason, and a mutant that makes
the model a broken export must be declined, not fused.

The judge announces each stage it enters (`enter(stage)`: generate, fuse, check-original, check-fused,
reference) so that the harness can name the stage in which a judging process died natively.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import openvino as ov

from models.mutants import engine_api as engine
from models.mutants.generator import Mutant

OUTCOMES = ("fused", "declined", "broken", "unreported", "rejected", "crashed", "generator failed", "WRONG")
STAGES = ("generate", "fuse", "check-original", "check-fused", "reference")
REFERENCE_RTOL = 1e-2  # reference kernels and CPU differ by up to ~5e-4 of the scale on int8 weights


@dataclass
class Verdict:
    """What became of one mutant.

    outcome: "fused" (the mutated block fused, and `check` of the fused model against the mutant passed),
    "declined" (the mutated block was left as ops with a reason; anything else fused passed `check`),
    "broken" (declined as a broken export: the mutation made the model one the engine calls a broken export,
    `fuse` left the block as ops and `check` refuses the mutant as an original: nothing can be compared),
    "unreported" (the mutated block was left as ops, but the report has no row for it: not a wrong fusion,
    yet the user is not told where fusion stopped),
    "rejected" (OpenVINO rejected the mutated graph, or cannot compile or run it: nothing to compare),
    "crashed" (the process judging it died natively, in OpenVINO; `stage` names where),
    "generator failed" (no mutant was made: the operator found no site, or the generator raised),
    "WRONG" (a fused model that `check` finds not equivalent, a fused block of a broken export, a skipped
    block without a reason, or a Python exception out of fuse or check)."""

    mutant: Mutant
    outcome: str
    detail: str  # the decline reason, OpenVINO's message, or what is wrong
    blocks_fused: int = 0
    seconds: float = 0.0
    stage: str = ""  # crashed: the stage the judging process died in

    @property
    def missed(self) -> bool:
        """Declined although a correct fusion was expected (informational, not wrong)."""
        return self.outcome == "declined" and self.mutant.expect == "fused"


def same_block(row: str, block: str) -> bool:
    """A report row about `block`: the same module, or one inside the other (a decline is named after its
    router and the node where matching stopped, e.g. `...layers.1.mlp.gate` for block `...layers.1.mlp`)."""
    if row == block:
        return True
    inner, outer = (row, block) if len(row) > len(block) else (block, row)
    return bool(outer) and inner.startswith(outer) and inner[len(outer)] in "./"


class _SideTracker(io.TextIOBase):
    """Stands in for stderr while `check(progress=True)` runs: its "moe-fusion: <side>: ..." lines move the
    stage to check-original or check-fused; everything is passed on to the real stderr."""

    def __init__(self, enter: Callable[[str], None], out) -> None:
        self.enter, self.out = enter, out

    def write(self, text: str) -> int:
        if text.startswith(engine.PROGRESS_PREFIX):
            side = text[len(engine.PROGRESS_PREFIX):].split(":", 1)[0]
            if side in ("original", "fused"):
                self.enter(f"check-{side}")
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()


def _check(mutant: Mutant, fused: ov.Model, tokens, steps, enter: Callable[[str], None] | None):
    if enter is None:
        return engine.check(mutant.model, fused, tokens=tokens, steps=steps)
    enter("check-original")  # check runs the original first
    with contextlib.redirect_stderr(_SideTracker(enter, sys.stderr)):
        return engine.check(mutant.model, fused, tokens=tokens, steps=steps, progress=True)


def against_reference(mutant: Mutant, tokens: int = 16) -> str:
    """The mutated block cut out and run by OpenVINO's reference implementation (`Model.evaluate`, no plugin
    transformations) beside its FusedExperts on CPU: '' when they agree (`compare`, NaN/Inf exactly, finite
    values within REFERENCE_RTOL of the scale), else why not. Independent of the CPU plugin, which compiles
    some mutants as if unmutated (it ignores a tiled block's Tile repeats). Off by default:
    `Model.evaluate` crashes the process (SIGSEGV) on some mutants that the CPU runs."""
    sides = engine.reference_sides(mutant.model.clone(), mutant.block, same_block)
    if sides is None:
        return ""
    original, rewritten = sides
    rng = np.random.default_rng(0)
    feeds = [
        rng.standard_normal(engine.token_shape(p.get_partial_shape(), tokens)).astype(p.get_element_type().to_dtype())
        for p in original.get_parameters()
    ]
    outputs = ov.TensorVector([ov.Tensor(o.get_element_type(), ov.Shape([0])) for o in original.outputs])
    if not original.evaluate(outputs, ov.TensorVector([ov.Tensor(f) for f in feeds])):
        return ""
    want = np.asarray(outputs[0].data)
    compiled = engine.core().compile_model(rewritten, "CPU", engine.f32_config())
    got = np.asarray(compiled(feeds[: len(rewritten.get_parameters())])[0])
    result = engine.compare(want, got, rtol=REFERENCE_RTOL, atol=1e-6 * REFERENCE_RTOL, same_size=True)
    if not result.ok:
        return (f"fused block differs from the mutant's reference evaluation (Model.evaluate) on {tokens} tokens: "
                + result.describe("reference", "fused"))
    return ""


def _trace() -> str:
    return traceback.format_exc(limit=-3).strip().replace("\n", " | ")


def judge(
    mutant: Mutant,
    tokens: Iterable[int] = (1, 16),
    steps: int = 1,
    reference: bool = False,
    enter: Callable[[str], None] | None = None,
) -> Verdict:
    """Fuse a copy of the mutant and judge it (see `Verdict`). `enter(stage)` is told each stage."""
    start = time.perf_counter()
    tokens = tuple(tokens)
    announce = enter or (lambda stage: None)

    def verdict(outcome: str, detail: str, fused: int = 0) -> Verdict:
        # the verdict keeps the mutant's description, not its model: a run holds hundreds of verdicts
        return Verdict(dataclasses.replace(mutant, model=None), outcome, detail, fused, time.perf_counter() - start)

    if mutant.model is None:
        return verdict("rejected", f"invalid graph: {mutant.rejected}")
    fused = mutant.model.clone()
    announce("fuse")
    try:
        report = engine.fuse(fused)
    except Exception:  # a crash of the fusion is a failure, whatever the input
        return verdict("WRONG", "fuse raised: " + _trace())
    n_fused = len(report.fused)
    silent = [b.name for b in report.blocks if b.status == "skipped" and not b.reason.strip()]
    if silent:
        return verdict("WRONG", f"blocks skipped without a reason: {silent}", n_fused)
    ops_left = sum(n.get_type_name() == "FusedExperts" for n in fused.get_ordered_ops())
    if ops_left != n_fused:
        return verdict("WRONG", f"report says {n_fused} fused, model holds {ops_left} FusedExperts")
    rows = [b for b in report.blocks if same_block(b.name, mutant.block)]
    block_fused = any(b.status == "fused" for b in rows)
    broken = engine.broken_findings(mutant.model)
    try:
        result = _check(mutant, fused, tokens, steps, enter)
    except engine.InputError as error:
        if broken and not block_fused:
            reasons = "; ".join(b.reason for b in rows) or "no row for the block"
            return verdict("broken", f"declined: {reasons}; check refuses the mutant: {error}", n_fused)
        if broken:
            return verdict("WRONG", f"fused a block of a broken export ({broken}); check refuses it: {error}", n_fused)
        if str(error).startswith("original model"):
            return verdict("rejected", f"OpenVINO cannot run the mutant: {error}", n_fused)
        return verdict("WRONG", f"check refused the fused model: {error}", n_fused)
    except Exception:
        return verdict("WRONG", "check raised: " + _trace())
    if not result.equivalent:
        return verdict("WRONG", f"fused model not equivalent to the mutant: {result.reason}", n_fused)
    if block_fused:
        if broken:
            return verdict("WRONG", f"fused a block of a broken export ({broken})", n_fused)
        if reference:
            announce("reference")
            wrong = against_reference(mutant)
            if wrong:
                return verdict("WRONG", wrong, n_fused)
        return verdict("fused", f"max abs error {result.max_abs:.3g}", n_fused)
    if not rows:
        others = "; ".join(f"{b.name}: {b.status} {b.reason}".strip() for b in report.blocks) or "empty report"
        return verdict("unreported", f"no row for {mutant.block} ({others})", n_fused)
    return verdict("declined", "; ".join(b.reason for b in rows), n_fused)
