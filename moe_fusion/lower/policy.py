"""Which form a FusedExperts is lowered to: the target names, the CPU facts `auto` decides on, and its rule.

docs/lowering.md has the measurements and the workload model behind the rule (a decision record);
tests/test_lower_policy.py pins it on injected CPUs and real block shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import openvino as ov

from moe_fusion.reference import GEMM3_SWIGLU
from moe_fusion.runtime import core

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
    # could stream meanwhile: ~30-80 us at 12-24 GB/s on the 2-core machines measured.
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


# Without AMX, per-expert is kept when its E expert GEMM nodes cost at most this share of the bytes a decoded
# token reads (few large experts): then it decodes on par with GatherMatmul or faster and needs no second copy.
# Measured here (AMD EPYC Zen 5, bf16): Mixtral-8x7B, 24 nodes vs 705 MB (share 0.04): per-expert decoded in
# 0.85x native's time (f16) and 0.72x (int4), hybrid 1.25x; Qwen3-30B-A3B, 384 nodes vs 75 MB (share 5.4):
# per-expert 2.2-2.6x, hybrid 1.00x.
PER_EXPERT_MAX_NODE_SHARE = 0.25
# What `auto` leaves on the table for int8/int4 weights at many small experts (Qwen3-30B-A3B int4 here: hybrid
# decodes in 0.34-0.40x per-expert's time, at 1.9-2.3x its runtime memory): said in the lowering summary.
HYBRID_HINT = "--target hybrid decodes int8/int4 blocks of many small experts ~2.5x faster for ~2x the memory"


@dataclass(frozen=True)
class Block:
    """What the rule reads of one FusedExperts: expert count, top-k, GEMMs per expert, stored weight bytes."""

    experts: int
    top_k: int
    gemms: int
    weight_bytes: int
    compressed: bool = False  # integer weights (int8/int4) behind a decompression subgraph

    @classmethod
    def of(cls, node: ov.Node) -> Block:
        return cls(experts=node.get_input_partial_shape(3)[0].get_length(),
                   top_k=node.get_input_partial_shape(2)[-1].get_length(),
                   gemms=3 if str(node.get_attributes()["expert_type"]) == GEMM3_SWIGLU else 2,
                   weight_bytes=weight_bytes(node),
                   compressed=any(c.get_element_type().is_integral() and len(c.get_output_shape(0)) >= 2
                                  for c in _weight_constants(node)))  # not a Reshape's or Transpose's 1-D i64

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
    """With AMX and bf16 inference GatherMatmul (`cpu`) is right in both phases: it runs each expert's routed
    rows as one AMX GEMM. Without, GatherMatmul's multi-token path is one GEMV per routed row (prefill 2-15x
    slower than one GEMM per expert), while the per-expert form pays for each of its expert GEMM nodes at
    every decode step. Few large experts (node share <= PER_EXPERT_MAX_NODE_SHARE): per-expert wins both
    phases. Many small ones: no single graph does, and `hybrid` (per-expert for prompts, GatherMatmul for
    single tokens) holds native's runtime memory when the weights are plain floats (its decode copy, stored
    in the compute precision, spares the decompressed copy native GatherMatmul keeps); with int8/int4
    weights each body's kernel packs its own compressed copy (1.95x native's memory), so `per-expert` (1.1x).
    docs/lowering.md has the measurements and the workload model (chat, RAG, batch scoring)."""
    if cpu.amx and cpu.precision == "bf16":
        return CPU, ("AMX with bf16 inference: GatherMatmul runs each expert's routed rows as one AMX GEMM "
                     "(prefill) and reads only the top-k experts (decode)")
    cpu_kind = "AMX without bf16 inference" if cpu.amx else "no AMX"
    share = block.node_share(cpu)
    facts = (f"{cpu_kind}: GatherMatmul runs one GEMV per routed row (prefill several times slower than one GEMM "
             f"per expert); per-expert's {block.gemms * block.experts} GEMM nodes cost ~{share:.2f}x the "
             f"{block.token_bytes / 1e6:.1f} MB a decoded token reads")
    if share <= PER_EXPERT_MAX_NODE_SHARE:
        return PER_EXPERT, f"{facts}: few large experts, per-expert decodes on par or faster"
    if block.compressed:
        return PER_EXPERT, (f"{facts}; int8/int4 weights: hybrid would hold two packed compressed copies (~2x "
                            f"native's memory), per-expert holds one ({HYBRID_HINT})")
    return HYBRID, (f"{facts}: per-expert for prompts, GatherMatmul for single tokens; decode weights stored "
                    f"{cpu.precision}")


def weight_bytes(node: ov.Node) -> int:
    """Bytes of a FusedExperts' expert weights as stored: every Constant feeding its weight inputs (compressed
    data, scales and zero points; f16 storage behind its Convert)."""
    return sum(c.get_byte_size() for c in _weight_constants(node))


def _weight_constants(node: ov.Node) -> list[ov.Node]:
    """The Constants a FusedExperts' weight inputs (3 and on) are computed from, each once."""
    seen, stack, found = set(), [node.input_value(i).get_node() for i in range(3, node.get_input_size())], []
    while stack:
        current = stack.pop()
        if current.get_instance_id() in seen:
            continue
        seen.add(current.get_instance_id())
        if current.get_type_name() == "Constant":
            found.append(current)
        else:
            stack += [value.get_node() for value in current.input_values()]
    return found
