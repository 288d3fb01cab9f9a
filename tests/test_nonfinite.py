"""NaN/±Inf parity, per family: the unfused block, FusedExperts (its reference kernel, run by OpenVINO as
the Python op) and every lowering give NaN/Inf in exactly the same places, and the proof declines a
replacement that does not.

The policy is moe_fusion.compare's (docs/checking.md, "Non-finite values"): non-finite values match
exactly; finite ones within 1e-4 of the output's finite scale (f32, summation order only: measured ~1e-7).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino.opset14 as ops
import pytest
from conftest import compile_f32

import moe_fusion
from moe_fusion import catalogue
from moe_fusion.candidates import candidates
from moe_fusion.compare import compare
from moe_fusion.inputs import token_shape
from moe_fusion.lower import lower
from moe_fusion.proof import cut, prove
from moe_fusion.rewrite import build

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
# one real export per family
FAMILIES = {
    "per_expert_loop": "gen1-mixtral",
    "tiled": "gen2-qwen3moe",
    "gptoss": "gen2-gptoss",
    "sort_and_slice": "gen1-granitemoe",
    "batched_mm": "direct-mixtral",
    "llama4": "gen1-llama4",
}
FORMS = ("tiled", "grouped", "per-expert")
NAN_ROWS, INF_ROWS, NAN_ELEMENT_ROW = (1, 11), (4, 5), 8


def block_of(fixture: str):
    model = moe_fusion.read_model(FIXTURES / fixture / "openvino_model.xml")
    blocks, _ = candidates(model, catalogue.load(()))
    return model, sorted(blocks, key=lambda b: b.name)[0]


def rows_with_non_finite(hidden: int) -> np.ndarray:
    rows = np.random.default_rng(7).standard_normal((14, hidden)).astype(np.float32)
    rows[list(NAN_ROWS)] = np.nan
    rows[INF_ROWS[0]], rows[INF_ROWS[1]] = np.inf, -np.inf
    rows[NAN_ELEMENT_ROW, hidden // 3] = np.nan
    return rows


def feeds_for(model, rows: np.ndarray) -> list[np.ndarray]:
    """The hidden rows, shaped as the block's input, then arrays for the values it reads only as shapes."""
    feeds = []
    for param in model.get_parameters():
        shape = token_shape(param.get_partial_shape(), len(rows))
        feeds.append((rows if not feeds else np.ones(shape)).reshape(shape).astype(param.get_element_type().to_dtype()))
    return feeds


def run(model, feeds: list[np.ndarray], tokens: int) -> np.ndarray:
    return np.asarray(compile_f32(model)(feeds[: len(model.get_parameters())])[0]).reshape(tokens, -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_nan_and_inf_come_out_where_the_unfused_block_puts_them(family):
    _model, block = block_of(FAMILIES[family])
    assert block.family == family
    sides = cut(block, build(block)[1], forced=False)
    rows = rows_with_non_finite(block.hidden.get_partial_shape()[-1].get_length())
    feeds = feeds_for(sides.original, rows)
    want = run(sides.original, feeds, len(rows))
    # what the unfused block does, pinned: a row with any NaN/Inf is NaN throughout (the router's scores are
    # NaN, so are its routing weights), and no other row is touched
    poisoned = sorted({*NAN_ROWS, *INF_ROWS, NAN_ELEMENT_ROW})
    assert np.isnan(want[poisoned]).all()
    assert np.isfinite(np.delete(want, poisoned, axis=0)).all()
    forms = {"FusedExperts (reference kernel)": sides.replacement}
    for target in FORMS:
        lowered = sides.replacement.clone()
        lower(lowered, target)
        forms[target] = lowered
    for form, model in forms.items():
        result = compare(want, run(model, feeds, len(rows)), rtol=1e-4)
        assert result.ok, f"{form}: {result.describe()}"


def test_proof_declines_a_replacement_that_turns_nan_rows_finite():
    """A replacement right on every finite row but writing 0 where the original has NaN: only the proof's
    non-finite rows can tell, and they do."""
    _model, block = block_of(FAMILIES["per_expert_loop"])
    fused, replacement = build(block)
    hides_nan = ops.select(ops.is_nan(replacement), ops.constant(np.float32(0)), replacement).output(0)
    proof = prove(block, fused, hides_nan)
    assert not proof.ok
    assert proof.reason.startswith("outputs differ on 8 tokens with NaN, +Inf, -Inf rows"), proof.reason
    assert "non-finite values differ" in proof.reason and "original nan, replacement 0" in proof.reason


def test_proof_passes_non_finite_parity_and_lists_the_case():
    _model, block = block_of(FAMILIES["sort_and_slice"])
    proof = prove(block, *build(block))
    assert proof.ok, proof.reason
    assert proof.cases[-1] == "8 tokens with NaN, +Inf, -Inf rows and a row with one NaN element"
