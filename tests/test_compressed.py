"""Compressed expert weights (optimum-cli --weight-format fp16 / int8 / int4, NNCF data-free) stay compressed.

Fixtures: models/fixtures/gen1-{mixtral (F1 loop), qwen3moe-norm (F2 tiled)}-<format>, made by
`models/export_hf.py --weight-format`. Expert down projections have 40 input channels, which no 4-bit group
of 16 or 32 divides: NNCF keeps them at its int8_asym backup, so the int4 fixtures mix int4 gate/up with
int8 down weights, as real models do for such layers.

Tolerance end to end: 1e-4 of the logits' scale, as for f32 fixtures. Both sides dequantise the same
constants through the same ops and run f32 with the CPU plugin's dynamic activation quantisation off
(`moe_fusion.runtime.F32`); measured differences are ~1e-7 of the scale.
"""

from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from llm import F32, generate_logits

import moe_fusion
from moe_fusion import catalogue
from moe_fusion.block import WEIGHT_NAMES
from moe_fusion.candidates import candidates
from moe_fusion.compressed import Compressed
from moe_fusion.fusing import fuse
from moe_fusion.io import save
from moe_fusion.rewrite import build

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
FORMATS = ("fp16", "int8-sym", "int8-asym", "int4-g16-sym", "int4-g16-asym", "int4-g32-sym", "int4-g32-asym")
COMPRESSED = [f"gen1-{model}-{fmt}" for model in ("mixtral", "qwen3moe-norm") for fmt in FORMATS]
STORAGE = {"fp16": {"f16"}, "int8": {"u8", "i8"}, "int4": {"u4", "i4"}}


def storage_types(value: ov.Output) -> set[str]:
    """Element types of the Constants a value is computed from."""
    node = value.get_node()
    if node.get_type_name() == "Constant":
        return {node.get_element_type().get_type_name()}
    return set().union(*(storage_types(v) for v in node.input_values()))


@pytest.mark.parametrize("fixture", COMPRESSED)
def test_compressed_export_fuses_compressed_and_equivalent(fixture, tmp_path):
    original = moe_fusion.read_model(FIXTURES / fixture / "openvino_model.xml")
    model = original.clone()
    report = fuse(model)
    assert [b.status for b in report.blocks] == ["fused", "fused"], report.table()

    # Every expert weight still reaches FusedExperts from constants of the export's storage type.
    fmt = next(f for f in STORAGE if f in fixture)
    experts = [n for n in model.get_ordered_ops() if n.get_type_name() == "FusedExperts"]
    assert len(experts) == 2
    for node in experts:
        for port in range(3, node.get_input_size()):
            assert storage_types(node.input_value(port)) & (STORAGE[fmt] | STORAGE["int8"]), port
    gate_types = storage_types(experts[0].input_value(3))
    assert gate_types & STORAGE[fmt], f"gate weights stored as {gate_types}"

    save(model, FIXTURES / fixture, tmp_path / "fused")  # no dequantised copy written
    ratio = (tmp_path / "fused" / "openvino_model.bin").stat().st_size / (
        FIXTURES / fixture / "openvino_model.bin"
    ).stat().st_size
    assert ratio <= 1.02

    vocab = 256
    for step, (want, got) in enumerate(
        zip(generate_logits(original, vocab), generate_logits(model, vocab), strict=True)
    ):
        assert np.abs(got - want).max() <= 1e-4 * float(np.abs(want).max()), f"logits differ at step {step}"


@pytest.mark.parametrize("fixture", [f for f in COMPRESSED if "int" in f])
def test_fused_weights_dequantise_bit_for_bit(fixture):
    """What FusedExperts reads, `[E, in, out]`, equals each expert's original dequantised weight, transposed."""
    model = moe_fusion.read_model(FIXTURES / fixture / "openvino_model.xml")
    block = candidates(model, catalogue.load())[0][0]
    fused, _ = build(block)
    originals, names = [], WEIGHT_NAMES[block.expert_type]
    for name in names:
        parts = block.weights[name].parts
        assert all(isinstance(p, Compressed) for p in parts), name
        originals.append([p.value for p in parts])
    stacked = [fused.input_value(3 + i) for i in range(len(names))]
    flat = [v for values in originals for v in values] + stacked
    dummy = ops.parameter([1], np.float32)
    results = moe_fusion.core().compile_model(ov.Model(flat, [dummy]), "CPU", F32)([np.zeros(1, np.float32)])
    arrays = [np.asarray(results[i]) for i in range(len(flat))]
    expected, got = arrays[: -len(stacked)], arrays[-len(stacked) :]
    for i, name in enumerate(names):
        per_expert = expected[: len(originals[i])]
        expected = expected[len(originals[i]) :]
        out_major = block.weights[name].parts[0].out_major
        order = np.argsort(block.expert_ids, kind="stable")
        want = np.stack([per_expert[k] for k in order]) if len(per_expert) > 1 else per_expert[0]
        if out_major:
            want = np.swapaxes(want, -1, -2)
        assert want.shape == got[i].shape, name
        assert np.array_equal(want.view(np.uint32), got[i].view(np.uint32)), name  # bit for bit


def _dequantised(value: ov.Output) -> np.ndarray:
    dummy = ops.parameter([1], np.float32)
    return np.asarray(moe_fusion.core().compile_model(ov.Model([value], [dummy]), "CPU", F32)([np.zeros(1)])[0])


@pytest.mark.parametrize("other", ["f32", "int8"])
def test_experts_mixing_precisions_are_declined(other):
    """One expert's gate weight stored differently from the others' (NNCF with ratio < 1 does that):
    stacking would have to dequantise some experts, so the block is declined, with the reason."""
    model = moe_fusion.read_model(FIXTURES / "gen1-mixtral-int4-g16-sym" / "openvino_model.xml")
    (matmul,) = [
        n
        for n in model.get_ordered_ops()
        if n.get_friendly_name().startswith("__module.model.layers.0.block_sparse_moe.experts.3.w1/")
        and n.get_type_name() == "MatMul"
    ]
    weight = _dequantised(matmul.input_value(1))  # [out, in], transpose_b
    if other == "f32":
        replacement = ops.constant(weight)
    else:
        scale = np.abs(weight).max(axis=1, keepdims=True) / 127
        quantised = ops.constant(np.round(weight / scale).astype(np.int8))
        dequantised = ops.multiply(ops.convert(quantised, np.float16), ops.constant(scale.astype(np.float16)))
        replacement = ops.convert(dequantised, np.float32)
    matmul.input(1).replace_source_output(replacement.output(0))
    report = fuse(model)
    row = next(b for b in report.blocks if b.name.endswith("layers.0.block_sparse_moe"))
    assert row.status == "skipped"
    assert "differ" in row.reason and ("precision" in row.reason or "decompression" in row.reason), row.reason
    assert [b.status for b in report.blocks].count("fused") == 1  # layer 1 is untouched by the change


def test_a_compressed_router_whose_experts_match_no_family_is_reported():
    """The router's own weight is int4 too: it is still recognised as a router and reported."""
    model = moe_fusion.read_model(FIXTURES / "gen1-mixtral-int4-g16-sym" / "openvino_model.xml")
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Swish":
            node.output(0).replace(ops.gelu(node.input_value(0), "erf").output(0))
    report = fuse(model)
    assert len(report.blocks) == 2 and all(b.status == "skipped" and b.reason for b in report.blocks), report.table()
