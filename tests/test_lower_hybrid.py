"""The `hybrid` form (moe_fusion/lower/hybrid.py): If(tokens > 1) with a per-expert prefill body and a
GatherMatmul decode body, checked against the FusedExperts reference kernel on real fixtures and synthetic
blocks, and the decode body's weights stored in the CPU's inference precision."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest

from models.bench_models import SHAPES, fused_layer, layer_weights
from moe_fusion.checking import check
from moe_fusion.compressed import mark_decompression
from moe_fusion.lower import HYBRID, PER_EXPERT, TILED, CpuFacts, fused_experts_nodes, lower
from moe_fusion.lower.experts import transposed_constant
from tests.test_lower import fused_fixture

F32_CPU = CpuFacts(amx=False, precision="f32", name="CPU without AMX, f32 inference")
BF16_CPU = CpuFacts(amx=False, precision="bf16", name="CPU without AMX, bf16 inference")
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def if_bodies(model: ov.Model) -> list[ov.Model]:
    return [body for node in model.get_ordered_ops() if node.get_type_name() == "If"
            for body in (node.get_then_body(), node.get_else_body())]


def kinds(body: ov.Model) -> set[str]:
    return {n.get_type_name() for n in body.get_ordered_ops()}


# GEMM3 from a loop, compressed int4 GEMM3, GEMM2 with biases and clamp, GEMM2 with zero biases (grouped body)
@pytest.mark.parametrize("fixture", ["gen1-qwen3moe", "gen1-mixtral-int4-g16-sym", "gen1-gptoss",
                                     "gen2-gptoss-zerobias"])
def test_hybrid_equals_the_reference_kernel_in_both_phases(fixture):
    """Lowered for an f32 CPU, every weight stays exact: the fused model (FusedExperts' numpy kernel) and the
    hybrid one agree on a prefill of 16 tokens (per-expert body) and on 1-token steps (GatherMatmul body)
    within check's f32 tolerance (atol 1e-6 + rtol 1e-4 of the output's scale: kernels sum in other orders)."""
    _, fused = fused_fixture(fixture)
    model = fused.clone()
    report = lower(model, HYBRID, cpu=F32_CPU)
    assert not fused_experts_nodes(model)
    assert all(form.startswith(HYBRID) for form in report.lowered.values())
    bodies = if_bodies(model)
    assert len(bodies) == 2 * len(report.lowered)
    then_kinds, else_kinds = kinds(bodies[0]), kinds(bodies[1])
    assert "VariadicSplit" in then_kinds  # the per-expert body
    assert ({"Tile"} <= else_kinds) or ("GroupedMatMul" in else_kinds)  # the GatherMatmul body
    result = check(fused, model, tokens=(1, 16), steps=2, fused_experts="run")
    assert result.equivalent, result.reason


def test_hybrid_takes_the_per_expert_body_for_prompts_and_gather_matmul_for_one_token(rng):
    """Each body alone gives what its form gives: prefill = per-expert's output, decode = tiled's (f32)."""
    weights = layer_weights(SHAPES["small"], "f16")
    compiled = {}
    for target in (HYBRID, PER_EXPERT, TILED):
        model = fused_layer(weights)
        lower(model, target, cpu=F32_CPU)
        compiled[target] = ov.Core().compile_model(model, "CPU", F32)
    for tokens, same_as in ((1, TILED), (7, PER_EXPERT)):
        x = rng.standard_normal((1, tokens, SHAPES["small"].hidden), dtype=np.float32)
        got, want = compiled[HYBRID]({0: x})[0], compiled[same_as]({0: x})[0]
        np.testing.assert_array_equal(got, want)  # the same kernels on the same weights: bit for bit


def test_decode_weights_are_stored_in_the_cpus_precision():
    """For a bf16-inference CPU the decode body's f16 weights become bf16 constants (no f16 copy beside them);
    for an f32 CPU f32 ones; the per-expert body keeps the f16 storage either way."""
    weights = layer_weights(SHAPES["small"], "f16")
    for cpu, stored in ((BF16_CPU, ov.Type.bf16), (F32_CPU, ov.Type.f32)):
        model = fused_layer(weights)
        lower(model, HYBRID, cpu=cpu)
        prefill, decode = if_bodies(model)
        big = [n for n in decode.get_ordered_ops()
               if n.get_type_name() == "Constant" and n.get_output_partial_shape(0).rank.get_length() == 3]
        assert big and {n.get_element_type() for n in big} == {stored}
        assert {n.get_element_type() for n in prefill.get_ordered_ops()
                if n.get_type_name() == "Constant" and n.get_output_partial_shape(0).rank.get_length() == 2
                and n.get_byte_size() > 4096} == {ov.Type.f16}


def test_bf16_storage_is_the_rounding_the_plugin_applies_at_bf16_inference(rng):
    """What makes storing bf16 safe for a bf16-inference CPU: the plugin itself rounds f16 weights to bf16
    (to nearest even) before computing; a MatMul on the identity returns the weights as it used them, and
    they equal lowering's bf16 copy bit for bit. (At f32 inference the bf16 copy would differ from the f16
    weights by up to 2^-9 relative: that is why it is only made for a CPU whose default is bf16.)"""
    n = 64
    w = (rng.standard_normal((2, n, n)) * 0.1).astype(np.float16)  # [E, in, out]
    x = ops.parameter([2, n, n], np.float32)
    weight = mark_decompression(ops.convert(ops.constant(w), ov.Type.f32))
    model = ov.Model([ops.matmul(x, weight, False, False)], [x])  # x @ W: [E, n, out]
    used = ov.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16"})(
        {0: np.broadcast_to(np.eye(n, dtype=np.float32), (2, n, n)).copy()})[0]
    stored = transposed_constant(ops.constant(w).output(0).get_node(), ov.Type.bf16).get_node()  # [E, out, in]
    bits = np.asarray(stored.get_tensor_view().data).view(np.uint16).astype(np.uint32) << 16
    np.testing.assert_array_equal(np.swapaxes(bits.view(np.float32), 1, 2), used)
    assert not np.array_equal(used, w.astype(np.float32))  # the rounding is real: f16 has 3 more bits


def test_check_compares_a_bf16_hybrid_as_bf16_weights():
    """Lowered for a bf16 CPU, hybrid's decode weights are rounded to bf16 (what bf16 inference computes with);
    `check` at f32 then uses the bf16 weight tolerance (rtol 2e-3 of each output's scale) rather than f32's
    1e-4, which the rounding alone exceeds on real layers, and says so in its report."""
    _, fused = fused_fixture("gen1-qwen3moe")
    model = fused.clone()
    assert lower(model, HYBRID, cpu=BF16_CPU).decode_weights == "bf16"
    result = check(fused, model, tokens=(1, 4), steps=1, fused_experts="run")
    assert result.weight_type == "bf16" and result.rtol >= 2e-3
    assert result.equivalent, result.reason
    exact = fused.clone()
    lower(exact, HYBRID, cpu=F32_CPU)
    assert check(fused, exact, tokens=(1,), steps=0, fused_experts="run").weight_type == "f32"
