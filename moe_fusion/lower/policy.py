"""Which form a FusedExperts is lowered to: the target names, the CPU facts `auto` decides on, and its rule.

docs/lowering.md has the measurements and the workload model behind the rule (a decision record);
tests/test_lower_policy.py pins it on injected CPUs and real block shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import openvino as ov

from moe_fusion.io import core
from moe_fusion.reference import GEMM3_SWIGLU

FUSED_EXPERTS = "FusedExperts"
AUTO = "auto"
CPU = "cpu"
TILED = "tiled"
GROUPED = "grouped"
PER_EXPERT = "per-expert"
HYBRID = "hybrid"  # If(tokens > 1): per-expert for prefill, cpu (GatherMatmul) for decode
TARGETS = (AUTO, CPU, TILED, GROUPED, PER_EXPERT, HYBRID)
DEFAULT_TARGET = AUTO


class LowerError(ValueError):
    """A FusedExperts that cannot be lowered to the requested target."""


@dataclass(frozen=True)
class CpuFacts:
    """What the `auto` target asks of the CPU the model will run on (detected, or given to pin a choice)."""

    amx: bool  # AMX tiles with bf16 (amx_bf16): GatherMatmul can run each expert's rows as one AMX GEMM
    precision: str  # the CPU plugin's default INFERENCE_PRECISION_HINT (bf16 on AMX and avx512_bf16 CPUs)
    name: str = ""
    # What one expert GEMM node of the per-expert form costs per decode step (dynamic-shape bookkeeping of
    # every expert's FullyConnected, executor lookup for the routed ones), as bytes of weights the memory bus
    # could stream meanwhile: ~30-80 us at 12-24 GB/s on the 2-core machines the defaults were measured on.
    node_bytes: int = 1 << 20

    @classmethod
    def detect(cls) -> CpuFacts:
        """This machine's CPU: AMX from the kernel's CPU flags (none readable: assumed absent, the choice
        that is right on most CPUs), precision and name from OpenVINO's CPU plugin."""
        try:
            flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                         if line.startswith("flags")).split()
        except (OSError, StopIteration):
            flags = []
        device = core()
        return cls(amx="amx_bf16" in flags and "amx_tile" in flags,
                   precision=device.get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name(),
                   name=str(device.get_property("CPU", "FULL_DEVICE_NAME")))

    def store_type(self) -> ov.Type | None:
        """The type GatherMatmul computes in here (bf16 or f32), in which lowering may store its weights."""
        return {"bf16": ov.Type.bf16, "f32": ov.Type.f32}.get(self.precision)

    def describe(self) -> str:
        return f"{self.name or 'CPU'}: {'AMX' if self.amx else 'no AMX'}, {self.precision} inference"


# per-expert is chosen (without AMX) when its E expert GEMM nodes cost at most this share of the bytes a
# decoded token reads; beyond it GatherMatmul's decode wins by more than per-expert's prefill gain is worth
# to the workload docs/lowering.md models (chat: ~10 generated tokens per 100 prompt tokens decode-bound).
# Measured: Qwen3-30B-A3B's 384 nodes vs 75 MB (share 5.4) -> per-expert decodes 1.3-1.6x GatherMatmul's
# time; Mixtral-8x7B's 24 nodes vs 705 MB (share 0.04) -> on par.
PER_EXPERT_MAX_NODE_SHARE = 0.25


@dataclass(frozen=True)
class Block:
    """What the rule reads of one FusedExperts: expert count, top-k, GEMMs per expert, stored weight bytes."""

    experts: int
    top_k: int
    gemms: int
    weight_bytes: int

    @classmethod
    def of(cls, node: ov.Node) -> Block:
        return cls(experts=node.get_input_partial_shape(3)[0].get_length(),
                   top_k=node.get_input_partial_shape(2)[-1].get_length(),
                   gemms=3 if str(node.get_attributes()["expert_type"]) == GEMM3_SWIGLU else 2,
                   weight_bytes=weight_bytes(node))

    @property
    def token_bytes(self) -> float:
        """Bytes of expert weights one decoded token reads (its top-k experts)."""
        return self.top_k * self.weight_bytes / self.experts

    def node_share(self, cpu: CpuFacts) -> float:
        """The per-expert form's GEMM nodes' per-step cost over the bytes a token reads."""
        return self.gemms * self.experts * cpu.node_bytes / max(self.token_bytes, 1)


def choose_form(node: ov.Node, cpu: CpuFacts) -> tuple[str, str]:
    """The form `auto` lowers a FusedExperts to on `cpu`, and why (see `decide`)."""
    return decide(Block.of(node), cpu)


def decide(block: Block, cpu: CpuFacts) -> tuple[str, str]:
    """With AMX and bf16 inference GatherMatmul (`cpu`) is right in both phases. Without, GatherMatmul runs one
    GEMV per routed row (prefill 2-13x slower than one GEMM per expert), while the per-expert form pays per
    expert GEMM node at every decode step: per-expert when those nodes are cheap next to the weights a token
    reads (few large experts, e.g. Mixtral), `cpu` when they are not (many small experts, e.g. Qwen3-MoE)."""
    if cpu.amx and cpu.precision == "bf16":
        return CPU, ("AMX with bf16 inference: GatherMatmul runs each expert's routed rows as one AMX GEMM "
                     "(prefill) and reads only the top-k experts (decode)")
    share = block.node_share(cpu)
    cpu_kind = "AMX without bf16 inference" if cpu.amx else "no AMX"
    facts = (f"{block.gemms * block.experts} expert GEMM nodes ~ {share:.2f}x the "
             f"{block.token_bytes / 1e6:.1f} MB of weights a token reads")
    if share <= PER_EXPERT_MAX_NODE_SHARE:
        return PER_EXPERT, (f"{cpu_kind}: GatherMatmul would run one GEMV per routed row (prefill several times "
                            f"slower than one GEMM per expert); {facts}, so per-expert decodes on par")
    return CPU, (f"{cpu_kind}, but {facts}: per-expert's decode would pay that on every token, more than its "
                 "prefill gain is worth; GatherMatmul reads only the top-k experts")


def weight_bytes(node: ov.Node) -> int:
    """Bytes of a FusedExperts' expert weights as stored: every Constant feeding its weight inputs (compressed
    data, scales and zero points; f16 storage behind its Convert)."""
    seen, stack, total = set(), [node.input_value(i).get_node() for i in range(3, node.get_input_size())], 0
    while stack:
        current = stack.pop()
        if current.get_instance_id() in seen:
            continue
        seen.add(current.get_instance_id())
        if current.get_type_name() == "Constant":
            total += current.get_byte_size()
        else:
            stack += [value.get_node() for value in current.input_values()]
    return total
