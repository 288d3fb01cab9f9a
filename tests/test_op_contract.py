"""FusedExperts' contract: validation messages, IR round trip, tensor types the plugin may pass."""

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from click.testing import CliRunner
from conftest import compile_f32

import moe_fusion
from models.synthetic import fused_model, random_experts
from moe_fusion import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU, FusedExperts, FusedExpertsError
from moe_fusion.cli import main

E, H, I, K = 4, 6, 5, 2


def param(shape, dtype=np.float32):
    return ops.parameter(shape, dtype)


def const(*shape, dtype=np.float32):
    return ops.constant(np.zeros(shape, dtype))


def gemm3(**overrides):
    inputs = {
        "hidden": param([-1, H]),
        "routing": param([-1, K]),
        "indices": param([-1, K], np.int64),
        "w_gate": const(E, H, I),
        "w_up": const(E, H, I),
        "w_down": const(E, I, H),
    }
    attrs = {k: overrides.pop(k) for k in list(overrides) if k.startswith(("expert_", "gate_idx"))}
    inputs.update(overrides)
    return FusedExperts(*inputs.values(), **attrs)


VALIDATION_CASES = {
    "E differs": ({"w_up": const(E + 1, H, I)}, r"input 4 'w_up' has shape \[5, 6, 5\], expected \[4, 6, 5\]"),
    "H mismatch": ({"hidden": param([-1, H + 1])}, r"input 3 'w_gate' .*expected \[4, 7, 5\]"),
    "I mismatch": ({"w_down": const(E, I + 1, H)}, r"input 5 'w_down' has shape \[4, 6, 6\], expected \[4, 5, 6\]"),
    "K differs": ({"indices": param([-1, K + 1], np.int64)}, r"input 2 'topk_indices' .*expected K to match"),
    "T differs": (
        {"hidden": param([3, H]), "routing": param([4, K]), "indices": param([4, K], np.int64)},
        r"input 1 'routing_weights' has shape \[4,2\], expected \[3, K\]",
    ),
    "float indices": ({"indices": param([-1, K])}, r"input 2 'topk_indices' has element type f32, expected one of i32"),
    "int hidden": ({"hidden": param([-1, H], np.int32)}, r"input 0 'hidden_states' has element type i32"),
    "rank-3 routing": (
        {"routing": param([-1, 1, K])},
        r"input 1 'routing_weights' has shape \[\?,1,2\], expected \[T, K\]",
    ),
    "dynamic weight": (
        {"w_gate": param([E, H, -1])},
        r"input 3 'w_gate' has shape \[4,6,\?\], expected a static shape",
    ),
    "unknown type": ({"expert_type": "gemm4"}, r"expert_type 'gemm4' is unknown"),
    "bad gate_idx": ({"gate_idx": 2}, r"gate_idx is 2, expected 0 or 1"),
    "negative clamp": ({"expert_alpha": -1.0}, r"expert_alpha \(clamp limit\) is -1.0"),
}


@pytest.mark.parametrize("case", VALIDATION_CASES)
def test_validation_names_input_shape_and_expectation(case):
    overrides, message = VALIDATION_CASES[case]
    with pytest.raises(FusedExpertsError, match=message):
        gemm3(**overrides)


def test_validation_of_input_count_and_gemm2_layout():
    with pytest.raises(FusedExpertsError, match=r"gemm2_bias_swiglu_clamp takes 7 inputs"):
        gemm3(expert_type=GEMM2_BIAS_SWIGLU_CLAMP)
    w = [const(E, H, 2 * I), const(E, 2 * I), const(E, I, H), const(E, H + 1)]
    with pytest.raises(FusedExpertsError, match=r"input 6 'b_down' has shape \[4, 7\], expected \[4, 6\]"):
        FusedExperts(param([-1, H]), param([-1, K]), param([-1, K], np.int32), *w, expert_type=GEMM2_BIAS_SWIGLU_CLAMP)


def test_valid_op_infers_hidden_shape_and_type():
    op = gemm3(hidden=param([2, -1, H], np.float16))
    assert op.get_output_element_type(0) == ov.Type.f16
    assert str(op.get_output_partial_shape(0)) == "[2,?,6]"
    assert op.num_experts == E and op.expert_type == GEMM3_SWIGLU


@pytest.mark.parametrize("expert_type", [GEMM3_SWIGLU, GEMM2_BIAS_SWIGLU_CLAMP])
def test_ir_round_trip_keeps_graph_and_exact_attributes(expert_type, tmp_path, rng):
    experts = random_experts(4, 13, 11, expert_type, seed=2, expert_alpha=6.875, expert_beta=1.702, gate_idx=1)
    model = fused_model(experts, top_k=2)
    ov.save_model(model, tmp_path / "m.xml", compress_to_fp16=False)
    # The stock reader cannot create the layer: the failure users see without registering.
    with pytest.raises(RuntimeError, match="FusedExperts"):
        ov.Core().read_model(tmp_path / "m.xml")
    back = moe_fusion.read_model(tmp_path / "m.xml")

    def summary(m):
        return [
            (n.get_type_name(), str(n.get_output_partial_shape(0)) if n.get_output_size() else "")
            for n in m.get_ordered_ops()
        ]

    assert summary(back) == summary(model)
    (op,) = [n for n in back.get_ordered_ops() if n.get_type_name() == "FusedExperts"]
    assert isinstance(op, FusedExperts)
    assert op.attributes == experts.attributes  # floats exact: 1.702 is not truncated to 1
    assert op.attributes["expert_beta"] == 1.702
    x = rng.standard_normal((5, 13)).astype(np.float32)
    w, idx = np.full((5, 2), 0.5, np.float32), np.array([[0, 1], [1, 2], [2, 3], [3, 0], [1, 3]])
    np.testing.assert_array_equal(compile_f32(back)([x, w, idx])[0], compile_f32(model)([x, w, idx])[0])


def test_register_on_a_users_core(tmp_path):
    model = fused_model(random_experts(2, 8, 4), top_k=1)
    ov.save_model(model, tmp_path / "m.xml")
    core = moe_fusion.register(ov.Core())
    assert any(n.get_type_name() == "FusedExperts" for n in core.read_model(tmp_path / "m.xml").get_ordered_ops())


def bf16(values):
    """float32 -> bf16 Tensor (truncating: exact for values with short mantissas)."""
    bits = (np.ascontiguousarray(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)
    tensor = ov.Tensor(ov.Type.bf16, list(values.shape))
    tensor.data.view(np.uint16)[...] = bits
    return tensor


def test_evaluate_reads_and_writes_bf16(rng):
    """The plugin may hand bf16 tensors (AMX machines); Tensor.data shows them as float16 bits."""
    experts = random_experts(2, 8, 4, seed=4)
    experts.weights = [np.round(w * 8) / 8 for w in experts.weights]  # exact in bf16
    model = fused_model(experts, top_k=1)
    (op,) = [n for n in model.get_ordered_ops() if n.get_type_name() == "FusedExperts"]
    x = np.round(rng.standard_normal((3, 8)) * 4) / 4
    idx = np.array([[0], [1], [1]], np.int64)
    inputs = [bf16(x), bf16(np.ones((3, 1))), ov.Tensor(idx)] + [bf16(w) for w in experts.weights]
    out = ov.Tensor(ov.Type.bf16, [3, 8])
    assert op.evaluate([out], inputs)
    got = (out.data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    want = compile_f32(model)([x.astype(np.float32), np.ones((3, 1), np.float32), idx])[0]
    np.testing.assert_allclose(got, want, rtol=2**-8, atol=2**-8 * np.abs(want).max())  # bf16 has 8 mantissa bits


def test_cli_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0 and moe_fusion.__version__ in result.output
