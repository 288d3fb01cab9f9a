"""The proof's protocol: `begin` cuts the block out and starts its original side in a worker, `finish`
runs the replacement beside it and compares every case (moe_fusion.compare: NaN/Inf exactly, finite values
within tolerance), `cancel` drops a started proof; `prove` is both in one call.

The replacement runs as FusedExperts lowered to native ops (see worker.PLAIN/COMPRESSED; docs/checking.md
argues why that proves FusedExperts itself).
`experts_covered` counts the experts that ran and were compared (by the router or forced),
`experts_routed` those the block's own router selected.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov

from moe_fusion import isolate, mapped
from moe_fusion.block import MoEBlock
from moe_fusion.compare import Comparison, compare
from moe_fusion.compressed import Compressed
from moe_fusion.io import first_line as _first_line
from moe_fusion.proof.cases import Case, NotTokenRows, design, plan_runs, run_feeds
from moe_fusion.proof.cut import cut
from moe_fusion.proof.worker import (
    COMPRESSED,
    COMPRESSED_ORIGINAL_OP_BY_OP,
    F32_MATRICES_HELD,
    PLAIN,
    WORKERS,
    run_cut,
)

# Both sides compute in f32 from the same weights and differ in summation order only (GEMMs, the sum
# over K); measured differences are ~1e-6 of the output's scale. 1e-4 leaves room for long reductions
# at real hidden sizes while any wrong expert, weight, lane or routing shows at 1e-1 or more.
RTOL = 1e-4


SCALE_FLOOR = 1e-6  # the least scale a case is judged at: an all-zero output still has a tolerance


# Output rounding of the block's own type adds up to half an ulp on each side.
TYPE_RTOL = {"f32": RTOL, "f16": 2.0**-9, "bf16": 2.0**-6}


@dataclass
class Proof:
    ok: bool
    reason: str = ""
    max_abs_error: float = 0.0
    experts_covered: int = 0  # experts that ran and were compared, routed or forced
    experts_routed: int = 0  # experts the block's own router selected on the proof's inputs
    cases: list[str] = field(default_factory=list)  # the input cases that ran
    clamp_exercised: bool | None = None  # None: the block has no clamp
    notes: list[str] = field(default_factory=list)


@dataclass
class Pending:
    """A proof whose original side is running in its worker, while the caller builds the replacement."""

    block: MoEBlock
    proof: Proof
    forced: bool
    batches: list[list[Case]]
    folder: str  # the run inputs, the cut-out models and any spilled weights
    modes: list[tuple]  # the modes each side tries (moe_fusion.proof.worker.run_cut), original first
    target: str


def begin(block: MoEBlock, seed: int = 0) -> Pending | Proof:
    """Cut the block out and start running it on the proof's inputs; a failed Proof when that cannot be."""
    hidden_shape = block.hidden.get_partial_shape()
    if hidden_shape.rank.is_dynamic or not all(d.is_dynamic or d.get_length() == 1 for d in list(hidden_shape)[:-1]):
        # rows of tokens fill the dynamic dims; a static batch or a reshaped input (mutation fuzzing found
        # [?, 8, H]) takes no [T, H] rows
        return Proof(False, f"cannot feed token rows to the experts' input of shape {hidden_shape}")
    try:
        sides = cut(block, None)
    except (ValueError, RuntimeError) as error:
        return Proof(False, f"cannot cut the block out for proof: {error}")
    rng = np.random.default_rng(seed)
    proof = Proof(True)
    if not sides.forced:
        proof.notes.append("forced routing skipped: the block reads its router besides the routing weights and indices")
    cases, proof.clamp_exercised = design(block, rng, hidden_shape[-1].get_length(), sides.forced)
    try:
        batches = plan_runs(block, cases)
        runs = [run_feeds(block, sides.original.get_parameters(), group, sides.forced, rng) for group in batches]
    except NotTokenRows as error:  # forced routing cannot be fed: prove without it
        proof.notes.append(f"forced routing skipped: {error}, not [T, K]")
        sides = cut(block, None, forced=False)
        batches = plan_runs(block, [c for c in cases if c.forced is None])
        runs = [run_feeds(block, sides.original.get_parameters(), group, False, rng) for group in batches]
    except ValueError as error:  # inputs that do not fit the block's shapes
        return _failed(proof, f"block does not run on {cases[0].name}: {error}", set(), set())
    compressed = any(isinstance(part, Compressed) for w in block.weights.values() for part in w.parts)
    target, *modes = COMPRESSED if compressed else PLAIN
    if compressed and _op_by_op_holds_less(block):
        modes[0] = COMPRESSED_ORIGINAL_OP_BY_OP
    folder = tempfile.mkdtemp(prefix="moe-fusion-proof-")
    try:
        arrays = {f"{r}_{i}": array for r, run in enumerate(runs) for i, array in enumerate(run)}
        np.savez(Path(folder) / "feeds.npz", runs=len(runs),
                 **{f"{r}_count": len(run) for r, run in enumerate(runs)}, **arrays)
        pending = Pending(block, proof, sides.forced, batches, folder, modes, target)
        _send(pending, 0, "original", sides.original, None)
    except BaseException:  # a full disk, Ctrl-C: nothing started, so nothing of this proof may stay in TMPDIR
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return pending


def _op_by_op_holds_less(block: MoEBlock) -> bool:
    """Whether the original side of a compressed block holds less decompressing its experts op by op (a few
    f32 expert matrices at a time) than the plugin's repacked copy of all its stored weights (at least half
    their bytes): many small experts (Qwen3-30B-A3B), not a few large ones (Mixtral-8x7B). Per-expert weights
    only: a stacked weight is read through Gather + MatMul, which the plugin runs on Constant weights only."""
    stored, largest = 0, 0
    for weight in block.weights.values():
        for part in weight.parts:
            if not isinstance(part, Compressed):
                continue
            if part.ndim == 3:
                return False
            elements = int(np.prod(part.shape))  # one expert's matrix
            stored += elements * _storage_bits(part.value) // 8
            largest = max(largest, elements)
    return F32_MATRICES_HELD * 4 * largest <= stored // 2


def _storage_bits(value: ov.Output) -> int:
    """The bit width of the Constant a decompression subgraph reads (its first inputs, followed up)."""
    node = value.get_node()
    for _ in range(8):
        if node.get_type_name() == "Constant":
            return node.get_element_type().bitwidth
        if node.get_input_size() == 0:
            break
        node = node.input_value(0).get_node()
    return 32  # not found: counted as f32, so the rule leans to the plugin's kernels


def _send(pending: Pending, side: int, name: str, model: ov.Model, lowering: str | None) -> None:
    weights = mapped.parameterize(model, mapped.Locator(Path(pending.folder)))
    xml = str(Path(pending.folder) / f"{name}.xml")
    ov.save_model(model, xml, compress_to_fp16=False)
    WORKERS[side].send(run_cut, xml, weights, str(Path(pending.folder) / "feeds.npz"), lowering,
                      pending.modes[side])


def cancel(pending: Pending) -> None:
    """Drop a started proof (its replacement could not be built): wait for the original side, discard it."""
    try:
        with contextlib.suppress(Exception):
            WORKERS[0].receive()
    finally:
        shutil.rmtree(pending.folder, ignore_errors=True)


def finish(pending: Pending, replacement: ov.Output) -> Proof:
    """Run the replacement beside the original that `begin` started, and compare every case."""
    block, proof = pending.block, pending.proof
    replies = []
    try:
        try:
            sides = cut(block, replacement, forced=pending.forced)
            _send(pending, 1, "replacement", sides.replacement, pending.target)
        except Exception as error:  # collect the original's reply all the same: the worker is busy with it
            replies.append(error)
        for worker in WORKERS[: 2 - len(replies)]:
            try:
                replies.append(worker.receive())
            except Exception as error:
                replies.append(error)
    finally:
        shutil.rmtree(pending.folder, ignore_errors=True)
    crashes = [r for r in replies if isinstance(r, isolate.WorkerCrash)]
    errors = [r for r in replies if isinstance(r, Exception)]
    if crashes:
        reason = f"OpenVINO crashed running the block on CPU: its worker process was {crashes[0]}"
        return _failed(proof, reason, set(), set())
    if errors:  # OpenVINO's RuntimeError, or anything else: unproven is not applied
        return _failed(proof, f"block does not run on the proof's inputs: {_first_line(errors[0])}", set(), set())
    return _verdict(pending, replies[0], replies[1])


def prove(block: MoEBlock, fused: ov.Node, replacement: ov.Output, seed: int = 0) -> Proof:
    """Run the block and its replacement (the value replacing `block.output`, computed by `fused`) on hard
    inputs; ok only if every case agrees within tolerance. `fuse` runs the same as begin/finish, so the
    original compiles while the replacement is built."""
    pending = begin(block, seed)
    return pending if isinstance(pending, Proof) else finish(pending, replacement)


def _verdict(pending: Pending, original: list, fused_runs: list) -> Proof:
    block, proof, batches = pending.block, pending.proof, pending.batches
    rtol = TYPE_RTOL.get(block.output.get_element_type().get_type_name(), RTOL)
    routed: set[int] = set()
    covered: set[int] = set()
    for group, (want_all, chosen_all), (got_all,) in zip(batches, original, fused_runs, strict=True):
        tokens = sum(len(c.rows) for c in group)
        if got_all.size != want_all.size:
            reason = f"replacement has {got_all.size} values, original {want_all.size}"
            return _failed(proof, f"outputs differ on {group[0].name}: {reason}", routed, covered)
        want_all, got_all = want_all.reshape(tokens, -1), got_all.reshape(tokens, -1)
        chosen_all = chosen_all.reshape(tokens, -1)
        ends = np.cumsum([len(c.rows) for c in group])
        for case, end in zip(group, ends, strict=True):
            rows = slice(end - len(case.rows), end)
            experts = case.forced[0] if case.forced is not None else chosen_all[rows]
            want, got = want_all[rows], got_all[rows]
            if case.name not in proof.cases:
                proof.cases.append(case.name)
            result = _compare(case.name, want, got, rtol, experts)
            proof.max_abs_error = max(proof.max_abs_error, result.max_abs)
            if not result.ok:
                return _failed(proof, f"outputs differ on {_reason(case.name, result, experts)}", routed, covered)
            if case.alone:  # the router's choice on NaN/Inf rows means nothing: not counted as coverage
                continue
            if case.forced is None:
                routed.update(np.unique(experts).tolist())
            covered.update(np.unique(experts).tolist())
    if proof.clamp_exercised is None and block.expert_alpha > 0:
        proof.notes.append("could not confirm the clamp was reached (weights not constant)")
    proof.experts_routed = len(routed & set(range(block.num_experts)))
    proof.experts_covered = len(covered & set(range(block.num_experts)))
    return proof


def _compare(case: str, want: np.ndarray, got: np.ndarray, rtol: float, chosen: np.ndarray | None) -> Comparison:
    """One case's rows compared under moe_fusion.compare's policy (non-finite values must match exactly);
    the tolerance is rtol of the case's finite scale, floored at 1e-6 so an all-zero output is not judged
    on rounding alone."""
    tokens = chosen.shape[0] if chosen is not None else 1
    if got.size != want.size:
        return compare(want, got, rtol=rtol, same_size=True)
    return compare(want.reshape(tokens, -1), got.reshape(tokens, -1), rtol=rtol, atol=rtol * SCALE_FLOOR)


def _reason(case: str, result: Comparison, chosen: np.ndarray | None) -> str:
    """The case, why it failed, and the worst token with the experts it ran."""
    if result.shape_error:
        return f"{case}: replacement has {result.shape_error}"
    token = result.worst[0]
    experts = f" (experts {chosen[token].tolist()})" if chosen is not None else ""
    return f"{case}: {result.describe('original', 'replacement')} at token {token}{experts}"


def _failed(proof: Proof, reason: str, routed: set[int], covered: set[int]) -> Proof:
    proof.ok, proof.reason = False, reason
    proof.experts_routed, proof.experts_covered = len(routed), len(covered)
    return proof

