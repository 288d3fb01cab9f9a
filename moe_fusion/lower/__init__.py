"""FusedExperts -> native OpenVINO ops, so a fused model runs with plain OpenVINO (no Python op).

Targets (docs/lowering.md has the measurements behind the default):

- `auto` (default): chosen per block at lowering time for the CPU the model will run on (`CpuFacts`, detected
  or given; `policy.decide`): with AMX and bf16 inference `cpu`; otherwise `per-expert` for few large
  experts (Mixtral) and for int8/int4 weights (hybrid would hold two packed compressed copies), `hybrid`
  for many small experts with float weights (Qwen3-MoE). The choice, its reason and the CPU
  facts are recorded in the model's rt_info (`moe_fusion/lowering/...`).
- `hybrid`: `If(tokens > 1)`: the per-expert form for prompts, the `cpu` form for single tokens (decode),
  its weights stored in the CPU's inference precision (bf16 or f32). Prefills like per-expert, decodes like
  GatherMatmul; the IR file holds the layer twice, runtime memory about native GatherMatmul's.
- `cpu`: `tiled` where the plugin turns it into GatherMatmul, `grouped` where it would not
  (`tiled_reason`: GEMM2 with all-zero biases, a swish beta other than 1 in GEMM3).
- `tiled`: the tiled MoE block the CPU plugin's `ConvertTiledMoeBlockToGatherMatmuls` matches (x86-64) and
  turns into `GatherMatmul` (`GatherMatmulCompressed` for int8/int4 weights), which computes only the top-k
  experts of each token. Elsewhere (other devices, a pattern that stops matching) the same graph still runs
  correctly, densely: every expert on every token.
- `grouped`: tokens sorted by expert, then opset17 `GroupedMatMul` with cumulative end offsets per expert.
- `per-expert`: tokens sorted by expert, one VariadicSplit of rows per expert and that expert's own
  `[out, in]` weights (plain MatMuls -> the CPU plugin's FullyConnected, compressed ones for int8/int4): one
  GEMM per expert over its rows. The least memory (one packed copy) and the fastest prefill without AMX;
  its decode pays per expert GEMM node (E nodes per GEMM): choose it for prompt-only work (batch scoring)
  or when memory decides.

The package: `policy` (target names, `CpuFacts`, the `auto` rule), `experts` (reading a FusedExperts, shared
pieces), one module per form (`tiled`, `grouped`, `per_expert` with `slicing`, `hybrid`).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import openvino as ov

from moe_fusion.lower.experts import Experts
from moe_fusion.lower.grouped import grouped
from moe_fusion.lower.hybrid import hybrid
from moe_fusion.lower.per_expert import per_expert
from moe_fusion.lower.policy import (
    AUTO,
    CPU,
    DEFAULT_TARGET,
    FUSED_EXPERTS,
    GROUPED,
    HYBRID,
    HYBRID_HINT,
    PER_EXPERT,
    PER_EXPERT_MAX_NODE_SHARE,
    TARGETS,
    TILED,
    Block,
    CpuFacts,
    LowerError,
    choose_form,
    decide,
    weight_bytes,
)
from moe_fusion.lower.tiled import tiled, tiled_reason

__all__ = [
    "AUTO", "CPU", "DEFAULT_TARGET", "FUSED_EXPERTS", "GROUPED", "HYBRID", "HYBRID_HINT", "PER_EXPERT",
    "PER_EXPERT_MAX_NODE_SHARE", "RT_INFO", "TARGETS", "TILED", "Block", "CpuFacts", "LowerError", "LowerReport",
    "choose_form", "decide", "fused_experts_nodes", "lower", "tiled_reason", "weight_bytes",
]

RT_INFO = "moe_fusion"  # the lowered model's rt_info: moe_fusion/lowering/{target,forms,reason,cpu,decode_weights}
_FORMS = {PER_EXPERT: per_expert, TILED: tiled, GROUPED: grouped}


@dataclass
class LowerReport:
    target: str
    lowered: dict[str, str] = field(default_factory=dict)  # FusedExperts name -> form (tiled, hybrid(...), ...)
    seconds: float = 0.0
    reasons: dict[str, str] = field(default_factory=dict)  # form -> why `auto` chose it
    cpu: CpuFacts | None = None  # what `auto` (or hybrid's weight storage) decided for
    decode_weights: str = ""  # hybrid: the precision its decode body's plain float weights are stored in

    def summary(self) -> str:
        forms = ", ".join(f"{n} {f}" for f, n in sorted(Counter(self.lowered.values()).items()))
        chosen = f"; {self.cpu.describe()}" if self.cpu else ""
        stored = (f"; hybrid decode weights stored {self.decode_weights} (what {self.decode_weights} inference "
                  f"computes with; to verify at another precision, lower for it)") if self.decode_weights else ""
        hint = f"; {HYBRID_HINT}" if any(HYBRID_HINT in why for why in self.reasons.values()) else ""
        return (f"{len(self.lowered)} FusedExperts lowered for {self.target} ({forms or 'none'}{chosen}) "
                f"in {self.seconds:.2f} s{stored}{hint}")


def fused_experts_nodes(model: ov.Model) -> list[ov.Node]:
    return [n for n in model.get_ordered_ops() if n.get_type_name() == FUSED_EXPERTS]


def lower(model: ov.Model, target: str = DEFAULT_TARGET, *, copy_weights: bool = True,
          cpu: CpuFacts | None = None) -> LowerReport:
    """Replace every FusedExperts of `model` in place by native ops of `target` (see TARGETS).

    `cpu`: the CPU `auto` decides for and whose inference precision `hybrid` stores its decode weights in
    (default: this machine's, `CpuFacts.detect()`); ignored by the other targets. `copy_weights`: store
    plain (or Convert-ed) constant weights out-major, transposed once here in numpy; False inserts a
    Transpose instead, which the plugin folds at every compile (benchmarks/lowering.py measures both). The
    model's rt_info records the target, the forms and, for `auto`, why and for which CPU."""
    if target not in TARGETS:
        raise LowerError(f"lowering target {target!r} is unknown; expected one of {', '.join(TARGETS)}")
    start = time.perf_counter()
    nodes = fused_experts_nodes(model)
    decides = target in (AUTO, HYBRID) and nodes  # hybrid stores its decode weights in the CPU's precision
    report = LowerReport(target, cpu=(cpu or CpuFacts.detect()) if decides else None)
    for node in nodes:
        form = target
        if target == AUTO:
            form, report.reasons[form] = choose_form(node, report.cpu)
        gather_form = TILED if tiled_reason(Experts(node, False)) == "" else GROUPED  # what `cpu` means here
        if form == HYBRID:
            replacement = hybrid(node, per_expert, _FORMS[gather_form], copy_weights, report.cpu.store_type())
            report.decode_weights = report.cpu.precision
            form = f"{HYBRID}({PER_EXPERT}/{gather_form})"
        else:
            form = gather_form if form == CPU else form
            # per-expert slices the weights itself (one copy per expert): no stacked out-major copy first
            replacement = _FORMS[form](Experts(node, copy_weights and form != PER_EXPERT))
        output = node.output(0)
        names = output.get_names()
        output.replace(replacement)
        if names:
            replacement.get_tensor().set_names(names)
        report.lowered[node.get_friendly_name()] = form
    if report.lowered:
        model.validate_nodes_and_infer_types()
        _record(model, report)
    report.seconds = time.perf_counter() - start
    return report


def _record(model: ov.Model, report: LowerReport) -> None:
    info = {"target": report.target, "forms": ",".join(sorted(set(report.lowered.values())))}
    if report.cpu is not None:
        info["cpu"] = report.cpu.describe()
        info["reason"] = "; ".join(f"{form}: {why}" for form, why in sorted(report.reasons.items()))
    if report.decode_weights:
        info["decode_weights"] = report.decode_weights
    for key, value in info.items():
        model.set_rt_info(value, [RT_INFO, "lowering", key])
