"""The proof's inputs: hard cases for one block, and the runs they are fed in.

Inputs are chosen to be hard, each case compared on its own rows and scale:
  - 1 random token, run alone (the decode shape);
  - then one batch: 3 tokens [zero row, a row, the same row again] (a zero row ties every router score
    without a bias: both sides must share the router's tie-break; duplicated rows hit one expert twice);
    rows steered to every expert (each expert's router row, a sharper copy, 64 random rows); when the
    block clamps (expert_alpha > 0), rows past the clamp limit several times over; for f16/bf16 hidden
    states, rows at the type's extremes; forced routing: the routing weights and expert indices pass
    through a Select per element, so on these rows every expert runs in every top-k slot even when the
    router never picks it (skipped, with a note, when the block reads its router other than through
    those two values);
  - last, in a run of its own, 8 rows holding a NaN row, a +Inf row, a -Inf row and a row with one NaN
    element between finite rows: NaN/Inf must come out exactly where the original's do
    (moe_fusion.compare), so a replacement that turns a NaN row finite, or spreads it where the original
    does not, is declined. Its routing is not counted as coverage (a router's choice on NaN means nothing).
Each run is cut into pieces that fit in memory when the block holds memory per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov

from moe_fusion import host
from moe_fusion.block import MoEBlock, Weight
from moe_fusion.compressed import Compressed
from moe_fusion.graph import constant_data
from moe_fusion.inputs import token_shape

STEERED_TOKENS = 64
NON_FINITE = "8 tokens with NaN, +Inf, -Inf rows and a row with one NaN element"


# Rows per run when the unfused block holds memory per token (MoEBlock.bytes_per_token): both workers at
# once, each within this share of the memory available, and at most ROWS_MEMORY_MAX (more rows per run save
# little time: a run's cost is its rows' gathers; fewer keep `convert`'s peak near the model's size).
ROWS_MEMORY_SHARE = 0.2
ROWS_MEMORY_MAX = 1 << 30


def _f32(data: np.ndarray | None) -> np.ndarray | None:
    return None if data is None else data.astype(np.float32)


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
                array = _f32(constant_data(node.input_value(i)))
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


@dataclass
class Case:
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


def design(block: MoEBlock, rng: np.random.Generator, h: int, forced: bool) -> tuple[list[Case], bool | None]:
    """The proof's cases for a block with `h` hidden units, and whether its clamp was reached (None: no clamp,
    or its weights cannot be read to tell)."""
    pair = rng.standard_normal((1, h)).astype(np.float32)
    clamp_exercised = None
    steering = _steering_rows(block, h, rng)
    cases = [
        Case("1 token", rng.standard_normal((1, h)).astype(np.float32)),
        Case("3 tokens: zero row, duplicated row", np.concatenate([np.zeros((1, h), np.float32), pair, pair])),
        Case(f"{len(steering)} tokens steered to every expert", steering),
    ]
    if block.expert_alpha > 0:
        rows, clamp_exercised = _clamp_rows(block, rng, h)
        cases.append(Case("16 tokens past the clamp limit", rows))
    out_type = block.output.get_element_type().get_type_name()
    if out_type in ("f16", "bf16"):
        big, tiny = 2.0 ** (8 if out_type == "f16" else 32), 2.0**-14
        rows = rng.standard_normal((8, h)).astype(np.float32) * np.repeat([big, tiny], 4)[:, None]
        cases.append(Case(f"8 tokens at {out_type} extremes", rows))
    if forced:
        tokens = max(STEERED_TOKENS, block.num_experts)
        index_type = block.topk_indices.get_element_type().to_dtype()
        routing = _forced_routing(tokens, block.num_experts, block.top_k, rng, index_type)
        rows = rng.standard_normal((tokens, h)).astype(np.float32)
        cases.append(Case(f"{tokens} tokens with forced routing", rows, routing))
    cases.append(Case(NON_FINITE, _non_finite_rows(rng, h), alone=True))
    return cases, clamp_exercised


def run_feeds(block: MoEBlock, params: list[ov.Node], cases: list[Case], forced: bool, rng) -> list[np.ndarray]:
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
                raise NotTokenRows(f"{value.get_node().get_friendly_name()} has shape {value.get_partial_shape()}")
            feeds += [given.reshape(shape).astype(value.get_element_type().to_dtype()), mask.reshape(shape)]
    for param in params[len(feeds) :]:  # shape-only neighbours: arrays of their own shape for this many tokens
        shape = token_shape(param.get_partial_shape(), tokens)
        feeds.append(rng.standard_normal(shape).astype(param.get_element_type().to_dtype()))
    return feeds


def plan_runs(block: MoEBlock, cases: list[Case]) -> list[list[Case]]:
    """The runs: 1 token alone, every other case in one batch, then each case marked `alone` in a run of
    its own; each in pieces of as many rows as fit when the block takes memory per token (a
    direct-conversion block gathers K experts' f32 weights per token: 151 MB at Qwen3-30B-A3B's shape)."""
    together = [c for c in cases[1:] if not c.alone]
    limit = max([sum(len(c.rows) for c in together), *(len(c.rows) for c in cases)])
    if block.bytes_per_token:
        memory = min(host.available_memory(), 64 << 30)  # "unknown" is no limit there: take 64 GB
        limit = max(1, min(int(memory * ROWS_MEMORY_SHARE), ROWS_MEMORY_MAX) // block.bytes_per_token)
    runs = [cases[:1]]
    for group in [together] + [[c] for c in cases[1:] if c.alone]:
        runs += _pieces(group, limit)
    return [run for run in runs if run]


def _pieces(cases: list[Case], limit: int) -> list[list[Case]]:
    """`cases` cut into runs of at most `limit` rows."""
    pieces, piece, room = [], [], limit
    for case in cases:
        start = 0
        while start < len(case.rows):
            take = min(room, len(case.rows) - start)
            forced = tuple(a[start : start + take] for a in case.forced) if case.forced is not None else None
            piece.append(Case(case.name, case.rows[start : start + take], forced, case.alone))
            start, room = start + take, room - take
            if room == 0:
                pieces.append(piece)
                piece, room = [], limit
    return [*pieces, *([piece] if piece else [])]


class NotTokenRows(ValueError):
    """Forced routing cannot be fed: the routing values are not [T, K] rows."""

