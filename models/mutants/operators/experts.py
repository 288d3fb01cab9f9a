"""Operators on the experts themselves: drop one, duplicate one, change one's weights, swap gate and up."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from models.mutants.edits import (
    Change,
    down,
    edit_weight,
    is_stacked,
    label,
    pick,
    set_const,
    set_input_const,
    split_after,
    weight_constants,
)
from models.mutants.operators.batched import id_clamps, mask_thresholds, weight_gathers
from models.mutants.sites import SCATTERS, Site, const_data, key


def drop_expert(site: Site, rng: np.random.Generator) -> Change | None:
    """Loop: one expert's index_add skipped (its accumulator passed on). Otherwise: its down weight zeroed;
    `batched_mm` also: masked_fill's `ids >= E` lowered to E-1, so the last expert's rows are filled."""
    if site.family == "per_expert_loop":
        expert = pick(rng, [e for e in site.experts if e.index_add is not None])
        if expert is None:
            return None
        node = expert.index_add
        accumulator = node.input_value(0)
        if node.get_type_name() == "Add":  # ONNX: acc + scatter(zeros, ...)
            accumulator = next(v for v in node.input_values() if v.get_node().get_type_name() not in SCATTERS)
        node.output(0).replace(accumulator)
        return Change(f"expert {expert.id} dropped: {label(node)} bypassed", "declined")
    thresholds = mask_thresholds(site)
    if thresholds and rng.random() < 0.4:
        node, port = pick(rng, thresholds)
        last = site.num_experts - 1
        set_input_const(node, port, np.full_like(const_data(node.input_value(port)), last))
        return Change(f"expert {last} dropped: masked_fill test {label(node)} >= {site.num_experts} -> >= {last}",
                      "declined")
    if site.experts:  # sort-and-slice: expert e's own down MatMul
        expert = pick(rng, site.experts)
        e, matmul = expert.id, down(site, expert.matmuls)
    else:  # stacked: slab e of the one down weight
        e, matmul = int(rng.integers(site.num_experts)), down(site, site.weight_matmuls)
    if matmul is None:
        return None
    text = edit_weight(site, rng, matmul, e, np.zeros_like, "zeroed")
    return Change(f"expert {e}'s contribution removed: down weight {text}", "fused") if text else None


def _remap_gather(site: Site, rng: np.random.Generator, e: int, other: int) -> Change | None:
    """`batched_mm`: one weight Gather reads its ids through a constant map sending e to `other`."""
    gather = pick(rng, weight_gathers(site))
    if gather is None:
        return None
    ids = gather.input_value(1)
    mapping = np.arange(site.num_experts, dtype=ids.get_element_type().to_dtype())
    mapping[e] = other
    gather.input(1).replace_source_output(ops.gather(ops.constant(mapping), ids, np.int64(0)).output(0))
    return Change(f"expert {e} reads expert {other}'s weights in {label(gather)} (ids remapped)")


def duplicate_expert(site: Site, rng: np.random.Generator) -> Change | None:
    """Loop: one expert's mask Gather selects another expert's tokens. Sort-and-slice: one run length read
    from another expert. Stacked: one expert's weights replaced by a copy of another's; `batched_mm` also:
    one weight Gather's ids remapped, or the id Clamp's max lowered so the last expert runs as the one before."""
    count = site.num_experts
    if site.experts:
        expert = pick(rng, [e for e in site.experts if e.id_node is not None])
        if expert is None:
            return None
        other = int((expert.id + 1 + rng.integers(count - 1)) % count)
        data = const_data(expert.id_node.input_value(1))
        set_input_const(expert.id_node, 1, np.full_like(data, other))
        return Change(f"expert {expert.id}'s {label(expert.id_node)} reads expert {other} instead", "declined")
    e, other = (int(v) for v in rng.choice(count, 2, replace=False))
    variant = pick(rng, ["slab", "slab", "gather", "clamp"])
    if variant == "gather" and weight_gathers(site):
        return _remap_gather(site, rng, e, other)
    clamps = id_clamps(site)
    if variant == "clamp" and clamps:
        node = pick(rng, clamps)
        ops_clamp = ops.clamp(node.input_value(0), 0.0, float(count - 2))
        ops_clamp.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(ops_clamp.output(0))
        return Change(f"expert {count - 1} runs as expert {count - 2}: id {label(node)} max {count - 1} -> {count - 2}")
    copied = []
    for matmul in site.weight_matmuls:
        for constant in weight_constants(matmul):
            data = np.array(constant.get_data())
            if is_stacked(site, data):
                data[e] = data[other]
                set_const(constant, data)
                copied.append(label(constant))
    if not copied:
        return None
    return Change(f"expert {e}'s weights replaced by expert {other}'s ({len(copied)} constants)", "fused")


def weights(site: Site, rng: np.random.Generator) -> Change | None:
    """One expert's weight (or its int8/int4 scale) negated, scaled, permuted along an axis or reversed."""
    matmul = pick(rng, site.weight_matmuls)
    if matmul is None:
        return None
    variant = pick(rng, ["negated", "scaled by 1.7", "permuted", "reversed"])
    axis_rng = np.random.default_rng(int(rng.integers(2**31)))

    def fn(a: np.ndarray) -> np.ndarray:
        if variant == "negated":
            return -a
        if variant == "scaled by 1.7":
            return a * np.asarray(1.7, a.dtype)
        axes = [i for i, n in enumerate(a.shape) if n > 1] or [0]
        axis = int(pick(axis_rng, axes))
        if variant == "reversed":
            return np.flip(a, axis)
        return np.take(a, axis_rng.permutation(a.shape[axis]), axis=axis)

    text = edit_weight(site, rng, matmul, None, fn, variant)
    return Change(text, "fused") if text else None


def _swap_halves(site: Site, matmul, split) -> Change | None:
    """Swap the two halves of a gate_up weight along the axis its output is chunked on (every constant
    behind it, so int8 weights and their scales move together)."""
    axis = int(const_data(split.input_value(1)).reshape(-1)[0])
    width = split.get_input_partial_shape(0)[axis]
    if not width.is_static or width.get_length() % 2:
        return None
    n = width.get_length()
    halves = [split.get_output_partial_shape(i)[axis] for i in range(2)]  # lengths may be computed (chunk)
    if any(h != ov.Dimension(n // 2) for h in halves):
        return None
    constants = weight_constants(matmul, readable_only=False)
    if not constants or len(constants) != len(weight_constants(matmul)):
        return None  # a packed int4 constant numpy cannot rewrite: its halves would not move with the scale
    for constant in constants:
        data = np.array(constant.get_data())
        first = 1 if is_stacked(site, data) else 0
        axes = [a for a in range(first, data.ndim) if data.shape[a] == n]
        if len(axes) > 1:
            return None
        if axes:
            data = np.roll(data, n // 2, axis=axes[0])
            set_const(constant, data)
    return Change(f"gate and up halves of {label(matmul)}'s weight swapped (chunked by {label(split)})", "fused")


def swap_gate_up(site: Site, rng: np.random.Generator) -> Change | None:
    """Gate and up weights swapped (one expert; all in stacked forms), a chunked gate_up weight's halves
    swapped, or GPT-OSS's gate/up lanes swapped."""
    pairs = []
    matmuls = site.weight_matmuls
    for i, a in enumerate(matmuls):
        for b in matmuls[i + 1 :]:
            if key(a.input_value(0)) == key(b.input_value(0)) and (
                a.input_value(1).get_partial_shape() == b.input_value(1).get_partial_shape()
            ):
                pairs.append((a, b))
    lanes = [s for s in site.of_type("Slice") if s.get_input_size() > 3 and const_data(s.input_value(3)) is not None
             and list(const_data(s.input_value(3)).reshape(-1)) == [2]]
    if len(lanes) == 2:
        pairs.append(tuple(lanes))
    pairs.extend((m, split) for m in matmuls if (split := split_after(m)) is not None)
    pair = pick(rng, pairs)
    if pair is None:
        return None
    a, b = pair
    if b.get_type_name() in ("Split", "VariadicSplit"):
        return _swap_halves(site, a, b)
    if a.get_type_name() == "Slice":
        start_a, start_b = a.input_value(1), b.input_value(1)
        a.input(1).replace_source_output(start_b)
        b.input(1).replace_source_output(start_a)
        return Change(f"gate/up lanes swapped: starts of {label(a)} and {label(b)} exchanged", "fused")
    wa, wb = a.input_value(1), b.input_value(1)
    a.input(1).replace_source_output(wb)
    b.input(1).replace_source_output(wa)
    return Change(f"weights of {label(a)} and {label(b)} swapped", "fused")
