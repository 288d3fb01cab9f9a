"""FusedExperts semantics in numpy: the sparse reference kernel behind `FusedExperts.evaluate`.

Only routed (token, expert) pairs are computed, grouped by expert, so the cost grows with T*K rather
than T*E. Everything is computed in float32 whatever the storage type; the caller casts the result.
Weights stay as stored (f16, bf16 bits, or anything lazily decompressed, see `ExpertWeights`) and are
widened to float32 one expert at a time, so at most one f32 copy of an expert per worker thread is alive.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from threadpoolctl import ThreadpoolController

GEMM3_SWIGLU = "gemm3_swiglu"
GEMM2_BIAS_SWIGLU_CLAMP = "gemm2_bias_swiglu_clamp"
EXPERT_TYPES = (GEMM3_SWIGLU, GEMM2_BIAS_SWIGLU_CLAMP)

# Below this many weight elements to read (selected experts x elements per expert) one thread does it all:
# tests and small layers skip the pool's overhead.
PARALLEL_ELEMENTS = 1 << 22
# f16 converts through OpenVINO in chunks of this many elements (fewer: numpy is faster than making a
# Constant, ~10 us; many more: each chunk's fresh pages fault).
_OV_CONVERT_ELEMENTS = 1 << 16
# The CPUs this process may use, read at import: inside `evaluate` the CPU plugin has pinned the calling
# thread to one core, and threads started there would inherit that pin.
CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()


class ExpertWeights:
    """Stacked weights of `shape` [E, ...] whose `[e]` calls `expert(e)`: e.g. int8/int4 codes decompressed
    on demand, one expert at a time, instead of all experts materialised in float32.

    The kernel is done with the array `[e]` returned before it asks the same thread for another expert of
    the same weights, so `expert` may fill and return a buffer it keeps per thread (see `bf16_weights`):
    fresh pages cost more than the decompression (page faults, ~4 ns per element in this VM)."""

    def __init__(self, shape: Sequence[int], expert: Callable[[int], np.ndarray]) -> None:
        self.shape = tuple(int(d) for d in shape)
        self._expert = expert

    def __getitem__(self, e: int) -> np.ndarray:
        return self._expert(int(e))

    def __len__(self) -> int:
        return self.shape[0]


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 values from their uint16 bits (how numpy shows an OpenVINO bf16 tensor: as float16), exactly: bf16
    is the high half of a float32."""
    return (bits.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(values: np.ndarray) -> np.ndarray:
    """float32 values as bf16 uint16 bits, rounded to nearest even as OpenVINO rounds; NaN stays NaN (the
    rounding carry would turn some NaN payloads into -0 or Inf)."""
    values = np.ascontiguousarray(values, dtype=np.float32)
    bits = values.view(np.uint32)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
    return np.where(np.isnan(values), np.uint16(0x7FC0), rounded)


def bf16_weights(bits: np.ndarray) -> ExpertWeights:
    """bf16 weights as stored (their uint16 bits), widened exactly to float32 per expert."""
    bits = bits.view(np.uint16)
    local = threading.local()

    def expert(e: int) -> np.ndarray:
        out = _scratch(local, "bf16", bits.shape[1:], np.uint32)
        np.left_shift(bits[e], 16, out=out, dtype=np.uint32)  # bf16 is the high half of a float32
        return out.view(np.float32)

    return ExpertWeights(bits.shape, expert)


def widen(weight: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """One expert's weight as float32: float32 as it is (no copy); f16 through OpenVINO's conversion in
    chunks (numpy converts f16 one element at a time, ~2x slower), into `out` when given (C-contiguous
    float32 of `weight.shape`, or of its transpose for an out-major slice); anything else via numpy."""
    if not isinstance(weight, np.ndarray) or weight.dtype == np.float32:
        return np.asarray(weight, dtype=np.float32)
    transposed = weight.ndim == 2 and not weight.flags.c_contiguous and weight.T.flags.c_contiguous
    source = weight.T if transposed else weight  # an out-major [out, in] slice seen as [in, out]
    if out is None or out.shape != source.shape:
        out = np.empty(source.shape, np.float32)
    if weight.dtype == np.float16 and weight.size >= _OV_CONVERT_ELEMENTS and source.flags.c_contiguous:
        rows, flat = source.reshape(len(source), -1), out.reshape(len(out), -1)
        step = max(1, _OV_CONVERT_ELEMENTS // rows.shape[1])  # small chunks reuse freed memory: no page faults
        constant = _ov_constant()
        for r in range(0, len(rows), step):
            flat[r : r + step] = constant(rows[r : r + step], shared_memory=True).get_data(dtype=np.float32)
    else:
        np.copyto(out, source)
    return out.T if transposed else out


def _scratch(local: threading.local, key: object, shape: tuple[int, ...], dtype: type = np.float32) -> np.ndarray:
    """A buffer of `shape` kept per thread in `local` under `key`, reused while the shape stays."""
    buffers = local.__dict__.setdefault("buffers", {})
    buffer = buffers.get(key)
    if buffer is None or buffer.shape != tuple(shape) or buffer.dtype != dtype:
        buffer = buffers[key] = np.empty(shape, dtype)
    return buffer


@functools.cache
def _ov_constant():
    from openvino import op  # imported late: the kernel itself is numpy

    return op.Constant


def sigmoid(z: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warnings for large |z|, within an ulp of 1 / (1 + exp(-z)).
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def expert_forward(
    x: np.ndarray,
    weights: Sequence[np.ndarray],
    expert_type: str,
    expert_alpha: float = 0.0,
    expert_beta: float = 1.0,
    gate_idx: int = 0,
) -> np.ndarray:
    """One expert's MLP on rows `x` [n, H]; `weights` are that expert's 2-D/1-D slices, float32. NaN/Inf
    rows propagate as in the unfused graph (each row's own output only), without numpy's warnings."""
    with np.errstate(invalid="ignore", over="ignore"):
        return _expert_forward(x, weights, expert_type, expert_alpha, expert_beta, gate_idx)


def _expert_forward(x, weights, expert_type, expert_alpha, expert_beta, gate_idx) -> np.ndarray:
    if expert_type == GEMM3_SWIGLU:
        w_gate, w_up, w_down = weights
        gate = x @ w_gate
        return (gate * sigmoid(expert_beta * gate) * (x @ w_up)) @ w_down
    w_gate_up, b_gate_up, w_down, b_down = weights
    gate_up = x @ w_gate_up + b_gate_up
    gate, up = gate_up[:, gate_idx::2], gate_up[:, 1 - gate_idx :: 2]
    if expert_alpha > 0:  # expert_alpha is the clamp limit; 0 means "no clamp"
        gate = np.minimum(gate, expert_alpha)
        up = np.clip(up, -expert_alpha, expert_alpha)
    return ((up + 1.0) * gate * sigmoid(expert_beta * gate)) @ w_down + b_down


def fused_experts(
    hidden_states: np.ndarray,
    routing_weights: np.ndarray,
    topk_indices: np.ndarray,
    weights: Sequence[np.ndarray | ExpertWeights],
    expert_type: str = GEMM3_SWIGLU,
    expert_alpha: float = 0.0,
    expert_beta: float = 1.0,
    gate_idx: int = 0,
    threads: int | None = None,
) -> np.ndarray:
    """out[t] = sum_j routing_weights[t, j] * expert_{topk_indices[t, j]}(x[t]), as float32 [..., H].

    `weights` are stacked per expert, [E, in, out] matrices and [E, out] biases, in the input order of
    FusedExperts (after topk_indices). Any array type whose `[e]` gives a float-convertible slice works
    (numpy f32/f16 arrays, `ExpertWeights`); each selected expert is widened to f32 when it runs.
    `threads`: experts run on that many threads (default: the CPUs this process may use, for layers
    large enough to gain), BLAS on one thread; the result does not depend on it.
    """
    hidden = hidden_states.shape[-1]
    x = np.asarray(hidden_states, dtype=np.float32).reshape(-1, hidden)
    tokens, top_k = x.shape[0], topk_indices.shape[-1]
    idx = np.asarray(topk_indices).reshape(tokens, top_k).astype(np.int64, copy=False)
    rw = np.asarray(routing_weights, dtype=np.float32).reshape(tokens * top_k, 1)
    num_experts = weights[0].shape[0]
    if idx.size and (idx.min() < 0 or idx.max() >= num_experts):
        bad = idx[(idx < 0) | (idx >= num_experts)][0]
        raise ValueError(f"topk_indices holds {bad}, outside the {num_experts} experts [0, {num_experts})")

    # Sort the T*K routing slots by expert so each expert runs once on a contiguous run of rows, gathered
    # once for all experts; rows are scattered back to slot order at the end.
    flat = idx.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=num_experts)
    ends = np.cumsum(counts)
    rows = x[order // top_k]
    scaled = np.empty((tokens * top_k, hidden), dtype=np.float32)
    sorted_rw = rw[order]

    def run(e: int) -> None:
        begin, end = ends[e] - counts[e], ends[e]
        with _widening_buffers() as buffers:
            expert_weights = [widen(w[e], _buffer(buffers, i, w)) for i, w in enumerate(weights)]
            y = expert_forward(rows[begin:end], expert_weights, expert_type, expert_alpha, expert_beta, gate_idx)
            np.multiply(y, sorted_rw[begin:end], out=scaled[begin:end])

    selected = np.flatnonzero(counts).tolist()
    per_expert = sum(int(np.prod(w.shape[1:])) for w in weights)
    workers = min(len(selected), threads or len(CPUS) or 1)
    # BLAS on one thread, always: parallelism comes from running experts side by side. Inside `evaluate` the
    # CPU plugin has pinned the caller to one core, and BLAS threads started from there share it (~20x
    # slower, docs/fused_experts.md); results do not depend on the thread count either.
    with _blas_single_threaded():
        if workers > 1 and (threads or per_expert * len(selected) >= PARALLEL_ELEMENTS):
            list(_pool(workers).map(run, selected))
        else:
            for e in selected:
                run(e)
    _trim_widening_buffers()
    contrib = np.empty_like(scaled)
    contrib[order] = scaled
    out = contrib.reshape(tokens, top_k, hidden).sum(axis=1)
    return out.reshape(hidden_states.shape)


_blas = {"lock": threading.Lock(), "users": 0, "limiter": None}


@contextlib.contextmanager
def _blas_single_threaded() -> Iterator[None]:
    """BLAS on one thread while any kernel call runs; the first call in limits it (process-wide,
    as BLAS's setting is), the last one out restores it, however concurrent calls interleave."""
    with _blas["lock"]:
        if _blas["users"] == 0:
            _blas["limiter"] = _controller().limit(limits=1, user_api="blas")
        _blas["users"] += 1
    try:
        yield
    finally:
        with _blas["lock"]:
            _blas["users"] -= 1
            if _blas["users"] == 0:
                _blas["limiter"].restore_original_limits()


# Sets of f32 buffers (one per weight input) that f16 experts are widened into, each lent to one running
# expert at a time: as many sets as experts ever ran at once. Kept between calls up to _KEEP_BYTES (the
# Qwen3-30B-A3B layer: 19 MB per set), as fresh pages per call cost more than the widening (page faults).
spare_buffers: list[dict] = []
_spare_lock = threading.Lock()
_KEEP_BYTES = 1 << 28


@contextlib.contextmanager
def _widening_buffers() -> Iterator[dict]:
    with _spare_lock:
        buffers = spare_buffers.pop() if spare_buffers else {}
    try:
        yield buffers
    finally:
        with _spare_lock:
            spare_buffers.append(buffers)


def _trim_widening_buffers() -> None:
    with _spare_lock:
        if sum(b.nbytes for buffers in spare_buffers for b in buffers.values()) > _KEEP_BYTES:
            spare_buffers.clear()


def _buffer(buffers: dict, slot: int, weight) -> np.ndarray | None:
    """The buffer to widen input `slot`'s expert into (f16 stacks only: f32 needs none, others bring theirs)."""
    if not (isinstance(weight, np.ndarray) and weight.dtype == np.float16):
        return None
    shape = weight.shape[1:]
    if len(shape) == 2 and not weight[0].flags.c_contiguous:  # out-major slices are widened as stored
        shape = shape[::-1]
    if slot not in buffers or buffers[slot].shape != shape:
        buffers[slot] = np.empty(shape, np.float32)
    return buffers[slot]


@functools.cache
def _controller() -> ThreadpoolController:
    return ThreadpoolController()


def _pool(workers: int) -> ThreadPoolExecutor:
    """A pool kept for the process (a forked child makes its own: the parent's threads are not there)."""
    key = (workers, os.getpid())
    if key not in _pools:
        _pools[key] = new_pool(workers)
    return _pools[key]


_pools: dict[tuple[int, int], ThreadPoolExecutor] = {}


def new_pool(workers: int) -> ThreadPoolExecutor:
    """Its threads may run on every CPU the process may use, wherever the pool is made (inside `evaluate`
    the caller is pinned to one core, and threads inherit their maker's pin)."""
    return ThreadPoolExecutor(workers, thread_name_prefix="fused-experts", initializer=_unpin)


def _unpin() -> None:
    if CPUS:
        os.sched_setaffinity(0, CPUS)  # pid 0: this thread only
