"""FusedExperts semantics in numpy: the sparse reference kernel behind `FusedExperts.evaluate`.

Only routed (token, expert) pairs are computed, grouped by expert, so the cost grows with T*K rather
than T*E. Everything is computed in float32 whatever the storage type; the caller casts the result.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GEMM3_SWIGLU = "gemm3_swiglu"
GEMM2_BIAS_SWIGLU_CLAMP = "gemm2_bias_swiglu_clamp"
EXPERT_TYPES = (GEMM3_SWIGLU, GEMM2_BIAS_SWIGLU_CLAMP)


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
    """One expert's MLP on rows `x` [n, H]; `weights` are that expert's 2-D/1-D slices, float32."""
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
    weights: Sequence[np.ndarray],
    expert_type: str = GEMM3_SWIGLU,
    expert_alpha: float = 0.0,
    expert_beta: float = 1.0,
    gate_idx: int = 0,
) -> np.ndarray:
    """out[t] = sum_j routing_weights[t, j] * expert_{topk_indices[t, j]}(x[t]), as float32 [..., H].

    `weights` are stacked per expert, [E, in, out] matrices and [E, out] biases, in the input order of
    FusedExperts (after topk_indices). Any array type whose `[e]` gives a float-convertible slice works.
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

    # Sort the T*K routing slots by expert so each expert runs once on all its rows.
    flat = idx.ravel()
    order = np.argsort(flat, kind="stable")
    counts = np.bincount(flat, minlength=num_experts)
    ends = np.cumsum(counts)
    contrib = np.zeros((tokens * top_k, hidden), dtype=np.float32)
    for e in np.flatnonzero(counts):
        slots = order[ends[e] - counts[e] : ends[e]]
        expert_weights = [np.asarray(w[e], dtype=np.float32) for w in weights]
        y = expert_forward(x[slots // top_k], expert_weights, expert_type, expert_alpha, expert_beta, gate_idx)
        contrib[slots] = y * rw[slots]
    out = contrib.reshape(tokens, top_k, hidden).sum(axis=1)
    return out.reshape(hidden_states.shape)
