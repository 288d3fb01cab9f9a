"""FusedExperts -> native OpenVINO ops, so a fused model runs with plain OpenVINO (no Python op).

Targets (docs/lowering.md has the measurements behind the default):

- `auto` (default): chosen per block at lowering time for the CPU lowering runs on (`CpuFacts`, injectable;
  `choose_form`): with AMX and bf16 inference what `cpu` does. Otherwise GatherMatmul runs one GEMV per
  routed row (prefill 2-13x slower than per-expert GEMMs), while per-expert pays for each of its expert GEMM
  nodes at every decode step: `per-expert` when the experts are few and large (Mixtral), `cpu` when they are
  many and small (Qwen3-MoE). The choice, its reason and the CPU facts are recorded in the model's rt_info
  (`moe_fusion/lowering/...`).
- `cpu`: `tiled` where the plugin turns it into GatherMatmul, `grouped` where it would not
  (`tiled_reason`: GEMM2 with all-zero biases, a swish beta other than 1 in GEMM3).
- `tiled`: the tiled MoE block the CPU plugin's `ConvertTiledMoeBlockToGatherMatmuls` matches (x86-64) and
  turns into `GatherMatmul` (`GatherMatmulCompressed` for int8/int4 weights), which computes only the top-k
  experts of each token. Elsewhere (other devices, a pattern that stops matching) the same graph still runs
  correctly, densely: every expert on every token.
- `grouped`: tokens sorted by expert, then opset17 `GroupedMatMul` with cumulative end offsets per expert.
- `per-expert`: tokens sorted by expert, a Slice of rows per expert and that expert's own `[out, in]`
  weights (plain MatMuls -> the CPU plugin's FullyConnected, compressed ones for int8/int4): one GEMM per
  expert over its rows. Choose it for prefill-heavy use on CPUs without AMX, where GatherMatmul runs one GEMV
  per routed row, and for few large experts (Mixtral); its decode is slower with many small experts (E
  MatMul nodes per GEMM, most on zero rows).

Expert GEMMs are written `MatMul(x, W, transpose_b=True)` on out-major weights `[E, out, in]`, the layout the
plugin's GatherMatmul and its compressed kernels read. A weight that arrives as
`Transpose(decompressed [E, out, in], [0, 2, 1])` (compressed weights: Constant u8/i8/u4/i4 -> Convert ->
[Subtract] -> Multiply -> [Reshape] -> [Convert]) is used without that Transpose; plain constants (or
Convert(Constant)) are transposed once in numpy here, so the saved IR already holds the layout and compiling
does no folding.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset11 as ops11
import openvino.opset14 as ops
import openvino.opset15 as ops15
import openvino.opset17 as ops17
from openvino.utils.node_factory import NodeFactory

from moe_fusion.compressed import mark_decompression
from moe_fusion.io import core
from moe_fusion.reference import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU

FUSED_EXPERTS = "FusedExperts"
AUTO = "auto"
CPU = "cpu"
TILED = "tiled"
GROUPED = "grouped"
PER_EXPERT = "per-expert"
TARGETS = (AUTO, CPU, TILED, GROUPED, PER_EXPERT)
DEFAULT_TARGET = AUTO
RT_INFO = "moe_fusion"  # the lowered model's rt_info: moe_fusion/lowering/{target,forms,reason,cpu}
_I64_MAX = np.iinfo(np.int64).max
_OPSET4 = NodeFactory("opset4")


class LowerError(ValueError):
    """A FusedExperts that cannot be lowered to the requested target."""


@dataclass(frozen=True)
class CpuFacts:
    """What the `auto` target asks of the CPU the model will run on (detected, or given to pin a choice)."""

    amx: bool  # AMX tiles with bf16 (amx_bf16): GatherMatmul can run each expert's rows as one AMX GEMM
    precision: str  # the CPU plugin's default INFERENCE_PRECISION_HINT (bf16 on AMX CPUs, f32 on most others)
    name: str = ""
    # What one expert GEMM node of the per-expert form costs per decode step (dynamic-shape bookkeeping of
    # every expert's FullyConnected, executor lookup for the routed ones), as bytes of weights the memory bus
    # could stream meanwhile: ~30-80 us at 12-24 GB/s on the 2-core Ice Lake the defaults were measured on.
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

    def describe(self) -> str:
        return f"{self.name or 'CPU'}: {'AMX' if self.amx else 'no AMX'}, {self.precision} inference"


# per-expert is chosen (without AMX) when its E expert GEMM nodes cost at most this share of the bytes a
# decoded token reads; beyond it GatherMatmul's decode wins by more than per-expert's prefill gain is worth
# to generation (measured on the loaded test machine: Qwen3-30B-A3B's 384 nodes vs 75 MB -> per-expert
# decoded 1.3-5x slower than GatherMatmul, 0.75x in one quieter run; Mixtral-8x7B's 24 nodes vs 705 MB -> on par)
PER_EXPERT_MAX_NODE_SHARE = 0.25


@dataclass
class LowerReport:
    target: str
    lowered: dict[str, str] = field(default_factory=dict)  # FusedExperts name -> form (tiled/grouped/per-expert)
    seconds: float = 0.0
    reasons: dict[str, str] = field(default_factory=dict)  # form -> why `auto` chose it
    cpu: CpuFacts | None = None  # what `auto` decided for

    def summary(self) -> str:
        forms = ", ".join(f"{n} {f}" for f, n in sorted(Counter(self.lowered.values()).items()))
        chosen = f"; {self.cpu.describe()}" if self.cpu else ""
        return (f"{len(self.lowered)} FusedExperts lowered for {self.target} ({forms or 'none'}{chosen}) "
                f"in {self.seconds:.2f} s")


def fused_experts_nodes(model: ov.Model) -> list[ov.Node]:
    return [n for n in model.get_ordered_ops() if n.get_type_name() == FUSED_EXPERTS]


def lower(model: ov.Model, target: str = DEFAULT_TARGET, *, copy_weights: bool = True,
          cpu: CpuFacts | None = None) -> LowerReport:
    """Replace every FusedExperts of `model` in place by native ops of `target` (see TARGETS).

    `cpu`: the CPU `auto` decides for (default: this machine's, `CpuFacts.detect()`); ignored by the other
    targets. `copy_weights`: store plain (or Convert-ed) constant weights out-major, transposed once here in
    numpy; False inserts a Transpose instead, which the plugin folds at every compile (benchmarks/lowering.py
    measures both). The model's rt_info records the target, the forms and, for `auto`, why and for which CPU."""
    if target not in TARGETS:
        raise LowerError(f"lowering target {target!r} is unknown; expected one of {', '.join(TARGETS)}")
    start = time.perf_counter()
    nodes = fused_experts_nodes(model)
    report = LowerReport(target, cpu=(cpu or CpuFacts.detect()) if target == AUTO and nodes else None)
    for node in nodes:
        form = target
        if target == AUTO:
            form, report.reasons[form] = choose_form(node, report.cpu)
        if form == CPU:
            form = TILED if tiled_reason(_Experts(node, False)) == "" else GROUPED
        # per-expert slices the weights itself (one copy per expert): no stacked out-major copy first
        experts = _Experts(node, copy_weights and form != PER_EXPERT)
        replacement = {PER_EXPERT: _per_expert, TILED: _tiled, GROUPED: _grouped}[form](experts)
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


def choose_form(node: ov.Node, cpu: CpuFacts) -> tuple[str, str]:
    """The form `auto` lowers a FusedExperts to on `cpu`, and why (docs/lowering.md has the measurements).

    With AMX and bf16 inference GatherMatmul (`cpu`) is right in both phases. Without, GatherMatmul runs one
    GEMV per routed row (prefill 2-13x slower than one GEMM per expert), while the per-expert form pays per
    expert GEMM node at every decode step: per-expert when those nodes are cheap next to the weights a token
    reads (few large experts, e.g. Mixtral), `cpu` when they are not (many small experts, e.g. Qwen3-MoE)."""
    if cpu.amx and cpu.precision == "bf16":
        return CPU, ("AMX with bf16 inference: GatherMatmul runs each expert's routed rows as one AMX GEMM "
                     "(prefill) and reads only the top-k experts (decode)")
    experts = node.get_input_partial_shape(3)[0].get_length()
    top_k = node.get_input_partial_shape(2)[-1].get_length()
    gemms = 3 if str(node.get_attributes()["expert_type"]) == GEMM3_SWIGLU else 2
    per_token = top_k * weight_bytes(node) / experts
    share = gemms * experts * cpu.node_bytes / max(per_token, 1)
    cpu_kind = "AMX without bf16 inference" if cpu.amx else "no AMX"
    facts = (f"{gemms * experts} expert GEMM nodes ~ {share:.2f}x the {per_token / 1e6:.1f} MB of weights a "
             f"token reads")
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


def _record(model: ov.Model, report: LowerReport) -> None:
    info = {"target": report.target, "forms": ",".join(sorted(set(report.lowered.values())))}
    if report.cpu is not None:
        info["cpu"] = report.cpu.describe()
        info["reason"] = "; ".join(f"{form}: {why}" for form, why in sorted(report.reasons.items()))
    for key, value in info.items():
        model.set_rt_info(value, [RT_INFO, "lowering", key])


# ---- reading a FusedExperts -----------------------------------------------------------------------------


class _Experts:
    """A FusedExperts' inputs and attributes, weights re-expressed out-major `[E, out, in]`."""

    def __init__(self, node: ov.Node, copy_weights: bool = True) -> None:
        attrs = node.get_attributes()
        self.name = node.get_friendly_name()
        self.expert_type = str(attrs["expert_type"])
        self.alpha = float(attrs["expert_alpha"])
        self.beta = float(attrs["expert_beta"])
        self.gate_idx = int(attrs["gate_idx"])
        self.hidden = node.input_value(0)
        self.float_type = self.hidden.get_element_type()
        self.routing = _as_type(node.input_value(1), self.float_type)
        self.indices = node.input_value(2)
        first = node.get_input_partial_shape(3)
        self.num_experts, self.hidden_size = first[0].get_length(), first[1].get_length()
        if self.expert_type == GEMM3_SWIGLU:
            self.matrices = [_out_major(node.input_value(i), copy_weights) for i in (3, 4, 5)]  # gate, up, down
            self.biases: list[ov.Output | None] = [None, None]
        elif self.expert_type == GEMM2_BIAS_SWIGLU_CLAMP:
            self.matrices = [_out_major(node.input_value(i), copy_weights) for i in (3, 5)]  # gate_up, down
            self.biases = [node.input_value(4), node.input_value(6)]
        else:
            raise LowerError(f"{self.name}: expert_type {self.expert_type!r} cannot be lowered")
        self.matrices = [_as_type(m, self.float_type) for m in self.matrices]

    def flat_hidden(self) -> ov.Output:
        return ops.reshape(self.hidden, _i64([-1, self.hidden_size]), False).output(0)

    def restore_shape(self, out: ov.Output) -> ov.Output:
        """[T, H] back to hidden_states' shape (and name it after the FusedExperts)."""
        result = ops.reshape(out, ops.shape_of(self.hidden), False)
        result.set_friendly_name(self.name)
        return result.output(0)

    def scalar(self, value: float) -> ov.Output:
        return ops.constant(np.array(value, dtype=self.float_type.to_dtype())).output(0)


def _i64(values) -> ov.Output:
    return ops.constant(np.asarray(values, dtype=np.int64)).output(0)


def _as_type(value: ov.Output, element_type: ov.Type) -> ov.Output:
    return value if value.get_element_type() == element_type else ops.convert(value, element_type).output(0)


def _transposed_constant(const: ov.Node) -> ov.Output:
    """A Constant `[E, in, out]` copied out-major `[E, out, in]` (done once here, not at every compile)."""
    element_type = const.get_element_type()
    data = const.get_data()
    if element_type == ov.Type.bf16:  # get_data shows bf16 as float16: move the raw bits
        data = data.view(np.uint16)
    shape = [data.shape[0], data.shape[2], data.shape[1]]
    tensor = ov.Tensor(element_type, ov.Shape(shape))
    tensor.data.view(data.dtype)[...] = np.swapaxes(data, 1, 2)  # one strided copy into the new storage
    return ov.op.Constant(tensor).output(0)


def _is_swap_last_two(node: ov.Node) -> bool:
    if node.get_type_name() != "Transpose":
        return False
    perm = node.input_value(1).get_node()
    return perm.get_type_name() == "Constant" and list(perm.get_data()) == [0, 2, 1]


def _out_major(weight: ov.Output, copy: bool = True) -> ov.Output:
    """The same weight `[E, in, out]` as an out-major `[E, out, in]` value for `MatMul(transpose_b=True)`."""
    node = weight.get_node()
    if _is_swap_last_two(node):  # compressed weights: read the decompression subgraph as it is stored
        return node.input_value(0)
    decompress = None  # f16/bf16 storage behind a Convert: move the storage, keep the Convert after it
    if node.get_type_name() == "Convert" and node.input_value(0).get_node().get_type_name() == "Constant":
        decompress, node = node.get_output_element_type(0), node.input_value(0).get_node()
    if node.get_type_name() == "Constant" and node.get_element_type().bitwidth >= 8:
        moved = _transposed_constant(node) if copy else ops.transpose(node, _i64([0, 2, 1])).output(0)
        return moved if decompress is None else mark_decompression(ops.convert(moved, decompress)).output(0)
    return ops.transpose(weight, _i64([0, 2, 1])).output(0)  # anything else: the plugin folds or runs it


def _bias(experts: _Experts, bias: ov.Output, shape: list[int]) -> ov.Output:
    """A bias `[E, out]` as an f32/hidden-typed Constant of `shape` when it is constant (the plugin's 2-GEMM
    pattern wants a Constant there); otherwise a Reshape of the value."""
    node, target = bias.get_node(), experts.float_type
    if node.get_type_name() == "Convert" and node.input_value(0).get_node().get_type_name() == "Constant":
        node = node.input_value(0).get_node()
    if node.get_type_name() == "Constant" and node.get_element_type() != ov.Type.bf16:
        data = node.get_data().astype(np.float32).reshape(shape)
        if target == ov.Type.bf16:
            return ops.convert(ops.constant(data), target).output(0)
        return ops.constant(np.ascontiguousarray(data.astype(target.to_dtype()))).output(0)
    return _as_type(ops.reshape(bias, _i64(shape), False).output(0), target)


def _gemm2_activation(experts: _Experts, gate_up: ov.Output, axis: int) -> ov.Output:
    """`(clamp(up) + 1) * swish(min(gate, limit), beta)` on interleaved lanes, in the op order the CPU
    plugin's 2-GEMM pattern reads (Slice -> Clamp -> Add; Slice -> Minimum -> Swish; Multiply)."""
    limit = experts.alpha if experts.alpha > 0 else np.inf  # no clamp: +-inf keeps the pattern's shape
    lane = experts.gate_idx
    up = ops.slice(gate_up, _i64([1 - lane]), _i64([_I64_MAX]), _i64([2]), _i64([axis]))
    up = ops.add(ops.clamp(up, -limit, limit), experts.scalar(1.0))
    gate = ops.slice(gate_up, _i64([lane]), _i64([_I64_MAX]), _i64([2]), _i64([axis]))
    gate = ops.swish(ops.minimum(gate, experts.scalar(limit)), experts.scalar(experts.beta))
    return ops.multiply(up, gate).output(0)


def _swish(experts: _Experts, gate: ov.Output) -> ov.Output:
    # The plugin's 3-GEMM pattern matches a one-input Swish only; opset Python's swish(x) always adds a
    # beta input, so build it through the node factory. Another beta keeps its input (and no GatherMatmul).
    if experts.beta == 1.0:
        return _OPSET4.create("Swish", [gate], {}).output(0)
    return ops.swish(gate, experts.scalar(experts.beta)).output(0)


# ---- target: tiled (CPU GatherMatmul) -------------------------------------------------------------------


def tiled_reason(experts: _Experts) -> str:
    """Why the CPU plugin's pattern would not turn this block's tiled form into GatherMatmul, or ''.

    Then the tiled form runs densely (every expert on every token) and `cpu` lowers the block to `grouped`."""
    if experts.expert_type == GEMM3_SWIGLU:
        return "" if experts.beta == 1.0 else f"swish beta {experts.beta} (the pattern takes a one-input Swish)"
    for bias in experts.biases:
        node = bias.get_node()
        if node.get_type_name() == "Convert":
            node = node.input_value(0).get_node()
        if node.get_type_name() != "Constant":
            return "a bias that is not a constant"
        if not node.get_data().any():  # the plugin removes an Add of zeros, and the pattern needs the Add
            return "all-zero biases"
    producer = experts.hidden.get_node().get_type_name()
    rank = experts.hidden.get_partial_shape().rank
    if rank.is_static and rank.get_length() == 2 and producer != "Reshape":
        return "hidden_states already [T, H] (the plugin removes the Reshape the 2-GEMM pattern needs)"
    return ""


def _tiled(experts: _Experts) -> ov.Output:
    e, h = experts.num_experts, experts.hidden_size
    x = experts.flat_hidden()  # [T, H]
    tokens = ops.gather(ops.shape_of(x), _i64([0]), _i64(0))
    # The 2-GEMM pattern wants a Reshape feeding the Tile; flat_hidden is one.
    tiled = ops.reshape(ops.tile(x, _i64([e, 1])), _i64([e, -1, h]), False)  # [E, T, H]

    def gemm(a, w):
        return ops.matmul(a, w, False, True)

    if experts.expert_type == GEMM3_SWIGLU:
        w_gate, w_up, w_down = experts.matrices
        act = ops.multiply(_swish(experts, gemm(tiled, w_gate).output(0)), gemm(tiled, w_up))
        y = gemm(act, w_down)
    else:
        w_gate_up, w_down = experts.matrices
        b_gate_up, b_down = experts.biases
        gate_up = ops.add(gemm(tiled, w_gate_up), _bias(experts, b_gate_up, [e, 1, -1]))
        act = _gemm2_activation(experts, gate_up.output(0), 2)
        y = ops.add(gemm(act, w_down), _bias(experts, b_down, [e, 1, h]))
    # The pattern's end Reshape, [E, T, 1, H] as optimum-intel exports it (a no-op [E, T, H] one would be
    # removed before the plugin's pass runs); the pass reshapes the sum to this shape minus E.
    y = ops.reshape(y, _i64([e, -1, 1, h]), False)
    # Dense routing [T, E] (zero outside the top-k; a repeated expert adds up), as [E, T, 1, 1].
    zeros = ops.broadcast(experts.scalar(0.0), ops.concat([tokens, _i64([e])], 0))
    dense = ops.scatter_elements_update(zeros, experts.indices, experts.routing, 1, "sum")
    routing = ops.unsqueeze(ops.reshape(ops.transpose(dense, _i64([1, 0])), _i64([e, -1, 1]), False), _i64(-1))
    out = ops.reduce_sum(ops.multiply(y, routing), _i64([0]), False)  # [T, 1, H]
    return experts.restore_shape(out.output(0))


# ---- target: grouped (opset17 GroupedMatMul) ------------------------------------------------------------


def _grouped(experts: _Experts) -> ov.Output:
    e, h = experts.num_experts, experts.hidden_size
    top_k = experts.indices.get_partial_shape()[-1].get_length()
    x = experts.flat_hidden()  # [T, H]
    slot_expert = ops.convert(ops.reshape(experts.indices, _i64([-1]), False), ov.Type.i32)  # [T*K]
    slots = ops.shape_of(slot_expert, ov.Type.i32)
    # Sort the T*K routing slots by expert (stable: slot order within an expert is kept).
    by_expert = ops11.topk(slot_expert, ops.squeeze(slots, _i64([0])), 0, "min", "value", "i32", stable=True)
    sorted_expert, order = by_expert.output(0), by_expert.output(1)
    ends = ops15.search_sorted(sorted_expert, ops.constant(np.arange(e, dtype=np.int32)), right_mode=True)
    token = ops.divide(order, ops.constant(np.array(top_k, np.int32)))  # integer division: slot // K
    rows = ops.gather(x, token, _i64(0))  # [T*K, H], grouped by expert

    def gemm(a, w):
        return ops17.grouped_matmul(a, w, ends)

    if experts.expert_type == GEMM3_SWIGLU:
        w_gate, w_up, w_down = experts.matrices
        act = ops.multiply(_swish(experts, gemm(rows, w_gate).output(0)), gemm(rows, w_up))
        y = gemm(act, w_down)
    else:
        w_gate_up, w_down = experts.matrices
        b_gate_up, b_down = experts.biases
        bias_up = ops.gather(_bias(experts, b_gate_up, [e, -1]), sorted_expert, _i64(0))
        act = _gemm2_activation(experts, ops.add(gemm(rows, w_gate_up), bias_up).output(0), 1)
        y = ops.add(gemm(act, w_down), ops.gather(_bias(experts, b_down, [e, h]), sorted_expert, _i64(0)))
    weight = ops.gather(ops.reshape(experts.routing, _i64([-1, 1]), False), order, _i64(0))  # [T*K, 1]
    y = ops.multiply(y, weight)
    # Back to slot order (order is a permutation), then sum each token's K slots.
    placed = ops.scatter_update(ops.broadcast(experts.scalar(0.0), ops.shape_of(y)), order, y, _i64(0))
    out = ops.reduce_sum(ops.reshape(placed, _i64([-1, top_k, h]), False), _i64([1]), False)
    return experts.restore_shape(out.output(0))


# ---- target: per-expert (one FullyConnected GEMM per expert on its routed rows) -----------------------------


def _sorted_slots(experts: _Experts) -> tuple[ov.Output, ov.Output, ov.Output, int]:
    """The T*K routing slots sorted by expert (stable): (expert of each sorted slot, slot order, the
    sorted rows of hidden [T*K, H], K)."""
    top_k = experts.indices.get_partial_shape()[-1].get_length()
    slot_expert = ops.convert(ops.reshape(experts.indices, _i64([-1]), False), ov.Type.i32)  # [T*K]
    slots = ops.shape_of(slot_expert, ov.Type.i32)
    by_expert = ops11.topk(slot_expert, ops.squeeze(slots, _i64([0])), 0, "min", "value", "i32", stable=True)
    sorted_expert, order = by_expert.output(0), by_expert.output(1)
    token = ops.divide(order, ops.constant(np.array(top_k, np.int32)))  # integer division: slot // K
    rows = ops.gather(experts.flat_hidden(), token, _i64(0))  # [T*K, H], grouped by expert
    return sorted_expert, order, rows.output(0), top_k


def _per_expert(experts: _Experts) -> ov.Output:
    e, h = experts.num_experts, experts.hidden_size
    sorted_expert, order, rows, top_k = _sorted_slots(experts)
    ends = ops.convert(ops15.search_sorted(sorted_expert, ops.constant(np.arange(e, dtype=np.int32)),
                                           right_mode=True), ov.Type.i64)
    counts = ops.subtract(ends, ops.concat([_i64([0]),
                                            ops.slice(ends, _i64([0]), _i64([e - 1]), _i64([1]))], 0))
    # One VariadicSplit hands every expert its run of rows ([0, H] when it has none): the plugin skips the
    # nodes of an expert whose input is empty, and one node instead of 3E Gathers/Slices keeps decode cheap.
    mine_all = ops.variadic_split(rows, _i64(0), counts).outputs()
    matrices = [_expert_values(m, e) for m in experts.matrices]
    biases = [_expert_values(_bias(experts, b, [e, -1]), e) for b in experts.biases if b is not None]

    pieces = []
    for i in range(e):

        def gemm(a, w, what: str, i: int = i) -> ov.Node:  # named per expert: profiles and tests find them
            matmul = ops.matmul(a, w, False, True)
            matmul.set_friendly_name(f"{experts.name}/expert{i}/{what}")
            return matmul

        mine = mine_all[i]  # this expert's rows; [0, H] if none
        if experts.expert_type == GEMM3_SWIGLU:
            w_gate, w_up, w_down = (m[i] for m in matrices)
            act = ops.multiply(_swish(experts, gemm(mine, w_gate, "gate").output(0)), gemm(mine, w_up, "up"))
            y = gemm(act, w_down, "down")
        else:
            (w_gate_up, w_down), (b_gate_up, b_down) = (m[i] for m in matrices), (b[i] for b in biases)
            gate_up = ops.add(gemm(mine, w_gate_up, "gate_up"), b_gate_up)
            act = _gemm2_activation(experts, gate_up.output(0), 1)
            y = ops.add(gemm(act, w_down, "down"), b_down)
        pieces.append(y.output(0))
    y = ops.concat(pieces, 0)  # [T*K, H] in sorted slot order
    weight = ops.gather(ops.reshape(experts.routing, _i64([-1, 1]), False), order, _i64(0))  # [T*K, 1]
    y = ops.multiply(y, weight)
    placed = ops.scatter_update(ops.broadcast(experts.scalar(0.0), ops.shape_of(y)), order, y, _i64(0))
    out = ops.reduce_sum(ops.reshape(placed, _i64([-1, top_k, h]), False), _i64([1]), False)
    return experts.restore_shape(out.output(0))


def _expert_values(value: ov.Output, count: int) -> list[ov.Output]:
    """`value[i]` for every expert i of a stacked `[E, ...]` value, as separate subgraphs.

    Constants are sliced in numpy from their raw storage (u4/i4 nibbles and bf16 bits as stored), and a
    decompression subgraph (Convert, Subtract, Multiply, Reshape with the expert axis first; a
    Transpose(.., [0, 2, 1])) is rebuilt per expert on those slices, so each expert's weight stays
    compressed and reaches the plugin's compressed FullyConnected pattern. Anything else is a Gather."""
    memo: dict = {}
    return [_expert_value(value, i, count, memo) for i in range(count)]


def _expert_value(value: ov.Output, i: int, count: int, memo: dict) -> ov.Output:
    key = (value.get_node(), value.get_index(), i)
    if key not in memo:
        memo[key] = _slice_expert(value, i, count, memo)
    return memo[key]


def _slice_expert(value: ov.Output, i: int, count: int, memo: dict) -> ov.Output:
    node, kind = value.get_node(), value.get_node().get_type_name()
    shape = value.get_partial_shape()
    index = i if shape.is_static and shape[0].get_length() == count else 0  # a leading 1 broadcasts
    if kind == "Constant" and shape.is_static:
        return _constant_slice(node, index)
    rank = shape.rank.get_length()
    if kind == "Convert":
        inner = _expert_value(node.input_value(0), i, count, memo)
        convert = ops.convert(inner, value.get_element_type())
        if inner.get_node().get_type_name() == "Constant" and inner.get_element_type().is_real():
            # f16/bf16 storage: marked as decompression, or the plugin folds it into an f32 copy
            mark_decompression(convert)
        return convert.output(0)
    if kind in ("Subtract", "Multiply", "Add") and node.get_attributes().get("auto_broadcast", "numpy") == "numpy":
        inputs = [  # an input of lower rank broadcasts from the right: it holds no expert axis
            _expert_value(v, i, count, memo) if v.get_partial_shape().rank.get_length() == rank else v
            for v in node.input_values()
        ]
        return {"Subtract": ops.subtract, "Multiply": ops.multiply, "Add": ops.add}[kind](*inputs).output(0)
    target = node.input_value(1).get_node() if node.get_input_size() > 1 else None
    if kind == "Reshape" and target.get_type_name() == "Constant" and shape.is_static:
        dims = [int(d) for d in target.get_data()]
        if dims[0] == shape[0].get_length() and 0 not in dims[1:]:
            inner = _expert_value(node.input_value(0), i, count, memo)
            return ops.reshape(inner, _i64(dims[1:]), False).output(0)
    if kind == "Transpose" and rank == 3 and _is_swap_last_two(node):
        inner = _expert_value(node.input_value(0), i, count, memo)
        if inner.get_node().get_type_name() == "Constant":
            return _constant_transposed(inner.get_node())
        return ops.transpose(inner, _i64([1, 0])).output(0)
    return ops.gather(value, _i64(index), _i64(0)).output(0)  # scalar index: the expert axis goes


def _raw(const: ov.Node) -> np.ndarray:
    """A Constant's storage as stored: packed nibbles as uint8, bf16 as uint16."""
    data = np.asarray(const.get_tensor_view().data)
    return data.view(np.uint16) if const.get_element_type() == ov.Type.bf16 else data


def _constant_slice(const: ov.Node, index: int) -> ov.Output:
    """`const[index]` as a new Constant of the same element type (sub-byte data sliced as whole bytes)."""
    element_type, shape = const.get_element_type(), list(const.get_output_shape(0))
    tensor = ov.Tensor(element_type, ov.Shape(shape[1:]))
    raw, out = _raw(const).reshape(-1), tensor.data
    if element_type == ov.Type.bf16:
        out = out.view(np.uint16)
    if element_type.bitwidth < 8:  # packed: expert i's elements are bytes [i * n, (i + 1) * n)
        per = int(np.prod(shape[1:], dtype=np.int64)) * element_type.bitwidth
        if per % 8:
            return ops.gather(const, _i64(index), _i64(0)).output(0)
        n = per // 8
        out.reshape(-1)[:] = raw[index * n:(index + 1) * n]
    else:
        out[...] = raw.reshape(shape)[index]
    return ov.op.Constant(tensor).output(0)


def _constant_transposed(const: ov.Node) -> ov.Output:
    """A 2-D Constant `[in, out]` copied as `[out, in]`; packed types stay a Transpose for the plugin."""
    element_type = const.get_element_type()
    if element_type.bitwidth < 8:
        return ops.transpose(const, _i64([1, 0])).output(0)
    data = _raw(const)
    tensor = ov.Tensor(element_type, ov.Shape([data.shape[1], data.shape[0]]))
    tensor.data.view(data.dtype)[...] = data.T
    return ov.op.Constant(tensor).output(0)
