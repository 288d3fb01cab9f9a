"""Mutation fuzzing, the fast seeded subset (the full run: `python benchmarks/fuzz.py --count 300 --seed 0`).

Mutants of real exports (`models/mutants.py`), each with one graph mutation in one MoE block, are fused with
verification on; no fusion may be wrong: every fused model passes `check` against the mutant itself, every
declined block carries a reason, nothing crashes. Plus the regressions the fuzzing found.
"""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest

import moe_fusion
from models.mutants import OPERATORS, fixture_path, judge, judge_many, mutant, mutants
from moe_fusion.fusing import fuse

SEED = 1
# One fixture per graph form: per-expert loop (IR, ONNX, convert_model, int8), tiled (gen1 and gen2), GPT-OSS,
# sort-and-slice, Llama-4; the smaller exports, to keep the subset fast.
FAST_FIXTURES = (
    "gen1-mixtral",
    "gen1-mixtral-int8-sym",
    "onnx-qwen3moe",
    "convert-olmoe-block",
    "gen1-qwen3moe-norm",
    "gen2-qwen2moe",
    "gen1-gptoss",
    "gen2-granitemoe",
    "gen1-llama4",
)
COUNT = 2 * len(OPERATORS)


@pytest.fixture(scope="module")
def verdicts():
    # in worker processes: each fuse leaks ~47 MB of OpenVINO pattern objects, which must not pile up here
    return list(judge_many(SEED, range(COUNT), FAST_FIXTURES, tokens=(1, 16), steps=1))


def test_no_wrong_fusion(verdicts):
    wrong = [f"{v.mutant.name}: {v.mutant.description}: {v.detail}" for v in verdicts if v.outcome == "WRONG"]
    assert not wrong, "\n".join(wrong)


def test_every_operator_and_every_outcome_occurs(verdicts):
    assert len(verdicts) == COUNT
    assert {v.mutant.operator for v in verdicts} == set(OPERATORS)
    outcomes = [v.outcome for v in verdicts]
    # the subset must exercise both sides of the verdict, not only OpenVINO's rejections
    assert outcomes.count("fused") >= COUNT // 5, outcomes
    assert outcomes.count("declined") >= COUNT // 5, outcomes
    assert outcomes.count("rejected") <= COUNT // 2, outcomes
    assert len({v.mutant.fixture for v in verdicts}) >= 6


def test_declined_blocks_carry_a_reason(verdicts):
    for v in verdicts:
        if v.outcome == "declined":
            assert v.detail.strip(), v.mutant.name
        if v.outcome == "fused":  # the mutated block itself fused, and check passed
            assert v.blocks_fused >= 1


def test_mutants_are_deterministic_and_fresh():
    first = mutant(7, 3, FAST_FIXTURES)
    again = mutant(7, 3, FAST_FIXTURES)
    assert (first.name, first.description) == (again.name, again.description)
    assert mutant(7, 4, FAST_FIXTURES).operator != first.operator  # round-robin
    # a mutant is a fresh read: the fixture on disk and other mutants are untouched
    assert first.model is not again.model


def test_weight_mutation_is_fused_and_changes_the_model():
    """A same-shape weight change must fuse, and the fused model follows the MUTANT, not the fixture."""
    found = next(m for m in mutants(3, 64, fixtures=["gen1-mixtral"], operators=["weights"]) if "negated" in
                 m.description)
    verdict = judge(found)
    assert verdict.outcome == "fused", verdict.detail
    original = moe_fusion.read_model(fixture_path("gen1-mixtral"))
    assert not moe_fusion.check(original, found.model, tokens=(16,), steps=0).equivalent


# ---- regressions found by the fuzzing ------------------------------------------------------------------


@pytest.mark.parametrize("fixture", ["gen2-gptoss-zerobias", "gen2-mixtral"])
def test_dynamic_expert_axis_is_declined_not_a_crash(fixture):
    """The dense routing matrix's zeros built as [E, T] instead of [T, E] (the Broadcast target's Concat
    inputs swapped): its expert axis is no longer static. GPT-OSS and tiled raised 'Cannot get length of
    dynamic dimension' out of fuse; now the block is declined with the reason."""
    model = moe_fusion.read_model(fixture_path(fixture))
    (concat,) = [
        n
        for n in model.get_ordered_ops()
        if n.get_friendly_name() == "__module.model.layers.0.mlp.experts/prim::ListConstruct/SequenceMark_1"
    ]
    first, second = concat.input_values()
    concat.input(0).replace_source_output(second)
    concat.input(1).replace_source_output(first)
    model.validate_nodes_and_infer_types()
    report = fuse(model)
    (row,) = [b for b in report.blocks if b.name == "__module.model.layers.0.mlp"]
    assert row.status == "skipped" and "expert axis is not static" in row.reason, report.table()
    assert [b.status for b in report.blocks if b.name == "__module.model.layers.1.mlp"] == ["fused"]
    assert sum(n.get_type_name() == "FusedExperts" for n in model.get_ordered_ops()) == 1
    assert isinstance(model, ov.Model) and np.isfinite(report.seconds)


def test_experts_input_without_token_rows_is_declined_not_a_crash():
    """gen1-gptoss with layer 0's output reshaped to [?, 8, 64] (a shape Concat's inputs 0 and 2 swapped):
    layer 1's experts read a [?, 8, H] input that takes no [T, H] rows. The proof raised numpy's
    'cannot reshape array' out of fuse; now the block is declined with the reason."""
    model = moe_fusion.read_model(fixture_path("gen1-gptoss"))
    (concat,) = [
        n
        for n in model.get_ordered_ops()
        if n.get_friendly_name() == "__module.model.layers.0.mlp.experts/prim::ListConstruct/SequenceMark_1"
    ]
    first, third = concat.input_value(0), concat.input_value(2)
    concat.input(0).replace_source_output(third)
    concat.input(2).replace_source_output(first)
    model.validate_nodes_and_infer_types()
    report = fuse(model)
    (row,) = [b for b in report.blocks if b.name == "__module.model.layers.1.mlp"]
    assert row.status == "skipped", report.table()
    assert "cannot feed token rows to the experts' input of shape [?,8,64]" in row.reason


@pytest.mark.parametrize("fixture", ["gen1-qwen3moe-norm", "gen2-mixtral", "gen1-gptoss"])
def test_hidden_states_tiled_otherwise_are_declined(fixture):
    """Tile repeats [E, 1] -> [1, E]: every expert then reads other tokens' rows ([T, E*H] viewed as
    [E, T, H]). This fused, wrongly: OpenVINO's CPU plugin ignores the repeats when it compiles the block
    (its output equals the unmutated model's, while Model.evaluate's reference differs by more than the
    output's scale), so the proof and `check`, both run on CPU, agreed with the wrong FusedExperts."""
    model = moe_fusion.read_model(fixture_path(fixture))
    tiles = [n for n in model.get_ordered_ops() if n.get_type_name() == "Tile"]
    tile = tiles[-1]  # layer 1's
    repeats = np.asarray(tile.input_value(1).get_node().get_data())
    assert repeats.tolist() == [8, 1]
    tile.input(1).replace_source_output(ops.constant(repeats[::-1].copy()).output(0))
    model.validate_nodes_and_infer_types()
    report = fuse(model)
    assert [b.status for b in report.blocks] == ["fused", "skipped"], report.table()
    assert "hidden states tiled [1, 8], not once per expert along tokens" in report.blocks[1].reason
