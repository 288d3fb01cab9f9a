"""The reference kernel reads weights as stored, one expert at a time, and gives bit for bit what widening
every expert to float32 first (the kernel before it did so) gives.

Tolerance: none. Widening f16, bf16 and int8 codes to float32 is exact, and each expert's GEMMs see the same
float32 rows and weights in the same order, so results must be identical (assert_array_equal), whatever the
storage and the number of threads. Shapes are small, so BLAS runs one thread per GEMM either way.
"""

import os

import numpy as np
import pytest
from conftest import compile_f32

from models.synthetic import fused_model, random_experts
from moe_fusion import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU, reference
from moe_fusion.reference import ExpertWeights, bf16_weights, expert_forward, fused_experts, widen

E, H, I, K = 6, 13, 11, 2


def all_f32_kernel(x, rw, idx, weights, expert_type, alpha, beta, gate_idx):
    """The kernel as it was: every weight widened to float32 up front, rows gathered per expert."""
    weights = [np.asarray(w, dtype=np.float32) for w in weights]
    tokens, top_k = idx.shape
    flat = idx.ravel()
    order = np.argsort(flat, kind="stable")
    counts, ends = np.bincount(flat, minlength=E), np.cumsum(np.bincount(flat, minlength=E))
    contrib = np.zeros((tokens * top_k, H), np.float32)
    for e in np.flatnonzero(counts):
        slots = order[ends[e] - counts[e] : ends[e]]
        y = expert_forward(x[slots // top_k], [w[e] for w in weights], expert_type, alpha, beta, gate_idx)
        contrib[slots] = y * rw.reshape(-1, 1)[slots]
    return contrib.reshape(tokens, top_k, H).sum(axis=1)


def to_bf16_bits(values):
    """Round to bf16 (nearest even): the uint16 bits, and their exact float32 values."""
    bits = np.ascontiguousarray(values, np.float32).view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return rounded, (rounded.astype(np.uint32) << 16).view(np.float32)


def int8_lazy(values):
    """Per-output-channel symmetric int8 codes, decompressed per expert on demand; counts the calls."""
    scale = np.abs(values).max(axis=-2, keepdims=True).astype(np.float32) / 127 + 1e-8  # [E, 1, out]
    codes = np.round(values / scale).astype(np.int8)
    calls = []

    def expert(e):
        calls.append(e)
        return codes[e].astype(np.float32) * scale[e]

    return ExpertWeights(codes.shape, expert), codes.astype(np.float32) * scale, calls


def case(expert_type, rng, tokens=9):
    experts = random_experts(E, H, I, expert_type, seed=7, expert_alpha=0.5 if expert_type != GEMM3_SWIGLU else 0.0)
    x = (4 * rng.standard_normal((tokens, H))).astype(np.float32)
    idx = np.argsort(rng.random((tokens, E)), axis=1)[:, :K]
    idx[0] = 0  # a repeated expert in a row
    rw = rng.random((tokens, K)).astype(np.float32)
    attrs = experts.attributes
    return x, rw, idx, experts.weights, (expert_type, attrs["expert_alpha"], attrs["expert_beta"], attrs["gate_idx"])


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("storage", ["f32", "f16", "bf16", "int8-lazy"])
@pytest.mark.parametrize("expert_type", [GEMM3_SWIGLU, GEMM2_BIAS_SWIGLU_CLAMP])
def test_weights_as_stored_equal_all_f32_bit_for_bit(expert_type, storage, threads, rng):
    x, rw, idx, weights, attrs = case(expert_type, rng)
    if storage == "f16":
        stored = [w.astype(np.float16) for w in weights]
        widened = [w.astype(np.float32) for w in stored]
    elif storage == "bf16":
        pairs = [to_bf16_bits(w) for w in weights]
        stored, widened = [bf16_weights(bits) for bits, _ in pairs], [values for _, values in pairs]
    elif storage == "int8-lazy":  # matrices lazily decompressed, biases as they are
        lazy = [int8_lazy(w) if w.ndim == 3 else (w, w, []) for w in weights]
        stored, widened = [s for s, _, _ in lazy], [v for _, v, _ in lazy]
    else:
        stored = widened = weights
    want = all_f32_kernel(x, rw, idx, widened, *attrs)
    got = fused_experts(x, rw, idx, stored, *attrs, threads=threads)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
    assert not np.array_equal(want, all_f32_kernel(x, rw, np.roll(idx, 1, axis=1) % E, widened, *attrs))


def test_lazy_weights_decompress_each_selected_expert_once(rng):
    x, rw, idx, weights, attrs = case(GEMM3_SWIGLU, rng, tokens=3)
    idx = np.array([[4, 1], [1, 4], [4, 4]])  # experts 1 and 4 only
    lazy = [int8_lazy(w) for w in weights]
    fused_experts(x, rw, idx, [s for s, _, _ in lazy], *attrs, threads=2)
    for _, _, calls in lazy:
        assert sorted(calls) == [1, 4]


def test_widen_keeps_f32_and_converts_f16_exactly():
    w = np.random.default_rng(0).standard_normal((3, 5, 4)).astype(np.float32)
    assert widen(w[1]) is w[1] or np.shares_memory(widen(w[1]), w)  # f32: no copy
    half = w.astype(np.float16)
    special = np.array([[0.0, -0.0, np.inf, -np.inf], [np.nan, 6e-8, -6e-5, 65504]], np.float16)  # subnormals too
    big = np.random.default_rng(1).standard_normal((300, 250)).astype(np.float16)  # OpenVINO's conversion
    big[0, :8] = special.ravel()
    for slice_ in (half[2], half[2].T, special, big, big.T):
        got = widen(slice_)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, slice_.astype(np.float32))
        buffer = np.full(slice_.T.shape if slice_.flags.f_contiguous and slice_.ndim == 2 and not
                         slice_.flags.c_contiguous else slice_.shape, np.nan, np.float32)
        again = widen(slice_, out=buffer)  # into a kept buffer (the kernel's per-thread one)
        assert np.shares_memory(again, buffer)
        np.testing.assert_array_equal(again, slice_.astype(np.float32))


@pytest.mark.skipif(len(reference.CPUS) < 2, reason="needs 2 CPUs to see a pin")
def test_pool_threads_run_on_every_cpu_even_when_made_from_a_pinned_thread():
    """Inside evaluate the CPU plugin pins the calling thread to one core; the kernel's worker threads
    must not inherit that pin (two workers on one core run the layer ~20x slower)."""
    pinned = {min(reference.CPUS)}
    results = {}

    def make_pool_pinned():
        os.sched_setaffinity(0, pinned)
        pool = reference.new_pool(2)  # a fresh pool, made from the pinned thread
        results["workers"] = {frozenset(a) for a in pool.map(lambda _: os.sched_getaffinity(0), range(8))}
        pool.shutdown()

    import threading

    thread = threading.Thread(target=make_pool_pinned)
    thread.start()
    thread.join()
    assert results["workers"] == {reference.CPUS}


def test_evaluate_on_the_thread_pool_equals_a_direct_call(rng):
    """A layer large enough for the thread pool, run through a compiled model (the plugin's pinned thread,
    weights as the plugin hands them) and directly: identical."""
    experts = random_experts(8, 512, 512, GEMM3_SWIGLU, dtype=np.float16, seed=9)
    per_expert = 3 * 512 * 512
    assert 8 * per_expert >= reference.PARALLEL_ELEMENTS  # the pool path
    compiled = compile_f32(fused_model(experts, top_k=2))
    x = rng.standard_normal((64, 512)).astype(np.float32)
    idx = np.argsort(rng.random((64, 8)), axis=1)[:, :2]
    rw = rng.random((64, 2)).astype(np.float32)
    got = compiled([x, rw, idx])[0]
    np.testing.assert_array_equal(got, fused_experts(x, rw, idx, experts.weights))
    np.testing.assert_array_equal(got, fused_experts(x, rw, idx, experts.weights, threads=1))


def _run_in_child(args):
    return fused_experts(*args, threads=2)


def test_pool_after_fork_and_blas_threads_restored_after_concurrent_calls(rng):
    """A forked child (the fuzzing harness's workers) gets its own pool instead of waiting forever on the
    parent's threads; concurrent calls leave BLAS's thread count as it was."""
    import multiprocessing
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_info

    x, rw, idx, weights, attrs = case(GEMM3_SWIGLU, rng)
    args = (x, rw, idx, weights, *attrs)
    blas_threads = [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]
    want = fused_experts(*args, threads=2)  # the parent's pool exists now
    with multiprocessing.get_context("fork").Pool(1) as child:
        np.testing.assert_array_equal(child.apply_async(_run_in_child, (args,)).get(timeout=60), want)
    with ThreadPoolExecutor(4) as callers:
        for got in callers.map(lambda _: fused_experts(*args, threads=2), range(16)):
            np.testing.assert_array_equal(got, want)
    assert [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"] == blas_threads


def test_widening_buffers_kept_between_calls_up_to_a_cap(rng, monkeypatch):
    """f16 experts are widened into buffers lent from call to call (fresh pages per call cost more than the
    widening), unless they would hold more than the cap; either way results are unchanged."""
    x, rw, idx, weights, attrs = case(GEMM3_SWIGLU, rng)
    half = [w.astype(np.float16) for w in weights]
    want = fused_experts(x, rw, idx, [w.astype(np.float32) for w in half], *attrs)
    monkeypatch.setattr(reference, "spare_buffers", [])
    np.testing.assert_array_equal(fused_experts(x, rw, idx, half, *attrs, threads=1), want)
    (kept,) = reference.spare_buffers
    assert sorted(b.shape for b in kept.values()) == sorted([(H, I), (H, I), (I, H)])
    np.testing.assert_array_equal(fused_experts(x, rw, idx, half, *attrs, threads=1), want)
    assert reference.spare_buffers == [kept]  # the same set, reused
    monkeypatch.setattr(reference, "_KEEP_BYTES", 100)
    np.testing.assert_array_equal(fused_experts(x, rw, idx, half, *attrs, threads=1), want)
    assert reference.spare_buffers == []


def test_bf16_bits_widen_exactly_and_round_to_nearest_even_keeping_nan():
    from moe_fusion.reference import bf16_to_f32, f32_to_bf16

    values = np.array([1.0, -2.5, 3.0e38, 1.00390625, 1.01171875], np.float32)  # ties: to even
    assert f32_to_bf16(values).tolist() == [0x3F80, 0xC020, 0x7F62, 0x3F80, 0x3F82]
    exact = np.array([1.0, -2.5, 1.015625, -0.0], np.float32)  # representable in bf16: round trip unchanged
    np.testing.assert_array_equal(bf16_to_f32(f32_to_bf16(exact)), exact)
    payload_nan = np.array([0x7FFFFFFF, 0xFFFFFFFF], np.uint32).view(np.float32)  # the carry would give -0 / NaN
    assert np.isnan(bf16_to_f32(f32_to_bf16(payload_nan))).all()
