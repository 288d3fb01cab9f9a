"""FusedExperts against an independent formulation in plain OpenVINO ops (models/synthetic.py).

Tolerance: both sides compute in float32 from the same (exactly widened) weights; they differ only in
GEMM summation order over at most 64 terms, a few float32 ulps of the largest partial sum. We allow
1e-5 * max|reference| absolute + 1e-5 relative, two orders above what we measure (~1e-7 relative),
and far below any real fault (a wrong expert or lane changes outputs at the 1e-1 level).
"""

import functools

import numpy as np
import pytest
from conftest import compile_f32

from models.synthetic import Experts, fused_model, random_experts, unfused_model
from moe_fusion import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU

H, I = 13, 11  # deliberately not multiples of 8


def assert_close(actual, expected, rtol=1e-5):
    scale = float(np.abs(expected).max()) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * max(scale, 1.0))


@functools.cache
def compiled_pair(expert_type: str, num_experts: int, top_k: int, weight_dtype: str):
    experts = random_experts(num_experts, H, I, expert_type, dtype=np.dtype(weight_dtype).type, seed=num_experts)
    return compile_f32(fused_model(experts, top_k=top_k)), compile_f32(unfused_model(experts, top_k=top_k))


def routing(rng, tokens: int, num_experts: int, top_k: int):
    """Distinct experts per token, softmax-like weights."""
    idx = np.argsort(rng.random((tokens, num_experts)), axis=1)[:, :top_k]
    w = rng.random((tokens, top_k)).astype(np.float32)
    return w / w.sum(1, keepdims=True), idx.astype(np.int64)


GRID = [(e, k) for e in (1, 4, 16) for k in sorted({1, 2, e}) if k <= e]


@pytest.mark.parametrize("weight_dtype", ["float32", "float16"])
@pytest.mark.parametrize("tokens", [0, 1, 7, 64])
@pytest.mark.parametrize(("num_experts", "top_k"), GRID)
@pytest.mark.parametrize("expert_type", [GEMM3_SWIGLU, GEMM2_BIAS_SWIGLU_CLAMP])
def test_matches_unfused(expert_type, num_experts, top_k, tokens, weight_dtype, rng):
    fused, unfused = compiled_pair(expert_type, num_experts, top_k, weight_dtype)
    # Scale 4 puts GEMM2 gate_up pre-activations past the clamp limit 7 for some rows.
    x = (4 * rng.standard_normal((tokens, H))).astype(np.float32)
    w, idx = routing(rng, tokens, num_experts, top_k)
    got, want = fused([x, w, idx])[0], unfused([x, w, idx])[0]
    assert got.shape == want.shape == (tokens, H)
    assert_close(got, want)


@pytest.mark.parametrize("expert_type", [GEMM3_SWIGLU, GEMM2_BIAS_SWIGLU_CLAMP])
def test_duplicate_indices_and_ties(expert_type, rng):
    fused, unfused = compiled_pair(expert_type, 4, 2, "float32")
    x = rng.standard_normal((5, H)).astype(np.float32)
    idx = np.array([[1, 1], [0, 3], [2, 2], [3, 0], [0, 0]], np.int64)  # repeated experts in a row
    w = np.full((5, 2), 0.5, np.float32)  # tied routing weights
    assert_close(fused([x, w, idx])[0], unfused([x, w, idx])[0])
    # A repeated expert counts twice: the same as one slot carrying the summed weight.
    dup = np.array([[1, 1], [2, 2], [0, 0], [3, 3], [1, 1]], np.int64)
    once = np.stack([dup[:, 0], (dup[:, 0] + 1) % 4], 1)
    summed = np.stack([w.sum(1), np.zeros(5, np.float32)], 1)
    assert_close(fused([x, w, dup])[0], fused([x, summed, once])[0])


def test_gemm2_clamp_engages_on_both_lanes(rng):
    """Large inputs push both the gate and the up lane past the limit; the clamp must match plain ops."""
    experts = random_experts(4, H, I, GEMM2_BIAS_SWIGLU_CLAMP, seed=3, expert_alpha=0.5, gate_idx=1)
    x = (20 * rng.standard_normal((16, H))).astype(np.float32)
    gate_up = x @ experts.weights[0][0] + experts.weights[1][0]
    assert (gate_up[:, 1::2] > 0.5).any() and (np.abs(gate_up[:, 0::2]) > 0.5).any()
    w, idx = routing(rng, 16, 4, 2)
    got = compile_f32(fused_model(experts, top_k=2))([x, w, idx])[0]
    assert_close(got, compile_f32(unfused_model(experts, top_k=2))([x, w, idx])[0])
    unclamped = Experts(experts.expert_type, experts.weights, 0.0, experts.expert_beta, 1)
    assert not np.allclose(got, compile_f32(fused_model(unclamped, top_k=2))([x, w, idx])[0], rtol=1e-2)


@pytest.mark.parametrize("index_type", ["i32", "i64"])
def test_index_types_and_weights_without_decompression(index_type, rng):
    experts = random_experts(4, H, I, GEMM3_SWIGLU, dtype=np.float16, seed=5)
    # f16 weights straight into FusedExperts (no Convert) must give what the decompressed graph gives.
    direct = compile_f32(fused_model(experts, top_k=2, index_type=index_type, decompress=False))
    reference = compile_f32(unfused_model(experts, top_k=2, index_type=index_type))
    x = rng.standard_normal((9, H)).astype(np.float32)
    w, idx = routing(rng, 9, 4, 2)
    idx = idx.astype(np.int32 if index_type == "i32" else np.int64)
    assert_close(direct([x, w, idx])[0], reference([x, w, idx])[0])


def test_f16_activations(rng):
    """f16 hidden states in and out: compared to the f32 graph within f16 resolution (2^-10 relative)."""
    experts = random_experts(4, H, I, GEMM3_SWIGLU, seed=6)
    x = rng.standard_normal((7, H)).astype(np.float16)
    w, idx = routing(rng, 7, 4, 2)
    got = compile_f32(fused_model(experts, top_k=2, float_type=np.float16))([x, w.astype(np.float16), idx])[0]
    assert got.dtype == np.float16
    want = compile_f32(unfused_model(experts, top_k=2))([x.astype(np.float32), w.astype(np.float16), idx])[0]
    assert_close(got.astype(np.float32), want, rtol=4e-3)


def test_out_of_range_index_is_an_error_that_says_so(rng):
    fused, _ = compiled_pair(GEMM3_SWIGLU, 4, 2, "float32")
    x = rng.standard_normal((2, H)).astype(np.float32)
    with pytest.raises(RuntimeError, match=r"topk_indices holds 4, outside the 4 experts"):
        fused([x, np.ones((2, 2), np.float32), np.array([[0, 4], [1, 2]])])
    with pytest.raises(RuntimeError, match=r"topk_indices holds -1"):
        fused([x, np.ones((2, 2), np.float32), np.array([[0, -1], [1, 2]])])
