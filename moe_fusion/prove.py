"""Per-block proof: the block cut out of the original as its own model, run beside its replacement.

The cut runs from the experts' input (`block.hidden`) to `block.output`. Values from outside the block
that it reads only through ShapeOf (exporters build shapes from neighbouring tensors) become extra
inputs fed with arrays of the hidden input's shape; any other outside dependency refuses the proof.

Both sides run natively on CPU (f32 activations), each in a worker process (`moe_fusion.isolate`: a crash
of OpenVINO declines the block, not the caller), on the weights as stored: large constants become inputs
fed with the bytes of the file they live in (`moe_fusion.mapped`), never an f32 copy of all experts. The
replacement is FusedExperts lowered to native ops (see PLAIN/COMPRESSED below; docs/checking.md argues why
that proves FusedExperts itself).

Inputs are chosen to be hard, each case compared on its own rows and scale:
  - 1 random token, run alone (the decode shape);
  - in a run of its own, 8 rows holding a NaN row, a +Inf row, a -Inf row and a row with one NaN element
    between finite rows: NaN/Inf must come out exactly where the original's do (moe_fusion.compare), so a
    replacement that turns a NaN row finite, or spreads it where the original does not, is declined;
  - then one batch: 3 tokens [zero row, a row, the same row again] (a zero row ties every router score
    without a bias: both sides must share the router's tie-break; duplicated rows hit one expert twice);
    rows steered to every expert (each expert's router row, a sharper copy, 64 random rows); when the
    block clamps (expert_alpha > 0), rows past the clamp limit several times over; for f16/bf16 hidden
    states, rows at the type's extremes; forced routing: the routing weights and expert indices pass
    through a Select per element, so on these rows every expert runs in every top-k slot even when the
    router never picks it (skipped, with a note, when the block reads its router other than through
    those two values).
`experts_covered` counts the experts that ran and were compared (by the router or forced),
`experts_routed` those the block's own router selected.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion import isolate, mapped
from moe_fusion.block import MoEBlock, Weight
from moe_fusion.check import F32, available_memory, token_shape
from moe_fusion.compare import Comparison, compare
from moe_fusion.compressed import Compressed
from moe_fusion.io import core
from moe_fusion.io import first_line as _first_line

# Both sides compute in f32 from the same weights and differ in summation order only (GEMMs, the sum
# over K); measured differences are ~1e-6 of the output's scale. 1e-4 leaves room for long reductions
# at real hidden sizes while any wrong expert, weight, lane or routing shows at 1e-1 or more.
RTOL = 1e-4
MAX_BLOCK_NODES = 200_000
SCALE_FLOOR = 1e-6  # the least scale a case is judged at: an all-zero output still has a tolerance


# Output rounding of the block's own type adds up to half an ulp on each side.
TYPE_RTOL = {"f32": RTOL, "f16": 2.0**-9, "bf16": 2.0**-6}
STEERED_TOKENS = 64
NON_FINITE = "8 tokens with NaN, +Inf, -Inf rows and a row with one NaN element"


@dataclass
class Proof:
    ok: bool
    reason: str = ""
    max_abs_error: float = 0.0
    experts_covered: int = 0  # experts that ran and were compared, routed or forced
    experts_routed: int = 0  # experts the block's own router selected on the proof's inputs
    cases: list[str] = field(default_factory=list)  # the input cases that ran
    clamp_exercised: bool | None = None  # None: the block has no clamp
    notes: list[str] = field(default_factory=list)


def _key(value: ov.Output) -> tuple[int, int]:
    return value.get_node().get_instance_id(), value.get_index()


def _walk(start: list[ov.Node], known: set[int], hidden: tuple[int, int], limit: int) -> tuple[set[int], list]:
    """Nodes reached backwards from `start` without crossing `hidden`, Constants, `known` nodes or ShapeOf
    inputs; returns them and the ShapeOf nodes met. Raises on Parameter/ReadValue or past `limit`."""
    reached, shape_ofs, stack = set(), [], list(start)
    while stack:
        node = stack.pop()
        key = node.get_instance_id()
        if key in reached or key in known:
            continue
        kind = node.get_type_name()
        if kind in ("Parameter", "ReadValue"):
            raise ValueError(f"the block reads {kind} '{node.get_friendly_name()}' besides its hidden input")
        reached.add(key)
        if len(reached) > limit:
            raise ValueError("the block reaches too far back: it is not bounded by its hidden input")
        if kind == "ShapeOf":
            shape_ofs.append(node)
            continue
        stack.extend(
            v.get_node()
            for v in node.input_values()
            if _key(v) != hidden and v.get_node().get_type_name() != "Constant"
        )
    return reached, shape_ofs


def _block_nodes(block: MoEBlock) -> tuple[set[int], list[ov.Output]]:
    """Ids of the nodes between block.hidden and block.output, and outside values read only via ShapeOf
    (exporters take shapes from neighbouring tensors, even ones upstream of the block)."""
    hidden = _key(block.hidden)
    inside, pending = _walk([block.output.get_node()], set(), hidden, MAX_BLOCK_NODES)
    shape_only = {}
    while pending:
        value = pending.pop().input_value(0)
        if _key(value) == hidden or value.get_node().get_instance_id() in inside:
            continue
        try:  # computed from the block itself (or constants)? then it belongs to the block
            more, shape_ofs = _walk([value.get_node()], inside, hidden, 10_000)
        except ValueError:
            shape_only[_key(value)] = value
            continue
        inside |= more
        pending.extend(shape_ofs)
    return inside, list(shape_only.values())


def _new_nodes(replacement: ov.Output, inside: set[int], hidden: tuple[int, int]) -> set[int]:
    """The rewrite's nodes (FusedExperts and any it reads besides the block's own values)."""
    new, stack = set(), [replacement.get_node()]
    while stack:
        node = stack.pop()
        if node.get_instance_id() in inside or node.get_instance_id() in new:
            continue
        new.add(node.get_instance_id())
        stack.extend(v.get_node() for v in node.input_values() if _key(v) != hidden)
    return new


def _reads_router_elsewhere(block: MoEBlock, inside: set[int]) -> bool:
    """Whether the block's output depends on its router other than through the routing weights and indices
    (Llama-4 builds its dense routing from the TopK itself): then forcing those two values forces nothing."""
    stop = {_key(block.routing_weights), _key(block.topk_indices), _key(block.hidden)}
    router, seen, stack = block.router.get_instance_id(), set(), [block.output.get_node()]
    while stack:
        node = stack.pop()
        key = node.get_instance_id()
        if key == router:
            return True
        if key in seen or key not in inside:
            continue
        seen.add(key)
        stack.extend(v.get_node() for v in node.input_values() if _key(v) not in stop)
    return False


@dataclass
class Cut:
    """The block and its replacement as standalone models with the same inputs: hidden rows, then (when
    `forced`) routing weights, expert indices and two masks of their shapes choosing them over the router's
    own per element, then the values the block reads only through ShapeOf. `original` also outputs the
    router's own top-k indices."""

    original: ov.Model
    replacement: ov.Model | None
    forced: bool


def cut(block: MoEBlock, replacement: ov.Output | None, forced: bool = True) -> Cut:
    """Cut the block (and `replacement`, built on the block's own values; None: the block only) out of the
    graph. Forced routing is left out when the block reads its router elsewhere (`Cut.forced` False). Every
    cut of one block has the same inputs, in the same order."""
    inside, shape_only = _block_nodes(block)
    forced = forced and not _reads_router_elsewhere(block, inside)
    if replacement is not None:
        inside |= _new_nodes(replacement, inside, _key(block.hidden))
    hidden = ops.parameter(block.hidden.get_partial_shape(), block.hidden.get_element_type())
    params, swaps = [hidden], [(block.hidden, hidden.output(0))]
    if forced:
        for value in (block.routing_weights, block.topk_indices):
            given = ops.parameter(value.get_partial_shape(), value.get_element_type())
            mask = ops.parameter(value.get_partial_shape(), ov.Type.boolean)
            params += [given, mask]
            swaps.append((value, ops.select(mask, given, value).output(0)))
    for value in shape_only:
        params.append(ops.parameter(value.get_partial_shape(), value.get_element_type()))
        swaps.append((value, params[-1].output(0)))
    rewired = []
    for value, new in swaps:  # targets first, then rewire: a Select reads the value it replaces
        rewired += [(t, value, new) for t in value.get_target_inputs() if t.get_node().get_instance_id() in inside]
    for target, _value, new in rewired:
        target.replace_source_output(new)
    try:
        original = ov.Model([block.output, block.topk_indices], params, "block").clone()
        rewritten = ov.Model([replacement], params, "fused_block").clone() if replacement is not None else None
    finally:
        for target, value, _new in rewired:
            target.replace_source_output(value)
    return Cut(original, rewritten, forced)


def _constant(value: ov.Output) -> np.ndarray | None:
    """The array behind a Constant, or a Convert of one."""
    node = value.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    if node.get_type_name() != "Constant":
        return None
    return np.asarray(node.get_data(), dtype=np.float32)


def _router_rows(block: MoEBlock, hidden_size: int) -> list[np.ndarray]:
    """Rows that favour one expert each: the router's linear layer, found behind its TopK."""
    stack, seen = [block.router], set()
    while stack:
        node = stack.pop()
        if node.get_instance_id() in seen or len(seen) > 64:
            continue
        seen.add(node.get_instance_id())
        if node.get_type_name() == "MatMul":
            for i in (0, 1):
                array = _constant(node.input_value(i))
                if array is None or array.ndim != 2 or hidden_size not in array.shape:
                    continue
                rows = array if array.shape[1] == hidden_size else array.T  # [E, H]
                norms = np.linalg.norm(rows, axis=1, keepdims=True)
                return list(rows / np.maximum(norms, 1e-12) * np.sqrt(hidden_size))
        stack.extend(v.get_node() for v in node.input_values())
    return []


def _steering_rows(block: MoEBlock, hidden_size: int, rng: np.random.Generator) -> np.ndarray:
    """Rows that make the router select every expert it can reach: each expert's router row (and a sharper
    copy), plus random rows; the forced-routing case covers the experts no row reaches."""
    favoured = _router_rows(block, hidden_size)
    rows = [np.stack(favoured), 3.0 * np.stack(favoured)] if favoured else []
    rows.append(rng.standard_normal((STEERED_TOKENS, hidden_size)))
    return np.concatenate(rows).astype(np.float32)


def _expert_matrices(weight: Weight):
    """Each expert's `[in, out]` matrix of the block's own weight in f32, one at a time (no f32 copy of all
    experts); nothing when the weight is integer-compressed."""
    parts = weight.parts
    if any(isinstance(p, Compressed) for p in parts):
        return
    for expert in parts[0] if len(parts) == 1 and parts[0].ndim == 3 else parts:  # stacked, or per expert
        yield np.asarray(expert, dtype=np.float32)


def _clamp_rows(block: MoEBlock, rng: np.random.Generator, hidden_size: int) -> tuple:
    """Rows large enough that gate/up pre-activations pass the clamp limit (GEMM2 with expert_alpha), and
    whether they do (None: the weights could not be read to tell)."""
    alpha = float(block.expert_alpha)  # the original's clamp, whatever the replacement claims
    rows = rng.standard_normal((16, hidden_size)).astype(np.float32)
    gate_up = next(iter(block.weights.values()))
    peaks = [float(np.abs(rows @ w).max()) for w in _expert_matrices(gate_up)]
    if not peaks:
        return rows * 8 * alpha, None
    rows *= 4 * alpha / max(max(peaks), 1e-12) * np.linspace(0.5, 2.0, 16, dtype=np.float32)[:, None]
    return rows, max(float(np.abs(rows @ w).max()) for w in _expert_matrices(gate_up)) > alpha


def _forced_routing(tokens: int, num_experts: int, top_k: int, rng: np.random.Generator, index_type) -> tuple:
    """Distinct experts per row (t + j * (E // K) mod E), every expert in every slot; positive weights
    summing to 1."""
    t = np.arange(tokens)[:, None]
    stride = max(num_experts // top_k, 1)
    indices = (t + stride * np.arange(top_k)[None]) % num_experts
    weights = rng.random((tokens, top_k)) + 0.05
    return indices.astype(index_type), (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def _compare(case: str, want: np.ndarray, got: np.ndarray, rtol: float, chosen: np.ndarray | None) -> Comparison:
    """One case's rows compared under moe_fusion.compare's policy (non-finite values must match exactly);
    the tolerance is rtol of the case's finite scale, floored at 1e-6 so an all-zero output is not judged
    on rounding alone."""
    tokens = chosen.shape[0] if chosen is not None else 1
    if got.size != want.size:
        return compare(want, got, rtol=rtol, same_size=True)
    return compare(want.reshape(tokens, -1), got.reshape(tokens, -1), rtol=rtol, atol=rtol * SCALE_FLOOR)


def _reason(case: str, result: Comparison, chosen: np.ndarray | None) -> str:
    """The case, why it failed, and the worst token with the experts it ran."""
    if result.shape_error:
        return f"{case}: replacement has {result.shape_error}"
    token = result.worst[0]
    experts = f" (experts {chosen[token].tolist()})" if chosen is not None else ""
    return f"{case}: {result.describe('original', 'replacement')} at token {token}{experts}"


@dataclass
class _Case:
    name: str
    rows: np.ndarray  # [n, H] hidden rows
    forced: tuple[np.ndarray, np.ndarray] | None = None  # [n, K] expert indices, routing weights
    alone: bool = False  # runs in a batch of its own (non-finite rows must not reach other cases' rows)


def _non_finite_rows(rng: np.random.Generator, h: int) -> np.ndarray:
    """A NaN row, a +Inf row, a -Inf row and a row with one NaN element, each between finite rows: the
    replacement must give NaN/Inf exactly where the original does, on those rows and (should the
    original's plumbing spread them) on their neighbours."""
    rows = rng.standard_normal((8, h)).astype(np.float32)
    rows[1], rows[3], rows[4] = np.nan, np.inf, -np.inf
    rows[6, h // 2] = np.nan
    return rows


def _cases(block: MoEBlock, rng: np.random.Generator, h: int, forced: bool, proof: Proof) -> list:
    pair = rng.standard_normal((1, h)).astype(np.float32)
    steering = _steering_rows(block, h, rng)
    cases = [
        _Case("1 token", rng.standard_normal((1, h)).astype(np.float32)),
        _Case("3 tokens: zero row, duplicated row", np.concatenate([np.zeros((1, h), np.float32), pair, pair])),
        _Case(f"{len(steering)} tokens steered to every expert", steering),
    ]
    if block.expert_alpha > 0:
        rows, proof.clamp_exercised = _clamp_rows(block, rng, h)
        cases.append(_Case("16 tokens past the clamp limit", rows))
    out_type = block.output.get_element_type().get_type_name()
    if out_type in ("f16", "bf16"):
        big, tiny = 2.0 ** (8 if out_type == "f16" else 32), 2.0**-14
        rows = rng.standard_normal((8, h)).astype(np.float32) * np.repeat([big, tiny], 4)[:, None]
        cases.append(_Case(f"8 tokens at {out_type} extremes", rows))
    if forced:
        tokens = max(STEERED_TOKENS, block.num_experts)
        index_type = block.topk_indices.get_element_type().to_dtype()
        routing = _forced_routing(tokens, block.num_experts, block.top_k, rng, index_type)
        rows = rng.standard_normal((tokens, h)).astype(np.float32)
        cases.append(_Case(f"{tokens} tokens with forced routing", rows, routing))
    cases.append(_Case(NON_FINITE, _non_finite_rows(rng, h), alone=True))
    return cases


def _feeds(block: MoEBlock, params: list[ov.Node], cases: list[_Case], forced: bool, rng) -> list[np.ndarray]:
    """The cut's data inputs for `cases` run as one batch of rows (every op of an MoE block is per token)."""
    rows = np.concatenate([c.rows for c in cases])
    tokens = rows.shape[0]
    hidden = rows.reshape(token_shape(block.hidden.get_partial_shape(), tokens))
    feeds = [hidden.astype(params[0].get_element_type().to_dtype())]
    if forced:
        k = block.top_k
        chosen = np.concatenate([c.forced[0] if c.forced else np.zeros((len(c.rows), k)) for c in cases])
        weights = np.concatenate([c.forced[1] if c.forced else np.zeros((len(c.rows), k)) for c in cases])
        mask = np.concatenate([np.full((len(c.rows), k), c.forced is not None) for c in cases])
        for value, given in ((block.routing_weights, weights), (block.topk_indices, chosen)):
            shape = token_shape(value.get_partial_shape(), tokens)
            if int(np.prod(shape)) != given.size:
                raise _NotTokenRows(f"{value.get_node().get_friendly_name()} has shape {value.get_partial_shape()}")
            feeds += [given.reshape(shape).astype(value.get_element_type().to_dtype()), mask.reshape(shape)]
    for param in params[len(feeds) :]:  # shape-only neighbours: arrays of their own shape for this many tokens
        shape = token_shape(param.get_partial_shape(), tokens)
        feeds.append(rng.standard_normal(shape).astype(param.get_element_type().to_dtype()))
    return feeds


# Rows per run when the unfused block holds memory per token (MoEBlock.bytes_per_token): both workers at
# once, each within this share of the memory available.
ROWS_MEMORY_SHARE = 0.2


def _batches(block: MoEBlock, cases: list[_Case]) -> list[list[_Case]]:
    """The runs: 1 token alone, every other case in one batch, then each case marked `alone` in a run of
    its own; each in pieces of as many rows as fit when the block takes memory per token (a
    direct-conversion block gathers K experts' f32 weights per token: 151 MB at Qwen3-30B-A3B's shape)."""
    together = [c for c in cases[1:] if not c.alone]
    limit = max([sum(len(c.rows) for c in together), *(len(c.rows) for c in cases)])
    if block.bytes_per_token:
        memory = min(available_memory(), 64 << 30)  # "unknown" is no limit there: take 64 GB
        limit = max(1, int(memory * ROWS_MEMORY_SHARE) // block.bytes_per_token)
    runs = [cases[:1]]
    for group in [together] + [[c] for c in cases[1:] if c.alone]:
        runs += _pieces(group, limit)
    return [run for run in runs if run]


def _pieces(cases: list[_Case], limit: int) -> list[list[_Case]]:
    """`cases` cut into runs of at most `limit` rows."""
    pieces, piece, room = [], [], limit
    for case in cases:
        start = 0
        while start < len(case.rows):
            take = min(room, len(case.rows) - start)
            forced = tuple(a[start : start + take] for a in case.forced) if case.forced is not None else None
            piece.append(_Case(case.name, case.rows[start : start + take], forced, case.alone))
            start, room = start + take, room - take
            if room == 0:
                pieces.append(piece)
                piece, room = [], limit
    return [*pieces, *([piece] if piece else [])]


class _NotTokenRows(ValueError):
    """Forced routing cannot be fed: the routing values are not [T, K] rows."""


def run_side(xml: str, weights: list[mapped.FileBytes], feeds: str, target: str | None, modes: tuple) -> list:
    """In a worker process: read the cut-out model, lower it to `target` (the replacement), feed it its
    mapped weights, compile it f32 on CPU and run each feed list; returns every run's outputs.

    `modes`, tried in order until one runs: the weights as Parameters of a dynamic shape ("dynamic": the
    plugin holds no copy of them), of their static shape ("static"), or as Constants over the mapped bytes
    ("constant": the plugin's compressed kernels, which refuse weights that are not constants). `feeds`: an
    .npz file of the runs' inputs (a file: both workers load it at once, instead of the caller writing MBs
    down each one's pipe while it starts)."""
    with np.load(feeds) as stored:
        runs = [[stored[f"{r}_{i}"] for i in range(int(stored[f"{r}_count"]))] for r in range(int(stored["runs"]))]
    errors = []
    for mode in modes:
        try:
            return _run_side(xml, weights, runs, target, mode)
        except RuntimeError as error:
            errors.append(error)
    raise errors[0]


def _run_side(xml: str, weights: list[mapped.FileBytes], runs: list, target: str | None, mode: str) -> list:
    from moe_fusion.lower import lower

    model = core().read_model(xml)
    feeds = {p.get_friendly_name(): weights[int(p.get_friendly_name()[len(mapped.WEIGHT_PREFIX) :])]
             for p in model.get_parameters() if p.get_friendly_name().startswith(mapped.WEIGHT_PREFIX)}
    mappings = []  # alive as long as the Tensors over them
    if mode == "constant":
        for param in [p for p in model.get_parameters() if p.get_friendly_name() in feeds]:
            tensor, mapping = feeds.pop(param.get_friendly_name()).tensor()
            mappings.append(mapping)
            param.output(0).replace(ops.constant(tensor, shared_memory=True).output(0))
            model.remove_parameter(param)
    if target:
        lower(model, target)
        _per_expert_parameters(model, feeds)
    if mode == "dynamic":
        mapped.relax(model)
    params = model.get_parameters()
    request = core().compile_model(model, "CPU", F32).create_infer_request()
    data = [i for i, p in enumerate(params) if p.get_friendly_name() not in feeds]
    for i, param in enumerate(params):
        if param.get_friendly_name() in feeds:
            tensor, mapping = feeds[param.get_friendly_name()].tensor()
            mappings.append(mapping)
            request.set_input_tensor(i, tensor)
    results = []
    for inputs in runs:
        for i, array in zip(data, inputs, strict=True):
            request.set_input_tensor(i, ov.Tensor(np.ascontiguousarray(array)))
        request.infer()
        results.append([np.array(request.get_output_tensor(o).data) for o in range(len(request.model_outputs))])
    return results


def _per_expert_parameters(model: ov.Model, feeds: dict[str, mapped.FileBytes]) -> None:
    """`Gather(stacked weight, e, axis 0)` (how the per-expert lowering reads a non-constant weight) becomes
    a Parameter of its own fed with expert e's bytes: each expert's weight is then read where it is used,
    not gathered up front into a copy of every expert."""
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Gather":
            continue
        source, index, axis = (v.get_node() for v in node.input_values())
        name = source.get_friendly_name()
        if name not in feeds or index.get_type_name() != "Constant" or axis.get_type_name() != "Constant":
            continue
        whole, expert = feeds[name], int(index.get_data().reshape(-1)[0]) if index.get_data().size == 1 else -1
        count = whole.shape[0]
        if int(axis.get_data().reshape(-1)[0]) != 0 or not 0 <= expert < count or whole.nbytes % count:
            continue
        step = whole.nbytes // count
        part = mapped.FileBytes(whole.path, whole.offset + expert * step, whole.element_type, whole.shape[1:], step)
        param = ops.parameter(list(part.shape), node.get_output_element_type(0))
        param.set_friendly_name(f"{name}_expert{expert}")
        node.output(0).replace(param.output(0))
        model.add_parameters([param])
        feeds[param.get_friendly_name()] = part
    for param in model.get_parameters():
        if param.get_friendly_name() in feeds and not param.output(0).get_target_inputs():
            model.remove_parameter(param)
            del feeds[param.get_friendly_name()]


# The proof's two sides run in their own processes, at the same time (one compiles while the other runs).
_WORKERS = (isolate.Worker(), isolate.Worker())


def start_workers() -> None:
    """Start the proof's worker processes ahead of the first proof (each takes ~0.5 s to import OpenVINO)."""
    for worker in _WORKERS:
        worker.start()
# The replacement runs as FusedExperts lowered to native ops that read the same stored weights as the
# original (FusedExperts itself, a Python op, would need every expert in f32); that each lowering computes
# FusedExperts is tested on its own (tests/test_lower.py, tests/test_op_contract.py). Float weights: one GEMM
# per expert, each expert's weight a Parameter converted where it is used. Integer-compressed weights: the
# plugin's compressed kernels on Constants over the mapped bytes (decompressing them op by op instead keeps
# every expert's f32 copy alive at once: 3.1 GB for a 0.73 GB int4 Mixtral layer, 1.0 GB this way).
PLAIN = ("per-expert", ("dynamic", "static", "constant"))
COMPRESSED = ("cpu", ("constant", "dynamic", "static"))


@dataclass
class Pending:
    """A proof whose original side is running in its worker, while the caller builds the replacement."""

    block: MoEBlock
    proof: Proof
    forced: bool
    batches: list[list[_Case]]
    folder: str  # the run inputs, the cut-out models and any spilled weights
    modes: tuple
    target: str


def begin(block: MoEBlock, seed: int = 0) -> Pending | Proof:
    """Cut the block out and start running it on the proof's inputs; a failed Proof when that cannot be."""
    hidden_shape = block.hidden.get_partial_shape()
    if hidden_shape.rank.is_dynamic or not all(d.is_dynamic or d.get_length() == 1 for d in list(hidden_shape)[:-1]):
        # rows of tokens fill the dynamic dims; a static batch or a reshaped input (mutation fuzzing found
        # [?, 8, H]) takes no [T, H] rows
        return Proof(False, f"cannot feed token rows to the experts' input of shape {hidden_shape}")
    try:
        sides = cut(block, None)
    except (ValueError, RuntimeError) as error:
        return Proof(False, f"cannot cut the block out for proof: {error}")
    rng = np.random.default_rng(seed)
    proof = Proof(True)
    if not sides.forced:
        proof.notes.append("forced routing skipped: the block reads its router besides the routing weights and indices")
    cases = _cases(block, rng, hidden_shape[-1].get_length(), sides.forced, proof)
    try:
        batches = _batches(block, cases)
        runs = [_feeds(block, sides.original.get_parameters(), group, sides.forced, rng) for group in batches]
    except _NotTokenRows as error:  # forced routing cannot be fed: prove without it
        proof.notes.append(f"forced routing skipped: {error}, not [T, K]")
        sides = cut(block, None, forced=False)
        batches = _batches(block, [c for c in cases if c.forced is None])
        runs = [_feeds(block, sides.original.get_parameters(), group, False, rng) for group in batches]
    except ValueError as error:  # inputs that do not fit the block's shapes
        return _failed(proof, f"block does not run on {cases[0].name}: {error}", set(), set())
    compressed = any(isinstance(part, Compressed) for w in block.weights.values() for part in w.parts)
    target, modes = COMPRESSED if compressed else PLAIN
    folder = tempfile.mkdtemp(prefix="moe-fusion-proof-")
    arrays = {f"{r}_{i}": array for r, run in enumerate(runs) for i, array in enumerate(run)}
    np.savez(Path(folder) / "feeds.npz", runs=len(runs), **{f"{r}_count": len(run) for r, run in enumerate(runs)},
             **arrays)
    pending = Pending(block, proof, sides.forced, batches, folder, modes, target)
    _send(pending, 0, "original", sides.original, None)
    return pending


def _send(pending: Pending, side: int, name: str, model: ov.Model, lowering: str | None) -> None:
    weights = mapped.parameterize(model, mapped.Locator(Path(pending.folder)))
    xml = str(Path(pending.folder) / f"{name}.xml")
    ov.save_model(model, xml, compress_to_fp16=False)
    _WORKERS[side].send(run_side, xml, weights, str(Path(pending.folder) / "feeds.npz"), lowering, pending.modes)


def cancel(pending: Pending) -> None:
    """Drop a started proof (its replacement could not be built): wait for the original side, discard it."""
    try:
        with contextlib.suppress(Exception):
            _WORKERS[0].receive()
    finally:
        shutil.rmtree(pending.folder, ignore_errors=True)


def finish(pending: Pending, replacement: ov.Output) -> Proof:
    """Run the replacement beside the original that `begin` started, and compare every case."""
    block, proof = pending.block, pending.proof
    replies = []
    try:
        try:
            sides = cut(block, replacement, forced=pending.forced)
            _send(pending, 1, "replacement", sides.replacement, pending.target)
        except Exception as error:  # collect the original's reply all the same: the worker is busy with it
            replies.append(error)
        for worker in _WORKERS[: 2 - len(replies)]:
            try:
                replies.append(worker.receive())
            except Exception as error:
                replies.append(error)
    finally:
        shutil.rmtree(pending.folder, ignore_errors=True)
    crashes = [r for r in replies if isinstance(r, isolate.WorkerCrash)]
    errors = [r for r in replies if isinstance(r, Exception)]
    if crashes:
        reason = f"OpenVINO crashed running the block on CPU: its worker process was {crashes[0]}"
        return _failed(proof, reason, set(), set())
    if errors:  # OpenVINO's RuntimeError, or anything else: unproven is not applied
        return _failed(proof, f"block does not run on the proof's inputs: {_first_line(errors[0])}", set(), set())
    return _verdict(pending, replies[0], replies[1])


def prove(block: MoEBlock, fused: ov.Node, replacement: ov.Output, seed: int = 0) -> Proof:
    """Run the block and its replacement (the value replacing `block.output`, computed by `fused`) on hard
    inputs; ok only if every case agrees within tolerance. `fuse` runs the same as begin/finish, so the
    original compiles while the replacement is built."""
    pending = begin(block, seed)
    return pending if isinstance(pending, Proof) else finish(pending, replacement)


def _verdict(pending: Pending, original: list, fused_runs: list) -> Proof:
    block, proof, batches = pending.block, pending.proof, pending.batches
    rtol = TYPE_RTOL.get(block.output.get_element_type().get_type_name(), RTOL)
    routed: set[int] = set()
    covered: set[int] = set()
    for group, (want_all, chosen_all), (got_all,) in zip(batches, original, fused_runs, strict=True):
        tokens = sum(len(c.rows) for c in group)
        if got_all.size != want_all.size:
            reason = f"replacement has {got_all.size} values, original {want_all.size}"
            return _failed(proof, f"outputs differ on {group[0].name}: {reason}", routed, covered)
        want_all, got_all = want_all.reshape(tokens, -1), got_all.reshape(tokens, -1)
        chosen_all = chosen_all.reshape(tokens, -1)
        ends = np.cumsum([len(c.rows) for c in group])
        for case, end in zip(group, ends, strict=True):
            rows = slice(end - len(case.rows), end)
            experts = case.forced[0] if case.forced is not None else chosen_all[rows]
            want, got = want_all[rows], got_all[rows]
            if case.name not in proof.cases:
                proof.cases.append(case.name)
            result = _compare(case.name, want, got, rtol, experts)
            proof.max_abs_error = max(proof.max_abs_error, result.max_abs)
            if not result.ok:
                return _failed(proof, f"outputs differ on {_reason(case.name, result, experts)}", routed, covered)
            if case.alone:  # the router's choice on NaN/Inf rows means nothing: not counted as coverage
                continue
            if case.forced is None:
                routed.update(np.unique(experts).tolist())
            covered.update(np.unique(experts).tolist())
    if proof.clamp_exercised is None and block.expert_alpha > 0:
        proof.notes.append("could not confirm the clamp was reached (weights not constant)")
    proof.experts_routed = len(routed & set(range(block.num_experts)))
    proof.experts_covered = len(covered & set(range(block.num_experts)))
    return proof


def _failed(proof: Proof, reason: str, routed: set[int], covered: set[int]) -> Proof:
    proof.ok, proof.reason = False, reason
    proof.experts_routed, proof.experts_covered = len(routed), len(covered)
    return proof
