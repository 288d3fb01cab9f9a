"""The per-block proof's inputs are hard and its coverage report is honest.

Tolerance: prove's own (f32: 1e-4 of each case's output scale, see moe_fusion/proof/protocol.py).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino.opset14 as ops
import pytest
from test_faults import array, faulty, like, synthetic_block, zero_expert

import moe_fusion
from models.synthetic import random_experts
from moe_fusion import catalogue
from moe_fusion.candidates import candidates
from moe_fusion.proof import prove
from moe_fusion.rewrite import build

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"


def first_block(fixture: str):
    model = moe_fusion.read_model(FIXTURES / fixture / "openvino_model.xml")
    blocks, _ = candidates(model, catalogue.load(()))
    return model, sorted(blocks, key=lambda b: b.name)[0]


@pytest.mark.parametrize("fixture", ["gen1-mixtral", "gen2-qwen3moe-norm", "gen1-deepseekv3"])
def test_router_is_steered_to_every_expert(fixture):
    _model, block = first_block(fixture)
    proof = prove(block, *build(block))
    assert proof.ok, proof.reason
    assert proof.experts_routed == proof.experts_covered == block.num_experts  # the router itself chose all 8
    assert proof.cases[:2] == ["1 token", "3 tokens: zero row, duplicated row"]
    assert proof.cases[2] == "80 tokens steered to every expert"  # each expert's router row, sharper, 64 random
    assert "64 tokens with forced routing" in proof.cases


def unreachable_expert_block():
    """A synthetic block whose router can never pick expert 7 (a router bias of -1e4 on its logit)."""
    experts = random_experts(8, 32, 24, seed=5)
    model, block = synthetic_block(experts)
    softmax = next(n for n in model.get_ordered_ops() if n.get_type_name() == "Softmax")
    bias = np.zeros(8, np.float32)
    bias[7] = -1e4
    softmax.input(0).replace_source_output(ops.add(softmax.input_value(0), bias).output(0))
    return model, block


def test_coverage_counts_only_experts_that_ran_and_forced_routing_reaches_the_rest():
    _model, block = unreachable_expert_block()
    fused, replacement = build(block)
    proof = prove(block, fused, replacement)
    assert proof.ok, proof.reason
    assert proof.experts_routed == 7  # honest: the router never chose expert 7 ...
    assert proof.experts_covered == 8  # ... forced routing ran it

    bad = faulty(fused, lambda i, a: (i[:3] + [_zero(w, 7) for w in i[3:]], a))  # fault only in expert 7
    proof = prove(block, bad, bad.output(0))
    assert not proof.ok and "forced routing" in proof.reason and "7" in proof.reason, proof.reason


def _zero(weight, expert):
    data = array(weight).copy()
    data[expert] = 0
    return like(data, weight)


def test_forced_routing_is_skipped_with_a_note_when_the_router_is_read_elsewhere():
    _model, block = first_block("gen1-llama4")  # dense routing built from the TopK itself
    proof = prove(block, *build(block))
    assert proof.ok and proof.experts_covered == proof.experts_routed == 8
    assert any(n.startswith("forced routing skipped") for n in proof.notes)


def test_clamp_rows_reach_the_clamp_and_a_dropped_clamp_is_rejected():
    _model, block = first_block("gen1-gptoss")
    assert block.expert_alpha > 0
    fused, replacement = build(block)
    proof = prove(block, fused, replacement)
    assert proof.ok and proof.clamp_exercised is True and "16 tokens past the clamp limit" in proof.cases
    bad = faulty(fused, lambda i, a: (i, {**a, "expert_alpha": 0.0}))
    proof = prove(block, bad, bad.output(0))
    assert not proof.ok and proof.reason.startswith("outputs differ on 16 tokens past the clamp limit"), proof.reason


def test_zero_row_ties_and_nan_agree_where_the_original_has_them():
    """PhiMoE's sparsemixer gives NaN on an all-zero row (every router score tied); the replacement reads
    the same routing, so it agrees; the case still runs and the block is proven."""
    _model, block = first_block("gen1-phimoe")
    proof = prove(block, *build(block))
    assert proof.ok and "3 tokens: zero row, duplicated row" in proof.cases


def test_failure_names_the_case_token_and_experts():
    _model, block = first_block("gen1-mixtral")
    fused, _ = build(block)
    bad = faulty(fused, zero_expert)
    proof = prove(block, bad, bad.output(0))
    assert not proof.ok and " at token " in proof.reason and "(experts [" in proof.reason


def crash(*_args):
    """Stands in for the proof's worker job (imported by the worker process: it sees the tests' sys.path)."""
    import faulthandler

    faulthandler._sigsegv()


def test_a_native_crash_while_proving_declines_the_block_and_fusing_goes_on(monkeypatch):
    """Whatever the proof runs in OpenVINO runs in a worker process: a SIGSEGV there declines the block with
    the reason, the other blocks are still proven, and the process that fuses lives on."""
    from moe_fusion.proof import protocol

    model = moe_fusion.read_model(FIXTURES / "gen1-mixtral" / "openvino_model.xml")
    monkeypatch.setattr(protocol, "run_cut", crash)  # what protocol sends its workers
    report = moe_fusion.fuse(model)
    assert [b.status for b in report.blocks] == ["skipped", "skipped"]
    assert all("OpenVINO crashed running the block on CPU" in b.reason and "SIGSEGV" in b.reason for b in report.blocks)
    assert not any(n.get_type_name() == "FusedExperts" for n in model.get_ordered_ops())
    monkeypatch.undo()
    assert [b.status for b in moe_fusion.fuse(model).blocks] == ["fused", "fused"]  # fresh workers


@pytest.fixture
def mapped_weights(monkeypatch):
    """Fixture-sized weights take the path real ones do: every constant over 1 KB reaches the worker as a
    Parameter fed from the file its bytes live in, stacked weights in scratch files. Yields the proofs'
    Locators, to see where the bytes came from."""
    from moe_fusion import mapped, scratch

    monkeypatch.setattr(mapped, "MAPPED_MIN_BYTES", 1024)
    monkeypatch.setattr(scratch, "SCRATCH_FILE_MIN_BYTES", 1024)
    locators = []

    class Recording(mapped.Locator):
        def __init__(self, *args):
            super().__init__(*args)
            locators.append(self)

    monkeypatch.setattr(mapped, "Locator", Recording)
    return locators


@pytest.mark.parametrize("fixture", ["gen1-mixtral", "gen1-qwen3moe-norm-int4-g16-asym", "gen1-gptoss"])
def test_large_weights_are_mapped_into_the_worker_not_copied(fixture, mapped_weights):
    _model, block = first_block(fixture)
    fused, replacement = build(block)
    proof = prove(block, fused, replacement)
    assert proof.ok and proof.experts_covered == block.num_experts, proof.reason
    # the IR's .bin (memory-mapped by read_model) and the unlinked scratch files: nothing written out
    assert len(mapped_weights) == 2 and all(locator.spilled == 0 for locator in mapped_weights)


@pytest.mark.parametrize("fault", ["two experts swapped", "gate and up swapped", "one expert zeroed"])
def test_faults_are_rejected_with_mapped_weights(fault, mapped_weights):
    from test_faults import GEMM3_FAULTS

    _model, block = first_block("gen1-mixtral")
    fused, _ = build(block)
    bad = faulty(fused, GEMM3_FAULTS[fault])
    proof = prove(block, bad, bad.output(0))
    assert not proof.ok and proof.reason.startswith("outputs differ on"), proof.reason


def test_weights_in_anonymous_memory_are_written_once_for_the_worker(mapped_weights):
    """A model built in Python (or read from ONNX) has no file behind its constants: they are spilled."""
    experts = random_experts(8, 32, 24, seed=3)
    _model, block = synthetic_block(experts)
    proof = prove(block, *build(block))
    assert proof.ok, proof.reason
    assert all(locator.spilled > 0 for locator in mapped_weights)


def test_a_block_holding_memory_per_token_is_proven_in_pieces_that_fit(monkeypatch):
    """A direct-conversion block gathers its K experts' weights for every token (151 MB per token at
    Qwen3-30B-A3B's shape): its batch runs in pieces sized from the memory available, with the same cases."""
    from moe_fusion import host
    from moe_fusion.proof.cases import design, plan_runs

    _model, block = first_block("direct-mixtral")
    assert block.bytes_per_token > 0
    monkeypatch.setattr(host, "available_memory", lambda: int(10 * block.bytes_per_token / 0.2) + 1)
    cases, _clamp = design(block, np.random.default_rng(0), block.hidden_size, forced=True)
    runs = plan_runs(block, cases)
    assert len(runs) > 10 and max(sum(len(c.rows) for c in run) for run in runs[1:]) == 10
    assert sorted({c.name for run in runs for c in run}) == sorted(c.name for c in cases)  # every case, in pieces
    proof = prove(block, *build(block))
    assert proof.ok and proof.experts_covered == block.num_experts, proof.reason
    assert proof.cases[:3] == ["1 token", "3 tokens: zero row, duplicated row", "80 tokens steered to every expert"]


@pytest.fixture
def original_op_by_op(monkeypatch, mapped_weights):
    """The original side of a compressed block decompresses op by op on Parameters over its mapped bytes (what
    a block of many small experts gets, such as Qwen3-30B-A3B's), and only that way: no fallback to Constants."""
    from moe_fusion.proof import protocol

    monkeypatch.setattr(protocol, "_op_by_op_holds_less", lambda block: True)
    monkeypatch.setattr(protocol, "COMPRESSED_ORIGINAL_OP_BY_OP", ("dynamic",))
    return mapped_weights


def test_compressed_blocks_take_the_plugin_kernels_unless_op_by_op_holds_less():
    from moe_fusion.proof import protocol
    from moe_fusion.proof.protocol import _op_by_op_holds_less

    # fixture-sized experts: one f32 expert matrix is a large share of the stored bytes
    assert not _op_by_op_holds_less(first_block("gen1-mixtral-int4-g16-asym")[1])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(protocol, "F32_MATRICES_HELD", 0)  # as if each expert were small
        assert _op_by_op_holds_less(first_block("gen1-mixtral-int4-g16-asym")[1])
        # stacked weights are read through GatherMatmul, which the plugin runs on Constant weights only
        assert not _op_by_op_holds_less(first_block("gen1-qwen3moe-norm-int4-g32-asym")[1])


@pytest.mark.parametrize("fixture", ["gen1-mixtral-int4-g16-asym", "gen1-mixtral-int8-asym"])
def test_a_compressed_original_decompressed_op_by_op_proves_and_rejects_faults(fixture, original_op_by_op):
    from test_faults import GEMM3_FAULTS

    _model, block = first_block(fixture)
    fused, replacement = build(block)
    proof = prove(block, fused, replacement)
    assert proof.ok and proof.experts_covered == block.num_experts, proof.reason
    for fault in ("gate and up swapped", "routing weights scaled by 0.9"):
        bad = faulty(fused, GEMM3_FAULTS[fault])
        proof = prove(block, bad, bad.output(0))
        assert not proof.ok and proof.reason.startswith("outputs differ on"), (fault, proof.reason)


def test_a_proof_that_cannot_start_leaves_nothing_in_tmpdir(tmp_path, monkeypatch):
    """Writing the cut model can fail (a full disk, Ctrl-C): the proof's scratch folder goes with it."""
    import tempfile

    from moe_fusion.proof import protocol

    _model, block = first_block("gen1-mixtral")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def full_disk(*_args, **_kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(protocol, "_send", full_disk)
    with pytest.raises(OSError, match="No space left"):
        protocol.begin(block)
    assert list(tmp_path.iterdir()) == []
