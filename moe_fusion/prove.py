"""Per-block proof: the block cut out of the original as its own model, run beside its replacement.

The cut runs from the experts' input (`block.hidden`) to `block.output`. Values from outside the block
that it reads only through ShapeOf (exporters build shapes from neighbouring tensors) become extra
inputs fed with arrays of the hidden input's shape; any other outside dependency refuses the proof.

Inputs are chosen to be hard, each case compared on its own scale:
  - 1 random token; 3 tokens [zero row, a row, the same row again] (a zero row ties every router score
    without a bias: both sides must share the router's tie-break; duplicated rows hit one expert twice);
  - 64 tokens steered from a pool of candidates (random rows and the router's own weight rows) so the
    router selects every expert it can reach, with duplicated rows;
  - when the block clamps (expert_alpha > 0): rows scaled until the gate/up pre-activations pass the
    clamp limit several times over; for f16/bf16 hidden states, rows at the type's extremes;
  - forced routing: routing weights and expert indices as inputs of the cut, so every expert runs in
    every top-k slot even when the router never picks it (skipped, with a note, when the block reads
    its router other than through those two values).
`experts_covered` counts the experts that ran and were compared (by the router or forced),
`experts_routed` those the block's own router selected.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion.block import MoEBlock
from moe_fusion.check import F32, token_shape
from moe_fusion.io import core
from moe_fusion.io import first_line as _first_line

# Both sides compute in f32 from the same weights and differ in summation order only (GEMMs, the sum
# over K); measured differences are ~1e-6 of the output's scale. 1e-4 leaves room for long reductions
# at real hidden sizes while any wrong expert, weight, lane or routing shows at 1e-1 or more.
RTOL = 1e-4
TOKEN_COUNTS = (1, 3, 64)
MAX_BLOCK_NODES = 200_000


# Output rounding of the block's own type adds up to half an ulp on each side.
TYPE_RTOL = {"f32": RTOL, "f16": 2.0**-9, "bf16": 2.0**-6}
STEERED_TOKENS = 64
POOL_TOKENS = 512


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


def submodels(
    block: MoEBlock, fused: ov.Node, replacement: ov.Output, forced: bool = False
) -> tuple[ov.Model, ov.Model]:
    """(original block, fused block) as standalone models with inputs hidden + shape-only values.

    The original also outputs the chosen experts. With `forced`, the routing weights and expert indices
    are inputs too (after hidden, before the shape-only values) and the original outputs the block only;
    raises ValueError when the block reads its router other than through those two values."""
    inside, shape_only = _block_nodes(block)
    inside |= _new_nodes(replacement, inside, _key(block.hidden))
    cut = [block.hidden, *([block.routing_weights, block.topk_indices] if forced else []), *shape_only]
    rewired = []
    params = []
    for value in cut:
        param = ops.parameter(value.get_partial_shape(), value.get_element_type())
        params.append(param)
        for target in list(value.get_target_inputs()):
            if target.get_node().get_instance_id() in inside:
                target.replace_source_output(param.output(0))
                rewired.append((target, value))
    try:
        outputs = [block.output] if forced else [block.output, block.topk_indices]
        cut_block = ov.Model(outputs, params, "block")
        if forced and any(n.get_instance_id() == block.router.get_instance_id() for n in cut_block.get_ordered_ops()):
            raise ValueError("the block reads its router besides the routing weights and indices")
        original = cut_block.clone()
        rewritten = ov.Model([replacement], params, "fused_block").clone()
    finally:
        for target, value in rewired:
            target.replace_source_output(value)
    return original, rewritten


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


class _Sides:
    """The compiled original and replacement, fed rows of the hidden input."""

    def __init__(self, block: MoEBlock, original: ov.Model, rewritten: ov.Model, rng: np.random.Generator):
        self.block, self.rng = block, rng
        self.run_a = core().compile_model(original, "CPU", F32)
        self.run_b = core().compile_model(rewritten, "CPU", F32)
        self.params = original.get_parameters()
        self.hidden_size = block.hidden.get_partial_shape()[-1].get_length()
        self.dtype = block.hidden.get_element_type().to_dtype()

    def feeds(self, rows: np.ndarray, *routing: np.ndarray) -> list[np.ndarray]:
        tokens = rows.shape[0]
        first = rows.reshape(token_shape(self.block.hidden.get_partial_shape(), tokens)).astype(self.dtype)
        extra = [  # shape-only neighbours: arrays of their own shape for this many tokens
            self.rng.standard_normal(token_shape(p.get_partial_shape(), tokens)).astype(p.get_element_type().to_dtype())
            for p in self.params[1 + len(routing) :]
        ]
        return [first, *routing, *extra]

    def chosen(self, rows: np.ndarray) -> np.ndarray:
        """[T, K] experts the block's router picks for `rows`."""
        values = list(self.run_a(self.feeds(rows)).values())
        return np.asarray(values[1]).reshape(rows.shape[0], -1)


def _steered(sides: _Sides, rng: np.random.Generator, num_experts: int) -> np.ndarray:
    """STEERED_TOKENS rows (more if needed) that make the router select every expert it can reach."""
    h = sides.hidden_size
    pool = [rng.standard_normal((POOL_TOKENS, h)), *(np.stack(r)[None] for r in [_router_rows(sides.block, h)] if r)]
    pool = np.concatenate([p.reshape(-1, h) for p in pool]).astype(np.float32)
    pool = np.concatenate([pool, 3.0 * pool[:64]])  # sharper router scores too
    chosen = sides.chosen(pool)
    picked, covered = [], set()
    while len(covered) < num_experts:  # greedy cover: the row adding the most new experts
        gains = [len(set(row.tolist()) - covered) for row in chosen]
        best = int(np.argmax(gains))
        if gains[best] == 0:
            break
        picked.append(best)
        covered |= set(chosen[best].tolist())
    rows = pool[picked]
    rest = max(STEERED_TOKENS - len(rows) - 2, 0)
    return np.concatenate([rows, rows[:2], rng.standard_normal((rest, h)).astype(np.float32)])


def _clamp_rows(sides: _Sides, fused: ov.Node, rng: np.random.Generator) -> tuple[np.ndarray, bool]:
    """Rows large enough that gate/up pre-activations pass the clamp limit (GEMM2 with expert_alpha)."""
    alpha = float(sides.block.expert_alpha)  # the original's clamp, whatever the replacement claims
    rows = rng.standard_normal((16, sides.hidden_size)).astype(np.float32)
    w = _constant(fused.input_value(3))
    if w is None:
        return rows * 8 * alpha, False
    peak = float(np.abs(np.einsum("th,ehi->tei", rows, w)).max())
    rows *= 4 * alpha / max(peak, 1e-12) * np.linspace(0.5, 2.0, 16, dtype=np.float32)[:, None]
    return rows, bool(np.abs(np.einsum("th,ehi->tei", rows, w)).max() > alpha)


def _forced_routing(tokens: int, num_experts: int, top_k: int, rng: np.random.Generator, index_type) -> tuple:
    """Distinct experts per row (t + j * (E // K) mod E), every expert in every slot; positive weights
    summing to 1."""
    t = np.arange(tokens)[:, None]
    stride = max(num_experts // top_k, 1)
    indices = (t + stride * np.arange(top_k)[None]) % num_experts
    weights = rng.random((tokens, top_k)) + 0.05
    return indices.astype(index_type), (weights / weights.sum(1, keepdims=True)).astype(np.float32)


def _compare(case: str, want: np.ndarray, got: np.ndarray, rtol: float, chosen: np.ndarray | None) -> str:
    """'' when equal within rtol of the case's scale, else the reason (worst token and its experts)."""
    if got.size != want.size:
        return f"{case}: replacement has {got.size} values, original {want.size}"
    tokens = chosen.shape[0] if chosen is not None else 1
    want = want.reshape(tokens, -1).astype(np.float64)
    got = got.reshape(tokens, -1).astype(np.float64)
    # NaN or inf where the original has the same (PhiMoE's sparsemixer gives NaN on an all-zero row)
    same = (np.isnan(want) & np.isnan(got)) | (np.isinf(want) & (want == got))
    diff = np.where(same, 0.0, np.abs(got - want))
    diff = np.where(np.isnan(diff), np.inf, diff)
    finite = want[np.isfinite(want)]
    scale = max(float(np.abs(finite).max()) if finite.size else 0.0, 1e-6)
    error = float(diff.max()) if diff.size else 0.0
    if error <= rtol * scale:
        return ""
    token = int(np.unravel_index(int(np.argmax(diff)), diff.shape)[0])
    experts = f" (experts {chosen[token].tolist()})" if chosen is not None else ""
    return f"{case}: max |diff| {error:.3g} vs scale {scale:.3g} at token {token}{experts}"


# Peak memory of a proof per f32 byte of the block's expert weights: both sides compile them (the plugin
# decompresses f16/int weights to f32 for the original's MatMuls and for FusedExperts' Python inputs) and
# the forced-routing case compiles a second pair. Measured 6.7 (4.05 GB peak RssAnon for 0.6 GB of f32
# weights, Qwen3-30B-A3B shapes with 32 experts); 8 leaves room.
PROOF_MEMORY_PER_WEIGHT_BYTE = 8


def _proof_memory(fused: ov.Node) -> int:
    weights = range(3, fused.get_input_size())
    elements = sum(int(np.prod(list(fused.get_input_partial_shape(i).get_shape()))) for i in weights)
    return PROOF_MEMORY_PER_WEIGHT_BYTE * 4 * elements


def _available_memory() -> int:
    """MemAvailable (Linux); unknown elsewhere: no limit."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def prove(block: MoEBlock, fused: ov.Node, replacement: ov.Output, seed: int = 0) -> Proof:
    """Run the block and its replacement on hard inputs; ok only if every case agrees within tolerance."""
    hidden_shape = block.hidden.get_partial_shape()
    if hidden_shape.rank.is_dynamic or not all(d.is_dynamic or d.get_length() == 1 for d in list(hidden_shape)[:-1]):
        # rows of tokens fill the dynamic dims; a static batch or a reshaped input (mutation fuzzing found
        # [?, 8, H]) takes no [T, H] rows
        return Proof(False, f"cannot feed token rows to the experts' input of shape {hidden_shape}")
    needed, available = _proof_memory(fused), _available_memory()
    if needed > available:
        return Proof(
            False,
            f"proving it needs ~{needed / 1e9:.1f} GB of memory, {available / 1e9:.1f} GB are available; fuse with "
            "--no-verify and compare the models with `moe-fusion check`",
        )
    try:
        original, rewritten = submodels(block, fused, replacement)
    except (ValueError, RuntimeError) as error:
        return Proof(False, f"cannot cut the block out for proof: {error}")
    rng = np.random.default_rng(seed)
    try:
        sides = _Sides(block, original, rewritten, rng)
    except RuntimeError as error:
        return Proof(False, f"cannot compile the block for proof: {_first_line(error)}")
    out_type = block.output.get_element_type().get_type_name()
    rtol = TYPE_RTOL.get(out_type, RTOL)
    num_experts, h = block.num_experts, sides.hidden_size
    proof = Proof(True)
    routed: set[int] = set()
    case = "steering inputs"

    row = rng.standard_normal((1, h)).astype(np.float32)
    cases = [("1 token", row)]
    pair = rng.standard_normal((1, h)).astype(np.float32)
    cases.append(("3 tokens: zero row, duplicated row", np.concatenate([np.zeros((1, h), np.float32), pair, pair])))
    try:
        cases.append((f"{STEERED_TOKENS} tokens steered to every expert", _steered(sides, rng, num_experts)))
        if block.expert_alpha > 0:
            rows, proof.clamp_exercised = _clamp_rows(sides, fused, rng)
            cases.append(("16 tokens past the clamp limit", rows))
        if out_type in ("f16", "bf16"):
            big = 2.0 ** (8 if out_type == "f16" else 32)
            tiny = 2.0**-14
            extremes = rng.standard_normal((8, h)).astype(np.float32) * np.repeat([big, tiny], 4)[:, None]
            cases.append((f"8 tokens at {out_type} extremes", extremes))
        for case, rows in cases:
            values = list(sides.run_a(sides.feeds(rows)).values())
            want, chosen = np.asarray(values[0]), np.asarray(values[1]).reshape(rows.shape[0], -1)
            got = np.asarray(sides.run_b(sides.feeds(rows))[0])
            routed.update(np.unique(chosen).tolist())
            proof.cases.append(case)
            proof.max_abs_error = max(proof.max_abs_error, _max_abs(want, got))
            reason = _compare(case, want, got, rtol, chosen)
            if reason:
                return _failed(proof, f"outputs differ on {reason}", routed, routed)
    except (RuntimeError, ValueError) as error:  # ValueError: inputs that do not fit the block's shapes
        return _failed(proof, f"block does not run on {case}: {_first_line(error)}", routed, routed)

    forced = _prove_forced(block, fused, replacement, rng, proof, rtol)
    covered = routed | forced
    if proof.ok and proof.clamp_exercised is False:
        proof.notes.append("could not confirm the clamp was reached (weights not constant)")
    proof.experts_routed, proof.experts_covered = len(routed), len(covered & set(range(num_experts)))
    return proof


def _prove_forced(block, fused, replacement, rng, proof: Proof, rtol: float) -> set[int]:
    """Forced-routing case; returns the experts it covered (empty when skipped or failed)."""
    try:
        original, rewritten = submodels(block, fused, replacement, forced=True)
        sides = _Sides(block, original, rewritten, rng)
    except (ValueError, RuntimeError) as error:
        proof.notes.append(f"forced routing skipped: {_first_line(error)}")
        return set()
    num_experts, top_k = block.num_experts, block.top_k
    tokens = max(STEERED_TOKENS, num_experts)
    index_type = block.topk_indices.get_element_type().to_dtype()
    indices, weights = _forced_routing(tokens, num_experts, top_k, rng, index_type)
    shape = token_shape(block.routing_weights.get_partial_shape(), tokens)
    if int(np.prod(shape)) != weights.size:
        proof.notes.append(f"forced routing skipped: routing weights of shape {shape}, not [T, K]")
        return set()
    weights = weights.reshape(shape).astype(block.routing_weights.get_element_type().to_dtype())
    indices = indices.reshape(token_shape(block.topk_indices.get_partial_shape(), tokens))
    rows = rng.standard_normal((tokens, sides.hidden_size)).astype(np.float32)
    case = f"{tokens} tokens with forced routing"
    try:
        want = np.asarray(sides.run_a(sides.feeds(rows, weights, indices))[0])
        got = np.asarray(sides.run_b(sides.feeds(rows, weights, indices))[0])
    except (RuntimeError, ValueError) as error:
        _failed(proof, f"block does not run on {case}: {_first_line(error)}", set(), set())
        return set()
    proof.cases.append(case)
    proof.max_abs_error = max(proof.max_abs_error, _max_abs(want, got))
    reason = _compare(case, want, got, rtol, indices.reshape(tokens, -1))
    if reason:
        _failed(proof, f"outputs differ on {reason}", set(), set())
        return set()
    return set(np.unique(indices).tolist())


def _max_abs(want: np.ndarray, got: np.ndarray) -> float:
    if want.size == 0 or want.size != got.size:
        return 0.0
    diff = np.abs(got.astype(np.float64).reshape(-1) - want.astype(np.float64).reshape(-1))
    return float(np.nanmax(diff)) if np.isfinite(diff).any() else float("inf")


def _failed(proof: Proof, reason: str, routed: set[int], covered: set[int]) -> Proof:
    proof.ok, proof.reason = False, reason
    proof.experts_routed, proof.experts_covered = len(routed), len(covered)
    return proof
