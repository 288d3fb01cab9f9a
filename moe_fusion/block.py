"""`MoEBlock`, the one structure that flows through the pipeline, and `Decline`, a family's "no, because".

Families in `patterns/` fill an MoEBlock from a match; completeness checks, the rewrite, the proof, the
report and lowering read it. Weights are numpy views of the graph's constants, oriented `[in, out]`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import openvino as ov

from moe_fusion.pattern import RESHAPES, same, strip
from moe_fusion.reference import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU


def module_path(node: ov.Node | None) -> str:
    """The exporter's module path of a node, e.g. `__module.model.layers.3.mlp` for its router TopK."""
    if node is None:
        return "?"
    name = node.get_friendly_name()
    if name.startswith("aten::") or "/" not in name:  # no module scope: a bare module converted, or added later
        return ""
    return name.rsplit("/aten::", 1)[0].rsplit("/", 1)[0]


def block_name(*nodes: ov.Node | None) -> str:
    """The innermost module holding all `nodes` (a router and the block's output, say), e.g.
    `__module.model.layers.3.mlp` from `...mlp.gate` and `...mlp`."""
    # names and separators; nodes outside any module (added by hand, say) do not narrow it
    paths = [re.split(r"([./])", path) for path in (module_path(n) for n in nodes if n is not None) if path]
    common = []
    for names in zip(*paths, strict=False):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return "".join(common).rstrip("./") or "(top level)"


def _reads(value: ov.Output, x: ov.Output, depth: int) -> bool:
    """Whether a Linear (MatMul on a constant weight) reading `x` lies within `depth` ops upstream."""
    node = strip(value).get_node()
    if node.get_type_name() == "MatMul" and any(same(strip(v), x) for v in node.input_values()):
        return True
    return depth > 0 and any(
        _reads(v, x, depth - 1) for v in node.input_values() if v.get_node().get_type_name() != "Constant"
    )


def has_shared_expert(output: ov.Output, hidden: ov.Output) -> bool:
    """A shared expert beside the block: its sum is added to an MLP of the same hidden input
    (Qwen2-MoE `sigmoid(gate(x)) * shared(x)`, DeepSeek and Llama-4 `shared(x)`)."""
    values = [output]
    while values:
        value = values.pop()
        for target in value.get_target_inputs():
            node = target.get_node()
            if node.get_type_name() in RESHAPES:
                values.append(node.output(0))
            elif node.get_type_name() == "Add":
                other = node.input_value(1 - target.get_index())
                if _reads(other, strip(hidden), depth=6):
                    return True
    return False


class Decline(Exception):
    """A candidate that is not fused, with the reason and the node where matching stopped."""

    def __init__(self, reason: str, node: ov.Node | None = None, router: ov.Node | None = None) -> None:
        where = f" (at {node.get_type_name()} '{node.get_friendly_name()}')" if node is not None else ""
        super().__init__(reason + where)
        self.reason = reason + where
        self.router = router
        self.node = node


def blocks_or_declines(found: Iterable, build: Callable[[dict], MoEBlock]) -> Iterator[MoEBlock | Decline]:
    """`build(values)` for each match: the block, or the Decline it raised (what a family's find yields)."""
    for values in found:
        try:
            yield build(values)
        except Decline as decline:
            yield decline


@dataclass
class Weight:
    """One FusedExperts weight input: per-slot `[in, out]` arrays (biases `[out]`), storage type kept.

    `convert_to` is the element type of the decompression Convert the original had (None: used as is).
    `storage`: the stored element type when the arrays cannot say it (bf16: numpy holds its bits as float16)."""

    parts: list[np.ndarray]
    convert_to: ov.Type | None = None
    storage: ov.Type | None = None


@dataclass
class MoEBlock:
    family: str
    router: ov.Node  # the TopK selecting the experts
    hidden: ov.Output  # [..., H]: what every expert reads
    routing_weights: ov.Output  # [T, K]: the weight of each selected expert
    topk_indices: ov.Output  # [T, K]
    output: ov.Output  # the sum over experts, which FusedExperts replaces
    num_experts: int  # E, from the router's width
    expert_ids: list[int]  # the expert id of each slot in `weights`
    weights: dict[str, Weight]  # FusedExperts weight name -> Weight, in input order
    expert_type: str = GEMM3_SWIGLU
    expert_alpha: float = 0.0
    expert_beta: float = 1.0
    gate_idx: int = 0
    router_kind: str = "unknown"
    shared_expert: bool = False
    # Llama-4: the routing weight scales the experts' input, not their output (exact for top-1 only).
    weights_on_input: bool = False
    # Memory the unfused block takes per token besides its weights (a direct-conversion block gathers the K
    # selected experts' weights for every token): the proof runs its rows in pieces that fit.
    bytes_per_token: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        """The module holding router and experts, e.g. `__module.model.layers.3.mlp`."""
        return block_name(self.router, self.output.get_node())

    @property
    def top_k(self) -> int:
        """K, or 0 when the router's k is not a constant (a dynamic last dimension)."""
        shape = self.topk_indices.get_partial_shape()
        return shape[-1].get_length() if shape.rank.is_static and shape[-1].is_static else 0

    @property
    def hidden_size(self) -> int:
        return self.weights["w_down"].parts[0].shape[-1]  # [I, H] per expert or [E, I, H] stacked

    @property
    def intermediate_size(self) -> int:
        return self.weights["w_down"].parts[0].shape[-2]

    @property
    def attributes(self) -> dict:
        return {
            "expert_type": self.expert_type,
            "expert_alpha": self.expert_alpha,
            "expert_beta": self.expert_beta,
            "gate_idx": self.gate_idx,
        }


WEIGHT_NAMES = {
    GEMM3_SWIGLU: ("w_gate", "w_up", "w_down"),
    GEMM2_BIAS_SWIGLU_CLAMP: ("w_gate_up", "b_gate_up", "w_down", "b_down"),
}
