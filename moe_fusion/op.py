"""`FusedExperts`: the one op every MoE pattern rewrites into (spec: docs/fused_experts.md).

Weights are stacked per expert and transposed, `[E, in, out]`, so every expert GEMM is `x @ W[e]`.
The op runs on any OpenVINO device that accepts Python ops through `evaluate`, which calls the sparse
numpy kernel in `moe_fusion.reference`; `moe_fusion.lower` replaces it with native ops for speed.
"""

from __future__ import annotations

import math

import numpy as np
import openvino as ov
from openvino import DiscreteTypeInfo, Op, OpExtension

from moe_fusion.reference import (
    EXPERT_TYPES,
    GEMM2_BIAS_SWIGLU_CLAMP,
    GEMM3_SWIGLU,
    ExpertWeights,
    bf16_to_f32,
    bf16_weights,
    f32_to_bf16,
    fused_experts,
)

INPUT_NAMES = {
    GEMM3_SWIGLU: ("hidden_states", "routing_weights", "topk_indices", "w_gate", "w_up", "w_down"),
    GEMM2_BIAS_SWIGLU_CLAMP: (
        "hidden_states",
        "routing_weights",
        "topk_indices",
        "w_gate_up",
        "b_gate_up",
        "w_down",
        "b_down",
    ),
}
# Expected weight shapes, in the symbols E (experts), H (hidden), I (intermediate).
WEIGHT_LAYOUTS = {
    GEMM3_SWIGLU: (("E", "H", "I"), ("E", "H", "I"), ("E", "I", "H")),
    GEMM2_BIAS_SWIGLU_CLAMP: (("E", "H", "2I"), ("E", "2I"), ("E", "I", "H"), ("E", "H")),
}
FLOAT_TYPES = (ov.Type.f32, ov.Type.f16, ov.Type.bf16)
INDEX_TYPES = (ov.Type.i32, ov.Type.i64)


class FusedExpertsError(ValueError):
    """Inputs or attributes that do not describe a valid FusedExperts."""


class FusedExperts(Op):
    """Routed experts: `out[t] = sum_j routing_weights[t, j] * expert_{topk_indices[t, j]}(x[t])`.

    Attributes:
        expert_type: `gemm3_swiglu` (Mixtral/Qwen/DeepSeek-style SwiGLU) or `gemm2_bias_swiglu_clamp`
            (GPT-OSS: interleaved gate_up with biases and a clamp).
        expert_alpha: clamp limit of `gemm2_bias_swiglu_clamp`; 0 means no clamp. Unused by gemm3.
        expert_beta: swish beta, `swish(g) = g * sigmoid(beta * g)` (GPT-OSS: 1.702).
        gate_idx: gemm2 only, which interleaved lane of gate_up is the gate (0: even columns).
    """

    class_type_info = DiscreteTypeInfo("FusedExperts", "extension")

    def __init__(
        self,
        hidden_states: ov.Output | ov.Node | None = None,
        routing_weights: ov.Output | ov.Node | None = None,
        topk_indices: ov.Output | ov.Node | None = None,
        *weights: ov.Output | ov.Node,
        expert_type: str = GEMM3_SWIGLU,
        expert_alpha: float = 0.0,
        expert_beta: float = 1.0,
        gate_idx: int = 0,
    ) -> None:
        super().__init__(self)
        # Float and int defaults fix how the IR reader parses these attributes back (an int default
        # would truncate "1.702"), so keep every value's Python type stable.
        self._attrs = {
            "expert_type": str(expert_type),
            "expert_alpha": float(expert_alpha),
            "expert_beta": float(expert_beta),
            "gate_idx": int(gate_idx),
        }
        if hidden_states is not None:  # no inputs: created empty by the IR reader, then visited
            inputs = [hidden_states, routing_weights, topk_indices, *weights]
            self.set_arguments([i.output(0) if isinstance(i, ov.Node) else i for i in inputs])
            self.constructor_validate_and_infer_types()

    def get_type_info(self) -> DiscreteTypeInfo:
        return FusedExperts.class_type_info

    @property
    def expert_type(self) -> str:
        return self._attrs["expert_type"]

    @property
    def attributes(self) -> dict:
        """A copy of expert_type, expert_alpha, expert_beta and gate_idx."""
        return dict(self._attrs)

    @property
    def num_experts(self) -> int:
        return self.get_input_partial_shape(3)[0].get_length()

    def visit_attributes(self, visitor) -> bool:
        visitor.on_attributes(self._attrs)
        return True

    def clone_with_new_inputs(self, new_inputs) -> FusedExperts:
        return FusedExperts(*new_inputs, **self._attrs)

    def validate_and_infer_types(self) -> None:
        _validate(self)
        self.set_output_type(0, self.get_input_element_type(0), self.get_input_partial_shape(0))

    def has_evaluate(self) -> bool:
        return True

    def evaluate(self, outputs, inputs) -> bool:
        # Weights go to the kernel as stored (f16 stays f16, bf16 as its bits), widened per expert there.
        # Inside a compiled model they are often f32 already: the CPU plugin folds decompression subgraphs
        # (int4/int8 codes, f16 Converts) into f32 constants at compile time, before this op sees them.
        arrays = [_to_numpy(t) for t in inputs[:3]]
        weights = [_weights(t) for t in inputs[3:]]
        out = fused_experts(arrays[0], arrays[1], arrays[2], weights, **self._attrs)
        outputs[0].shape = inputs[0].shape
        _write(outputs[0], out)
        return True


def register(core: ov.Core) -> ov.Core:
    """Teach `core` to read and compile FusedExperts (IR layers of type FusedExperts, version extension)."""
    core.add_extension(OpExtension(FusedExperts))
    return core


# ---- validation -------------------------------------------------------------------------------------


def _validate(op: FusedExperts) -> None:
    attrs = op._attrs
    expert_type = attrs["expert_type"]
    if expert_type not in EXPERT_TYPES:
        raise FusedExpertsError(f"FusedExperts expert_type {expert_type!r} is unknown; expected one of {EXPERT_TYPES}")
    if attrs["gate_idx"] not in (0, 1):
        raise FusedExpertsError(f"FusedExperts gate_idx is {attrs['gate_idx']}, expected 0 or 1")
    if not (math.isfinite(attrs["expert_alpha"]) and attrs["expert_alpha"] >= 0):
        raise FusedExpertsError(f"FusedExperts expert_alpha (clamp limit) is {attrs['expert_alpha']}, expected >= 0")
    if not math.isfinite(attrs["expert_beta"]):
        raise FusedExpertsError(f"FusedExperts expert_beta (swish beta) is {attrs['expert_beta']}, expected finite")

    names = INPUT_NAMES[expert_type]
    if op.get_input_size() != len(names):
        raise FusedExpertsError(
            f"FusedExperts {expert_type} takes {len(names)} inputs ({', '.join(names)}), got {op.get_input_size()}"
        )

    def where(i: int) -> str:
        return f"FusedExperts input {i} '{names[i]}'"

    shapes = [op.get_input_partial_shape(i) for i in range(len(names))]
    types = [op.get_input_element_type(i) for i in range(len(names))]
    for i, t in enumerate(types):
        allowed = INDEX_TYPES if i == 2 else FLOAT_TYPES
        if t != ov.Type.dynamic and t not in allowed:
            raise FusedExpertsError(
                f"{where(i)} has element type {t.get_type_name()}, expected one of "
                f"{', '.join(a.get_type_name() for a in allowed)}"
            )

    hidden, routing, indices = shapes[:3]
    if hidden.rank.is_static and hidden.rank.get_length() < 1:
        raise FusedExpertsError(f"{where(0)} has shape {hidden}, expected [..., H]")
    for i in (1, 2):
        if shapes[i].rank.is_static and shapes[i].rank.get_length() != 2:
            raise FusedExpertsError(f"{where(i)} has shape {shapes[i]}, expected [T, K]")
    if routing.rank.is_static and indices.rank.is_static:
        for axis, label in ((0, "T"), (1, "K")):
            if not routing[axis].compatible(indices[axis]):
                raise FusedExpertsError(
                    f"{where(2)} has shape {indices}, expected {label} to match {where(1)} {routing}"
                )
    if hidden.is_static and routing.rank.is_static and routing[0].is_static:
        tokens = int(np.prod([d.get_length() for d in hidden][:-1], dtype=np.int64))
        if routing[0].get_length() != tokens:
            raise FusedExpertsError(
                f"{where(1)} has shape {routing}, expected [{tokens}, K]: T is the "
                f"product of hidden_states' leading dims {hidden}"
            )

    for i in range(3, len(names)):
        if not shapes[i].is_static:
            raise FusedExpertsError(f"{where(i)} has shape {shapes[i]}, expected a static shape")
    weight_shapes = [[d.get_length() for d in s] for s in shapes[3:]]
    # The first weight ([E, H, I] or [E, H, 2I]) fixes E and I; hidden_states fixes H when static.
    first = weight_shapes[0]
    if len(first) != 3:
        raise FusedExpertsError(f"{where(3)} has shape {first}, expected [{', '.join(WEIGHT_LAYOUTS[expert_type][0])}]")
    num_experts, hidden_size, inter = first
    if expert_type == GEMM2_BIAS_SWIGLU_CLAMP:
        if inter % 2:
            raise FusedExpertsError(f"{where(3)} has shape {first}, expected an even last dim (interleaved lanes)")
        inter //= 2
    if hidden.rank.is_static and hidden[-1].is_static:
        hidden_size = hidden[-1].get_length()
    sizes = {"E": num_experts, "H": hidden_size, "I": inter, "2I": 2 * inter}
    for i, (shape, layout) in enumerate(zip(weight_shapes, WEIGHT_LAYOUTS[expert_type], strict=True), start=3):
        expected = [sizes[s] for s in layout]
        if shape != expected:
            raise FusedExpertsError(
                f"{where(i)} has shape {shape}, expected {expected} "
                f"([{', '.join(layout)}] with E={num_experts}, H={hidden_size}, I={inter})"
            )


# ---- tensors <-> numpy --------------------------------------------------------------------------------


def _to_numpy(tensor: ov.Tensor) -> np.ndarray:
    if tensor.element_type == ov.Type.bf16:  # Tensor.data shows bf16 as float16 bits
        return bf16_to_f32(tensor.data)
    return tensor.data


def _weights(tensor: ov.Tensor) -> np.ndarray | ExpertWeights:
    # bf16 stays as its bits, widened per expert: the whole stack in f32 would double its memory
    if tensor.element_type == ov.Type.bf16:
        return bf16_weights(tensor.data)
    return tensor.data


def _write(tensor: ov.Tensor, values: np.ndarray) -> None:
    if tensor.element_type == ov.Type.bf16:
        tensor.data.view(np.uint16)[...] = f32_to_bf16(values)
    else:
        tensor.data[...] = values
