"""Per-block proof: the block cut out of the original as its own model, run beside its replacement.

The cut runs from the experts' input (`block.hidden`) to `block.output`. Values from outside the block
that it reads only through ShapeOf (exporters build shapes from neighbouring tensors) become extra
inputs fed with arrays of the hidden input's shape; any other outside dependency refuses the proof.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion.block import MoEBlock
from moe_fusion.io import core

# Both sides compute in f32 from the same weights and differ in summation order only (GEMMs, the sum
# over K); measured differences are ~1e-6 of the output's scale. 1e-4 leaves room for long reductions
# at real hidden sizes while any wrong expert, weight, lane or routing shows at 1e-1 or more.
RTOL = 1e-4
TOKEN_COUNTS = (1, 3, 64)
MAX_BLOCK_NODES = 200_000
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass
class Proof:
    ok: bool
    reason: str = ""
    max_abs_error: float = 0.0
    experts_covered: int = 0


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


def submodels(block: MoEBlock, fused: ov.Node, replacement: ov.Output) -> tuple[ov.Model, ov.Model]:
    """(original block, fused block) as standalone models with inputs hidden + shape-only values."""
    inside, shape_only = _block_nodes(block)
    inside |= _new_nodes(replacement, inside, _key(block.hidden))
    rewired = []
    params = []
    for value in [block.hidden, *shape_only]:
        param = ops.parameter(value.get_partial_shape(), value.get_element_type())
        params.append(param)
        for target in list(value.get_target_inputs()):
            if target.get_node().get_instance_id() in inside:
                target.replace_source_output(param.output(0))
                rewired.append((target, value))
    try:
        original = ov.Model([block.output, block.topk_indices], params, "block").clone()
        rewritten = ov.Model([replacement], params, "fused_block").clone()
    finally:
        for target, value in rewired:
            target.replace_source_output(value)
    return original, rewritten


def _shape(partial: ov.PartialShape, tokens: int) -> list[int]:
    """Concrete shape for `tokens` tokens: the last dynamic dim gets the tokens, other dynamic dims 1."""
    dims = [d.get_length() if d.is_static else None for d in partial]
    dynamic = [i for i, d in enumerate(dims) if d is None]
    for i in dynamic:
        dims[i] = tokens if i == dynamic[-1] else 1
    return dims


def prove(block: MoEBlock, fused: ov.Node, replacement: ov.Output, seed: int = 0) -> Proof:
    try:
        original, rewritten = submodels(block, fused, replacement)
    except (ValueError, RuntimeError) as error:
        return Proof(False, f"cannot cut the block out for proof: {error}")
    try:
        run_a = core().compile_model(original, "CPU", F32)
        run_b = core().compile_model(rewritten, "CPU", F32)
    except RuntimeError as error:
        return Proof(False, f"cannot compile the block for proof: {str(error).splitlines()[0]}")
    rng = np.random.default_rng(seed)
    worst, covered = 0.0, set()
    hidden_shape = block.hidden.get_partial_shape()
    for tokens in TOKEN_COUNTS:
        shape = _shape(hidden_shape, tokens)
        inputs = []
        for param in original.get_parameters():
            dtype = param.get_element_type().to_dtype()
            inputs.append(rng.standard_normal(shape).astype(dtype))
        try:
            want, chosen = (np.asarray(v) for v in run_a(inputs).values())
            got = np.asarray(run_b(inputs)[0])
        except RuntimeError as error:
            return Proof(False, f"block does not run on {tokens} tokens: {str(error).splitlines()[0]}")
        covered.update(np.unique(chosen).tolist())
        if got.size != want.size:
            return Proof(False, f"replacement has {got.size} values, original {want.size}")
        got, want = got.reshape(-1), want.reshape(-1)
        error = float(np.abs(got - want).max()) if want.size else 0.0
        worst = max(worst, error)
        scale = max(float(np.abs(want).max()) if want.size else 0.0, 1e-6)
        if not np.isfinite(got).all() or error > RTOL * scale:
            return Proof(
                False,
                f"outputs differ on {tokens} tokens: max |diff| {error:.3g} vs scale {scale:.3g}",
                worst,
                len(covered),
            )
    return Proof(True, "", worst, len(covered))
