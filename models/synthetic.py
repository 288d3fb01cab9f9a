"""Synthetic MoE graphs built from numpy weights: FusedExperts models and their unfused equivalents.

`fused_model` wires a FusedExperts; `unfused_model` computes the same experts in plain OpenVINO ops the way
exporters write them (per-expert `MatMul(transpose_b=True)` on `[out, in]` weights, dense `[T, E]` routing
from OneHot), so the op can be checked against a formulation that shares none of its code.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU, FusedExperts


@dataclass
class Experts:
    """Stacked expert weights in FusedExperts layout (`[E, in, out]`, biases `[E, out]`), numpy."""

    expert_type: str
    weights: list[np.ndarray]  # FusedExperts input order, from input 3 on
    expert_alpha: float = 0.0
    expert_beta: float = 1.0
    gate_idx: int = 0

    @property
    def num_experts(self) -> int:
        return self.weights[0].shape[0]

    @property
    def hidden_size(self) -> int:
        return self.weights[0].shape[1]

    @property
    def intermediate_size(self) -> int:
        return self.weights[-2 if self.expert_type == GEMM2_BIAS_SWIGLU_CLAMP else -1].shape[1]

    @property
    def attributes(self) -> dict:
        return {
            "expert_type": self.expert_type,
            "expert_alpha": self.expert_alpha,
            "expert_beta": self.expert_beta,
            "gate_idx": self.gate_idx,
        }


def random_experts(
    num_experts: int,
    hidden_size: int,
    intermediate_size: int,
    expert_type: str = GEMM3_SWIGLU,
    dtype: type = np.float32,
    seed: int = 0,
    expert_alpha: float | None = None,
    expert_beta: float | None = None,
    gate_idx: int = 0,
) -> Experts:
    """Weights scaled like a trained layer (unit-variance activations), biases small and non-zero."""
    rng = np.random.default_rng(seed)

    def mat(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) / np.sqrt(shape[-2])).astype(dtype)

    e, h, i = num_experts, hidden_size, intermediate_size
    if expert_type == GEMM3_SWIGLU:
        return Experts(
            expert_type,
            [mat(e, h, i), mat(e, h, i), mat(e, i, h)],
            expert_beta=1.0 if expert_beta is None else expert_beta,
        )
    biases = [(0.1 * rng.standard_normal(s)).astype(dtype) for s in ((e, 2 * i), (e, h))]
    return Experts(
        expert_type,
        [mat(e, h, 2 * i), biases[0], mat(e, i, h), biases[1]],
        expert_alpha=7.0 if expert_alpha is None else expert_alpha,
        expert_beta=1.702 if expert_beta is None else expert_beta,
        gate_idx=gate_idx,
    )


@dataclass
class Router:
    """softmax(x @ weight) -> top-k -> optionally renormalised; `weight` is `[H, E]`."""

    weight: np.ndarray
    top_k: int
    normalize: bool = True
    index_type: str = "i64"

    def build(self, hidden: ov.Output) -> tuple[ov.Output, ov.Output]:
        logits = ops.matmul(hidden, _const(self.weight), False, False)
        probs = ops.softmax(logits, -1)
        topk = ops.topk(probs, self.top_k, -1, "max", "value", self.index_type)
        weights = topk.output(0)
        if self.normalize:
            weights = ops.divide(weights, ops.reduce_sum(weights, -1, True)).output(0)
        return weights, topk.output(1)


def _const(array: np.ndarray) -> ov.Output:
    # Constant() needs C-contiguous data: a strided f16 view would silently become i16.
    return ops.constant(np.ascontiguousarray(array)).output(0)


def _weight(array: np.ndarray, float_type: type) -> ov.Output:
    """A weight as exporters store it: f32 as is, f16/bf16 behind a decompression Convert."""
    node = _const(array)
    return node if array.dtype == float_type else ops.convert(node, float_type).output(0)


def _inputs(experts: Experts, router: Router | None, top_k: int | None, float_type: type, index_type: str):
    hidden = ops.parameter([-1, experts.hidden_size], float_type, name="hidden_states")
    params = [hidden]
    if router is not None:
        routing, indices = router.build(hidden.output(0))
    else:
        routing = ops.parameter([-1, top_k], float_type, name="routing_weights")
        indices = ops.parameter([-1, top_k], np.int32 if index_type == "i32" else np.int64, name="topk_indices")
        params += [routing, indices]
        routing, indices = routing.output(0), indices.output(0)
    return params, hidden.output(0), routing, indices


def fused_model(
    experts: Experts,
    router: Router | None = None,
    top_k: int | None = None,
    float_type: type = np.float32,
    index_type: str = "i64",
    decompress: bool = True,
) -> ov.Model:
    """hidden_states [T, H] (+ routing_weights, topk_indices [T, K] when no router) -> FusedExperts."""
    params, hidden, routing, indices = _inputs(experts, router, top_k, float_type, index_type)
    weights = [_weight(w, float_type) if decompress else _const(w) for w in experts.weights]
    node = FusedExperts(hidden, routing, indices, *weights, **experts.attributes)
    node.set_friendly_name("experts")
    return ov.Model([node.output(0)], params, "fused_experts")


def unfused_model(
    experts: Experts,
    router: Router | None = None,
    top_k: int | None = None,
    float_type: type = np.float32,
    index_type: str = "i64",
) -> ov.Model:
    """The same experts, one dense MLP per expert in plain ops, weighted by OneHot routing."""
    params, hidden, routing, indices = _inputs(experts, router, top_k, float_type, index_type)
    num_experts = experts.num_experts
    # dense[t, e] = sum_j routing[t, j] * (indices[t, j] == e): repeated experts add up.
    one_hot = ops.one_hot(indices, num_experts, np.array(1, float_type), np.array(0, float_type), -1)
    dense = ops.reduce_sum(ops.multiply(one_hot, ops.unsqueeze(routing, -1)), 1, False)

    def linear(x, w: np.ndarray, e: int):  # exporters keep nn.Linear's [out, in] and set transpose_b
        return ops.matmul(x, _weight(np.ascontiguousarray(w[e].T), float_type), False, True)

    total = None
    for e in range(num_experts):
        if experts.expert_type == GEMM3_SWIGLU:
            w_gate, w_up, w_down = experts.weights
            gate = linear(hidden, w_gate, e)
            act = ops.swish(gate, np.array(experts.expert_beta, float_type))
            y = linear(ops.multiply(act, linear(hidden, w_up, e)), w_down, e)
        else:
            w_gate_up, b_gate_up, w_down, b_down = experts.weights
            gate_up = ops.add(linear(hidden, w_gate_up, e), _weight(b_gate_up[e], float_type))
            lane = experts.gate_idx
            gate = ops.slice(gate_up, [lane], [np.iinfo(np.int64).max], [2], [-1])
            up = ops.slice(gate_up, [1 - lane], [np.iinfo(np.int64).max], [2], [-1])
            if experts.expert_alpha > 0:
                gate = ops.minimum(gate, np.array(experts.expert_alpha, float_type))
                up = ops.clamp(up, -experts.expert_alpha, experts.expert_alpha)
            glu = ops.multiply(gate, ops.sigmoid(ops.multiply(gate, np.array(experts.expert_beta, float_type))))
            act = ops.multiply(ops.add(up, np.array(1, float_type)), glu)
            y = ops.add(linear(act, w_down, e), _weight(b_down[e], float_type))
        weighted = ops.multiply(y, ops.slice(dense, [e], [e + 1], [1], [1]))
        total = weighted if total is None else ops.add(total, weighted)
    return ov.Model([total.output(0)], params, "unfused_experts")


@dataclass
class LogitsRouter:
    """GPT-OSS's router: top-k on `x @ weight + bias`, then softmax over the k values; `weight` is `[H, E]`."""

    weight: np.ndarray
    bias: np.ndarray
    top_k: int

    def build(self, hidden: ov.Output) -> tuple[ov.Output, ov.Output]:
        logits = ops.add(ops.matmul(hidden, _const(self.weight), False, False), _const(self.bias))
        topk = ops.topk(logits, self.top_k, -1, "max", "value", "i64")
        return ops.softmax(topk.output(0), -1).output(0), topk.output(1)

    def select(self, x: np.ndarray) -> np.ndarray:
        """The experts it picks for rows `x` [T, H], as numpy: [T, K] indices."""
        return np.argsort(-(x @ self.weight + self.bias), axis=-1, kind="stable")[:, : self.top_k]


def tiled_gptoss_model(experts: Experts, router: LogitsRouter, transpose_b: bool = True) -> ov.Model:
    """GEMM2 experts in the tiled form optimum-intel exports for GPT-OSS (`patterns/gptoss.py`): every
    expert on every token, stacked weights, lanes cut by stride-2 Slices, routing scattered into a dense
    `[T, E]`. `transpose_b` stores weights `[E, out, in]` as OpenVINO's conversion leaves them when the
    biases survive; all-zero biases get no Add at all, as at export."""
    w_gate_up, b_gate_up, w_down, b_down = experts.weights
    e, h = experts.num_experts, experts.hidden_size
    limit, lane = experts.expert_alpha, experts.gate_idx
    hidden = ops.parameter([-1, h], np.float32, name="hidden_states")
    routing, indices = router.build(hidden.output(0))

    def bmm(x, w: np.ndarray, b: np.ndarray):
        stored = np.swapaxes(w, -1, -2) if transpose_b else w
        y = ops.matmul(x, _const(stored), False, transpose_b)
        return y if not b.any() else ops.add(y, _const(b[:, None, :]))

    x = ops.reshape(ops.tile(hidden, [e, 1]), [e, -1, h], False)
    gate_up = bmm(x, w_gate_up, b_gate_up)
    end = np.iinfo(np.int64).max
    gate = ops.minimum(ops.slice(gate_up, [lane], [end], [2], [2]), np.array(limit, np.float32))
    up = ops.clamp(ops.slice(gate_up, [1 - lane], [end], [2], [2]), -limit, limit)
    glu = ops.swish(gate, np.array(experts.expert_beta, np.float32))
    y = bmm(ops.multiply(ops.add(up, np.array(1, np.float32)), glu), w_down, b_down)  # [E, T, H]

    tokens = ops.gather(ops.shape_of(hidden), [0], 0)
    zeros = ops.broadcast(np.array(0, np.float32), ops.concat([tokens, _const(np.array([e]))], 0))  # [T, E]
    dense = ops.scatter_elements_update(zeros, indices, routing, 1)  # [T, E]
    weighted = ops.multiply(y, ops.unsqueeze(ops.transpose(dense, [1, 0]), -1))
    return ov.Model([ops.reduce_sum(weighted, 0, False).output(0)], [hidden], "tiled_gptoss")
