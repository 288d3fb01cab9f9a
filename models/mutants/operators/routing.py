"""Operators on the routing: normalisation, TopK, the dense routing scatter, the Softmax axis, and the
clamps (GPT-OSS's activation clamps; `batched_mm`'s expert-id Clamp and masked_fill constants)."""

from __future__ import annotations

import numpy as np
import openvino.opset14 as ops

from models.mutants.edits import Change, label, pick, replace, set_input_const
from models.mutants.engine_api import strip
from models.mutants.operators.batched import fill_values, id_clamps, mask_thresholds
from models.mutants.sites import Site, const_data


def renorm(site: Site, rng: np.random.Generator) -> Change | None:
    """The routing normalisation removed: Divide by the top-k sum replaced by its numerator, or the softmax
    over the k selected logits replaced by its input."""
    found = []
    for node in site.of_type("Divide"):
        denominator = strip(node.input_value(1)).get_node()
        if denominator.get_type_name() == "Add":
            denominator = next((strip(v).get_node() for v in denominator.input_values()
                                if strip(v).get_node().get_type_name() == "ReduceSum"), denominator)
        if denominator.get_type_name() == "ReduceSum":
            found.append(node)
    for node in site.of_type("Softmax"):
        source = strip(node.input_value(0)).get_node()
        if source.get_type_name() == "TopK" or (
            source.get_type_name() == "Slice" and strip(source.input_value(0)).get_node().get_type_name() == "TopK"
        ):
            found.append(node)
    node = pick(rng, found)
    if node is None:
        return None
    node.output(0).replace(node.input_value(0))
    return Change(f"routing normalisation {label(node)} removed (replaced by its input)", "fused")


def topk(site: Site, rng: np.random.Generator) -> Change | None:
    """A TopK's k, axis, mode or sort changed."""
    node = pick(rng, site.of_type("TopK"))
    if node is None:
        return None
    attrs = node.get_attributes()
    k = const_data(node.input_value(1))
    variants = ["mode", "sort", "axis"] + (["k"] if k is not None and node.input_value(1).get_node().get_type_name()
                                          == "Constant" else [])
    variant = pick(rng, variants)
    k_value, axis, mode, sort = node.input_value(1), int(attrs["axis"]), attrs["mode"], attrs["sort"]
    rank = node.get_input_partial_shape(0).rank.get_length()
    before = f"k={k.tolist() if k is not None else '?'}, axis={axis}, mode={mode}, sort={sort}"
    if variant == "k":
        old = int(k.reshape(-1)[0])
        new_k = old + 1 if old == 1 or rng.random() < 0.5 else old - 1
        k_value = ops.constant(np.array(new_k, dtype=k.dtype).reshape(k.shape)).output(0)
        after = f"k={new_k}"
    elif variant == "mode":
        mode = "min" if mode == "max" else "max"
        after = f"mode={mode}"
    elif variant == "sort":
        sort = pick(rng, [s for s in ("value", "index", "none") if s != sort])
        after = f"sort={sort}"
    else:
        axis = (axis + 1) % rank if rank > 1 else axis
        after = f"axis={axis}"
    index_type = node.get_output_element_type(1)
    stable = bool(attrs.get("stable"))
    new = ops.topk(node.input_value(0), k_value, axis, mode, sort, index_type.get_type_name(), stable)
    replace(node, new)
    return Change(f"{label(node)} ({before}): {after}")


def scatter_reduction(site: Site, rng: np.random.Generator) -> Change | None:
    """A ScatterElementsUpdate's reduction (index_add_, dense routing, histogram) changed."""
    node = pick(rng, site.of_type("ScatterElementsUpdate"))
    if node is None:
        return None
    attrs = node.get_attributes()
    reduction = pick(rng, [r for r in ("none", "sum", "prod", "min", "max", "mean") if r != attrs["reduction"]])
    use_init = bool(attrs.get("use_init_val", True))
    new = ops.scatter_elements_update(*node.input_values(), reduction=reduction, use_init_val=use_init)
    replace(node, new)
    return Change(f"{label(node)} reduction {attrs['reduction']} -> {reduction}")


def softmax_axis(site: Site, rng: np.random.Generator) -> Change | None:
    """A Softmax's axis changed (over tokens instead of experts / slots)."""
    node = pick(rng, site.of_type("Softmax"))
    if node is None:
        return None
    axis = int(node.get_attributes()["axis"])
    rank = node.get_input_partial_shape(0).rank.get_length()
    new_axis = (axis % rank + 1) % rank
    replace(node, ops.softmax(node.input_value(0), new_axis))
    return Change(f"{label(node)} axis {axis} -> {new_axis}", "fused")


def _gptoss_clamp(site: Site, rng: np.random.Generator, minimum, up) -> Change | None:
    """GPT-OSS: the clamp limits changed on one side only, both consistently, or the up lane's +1 changed."""
    attrs = up.get_attributes()
    limit = float(attrs["max"])
    variant = pick(rng, ["gate", "up_max", "up_min", "both", "offset"])
    new_limit = pick(rng, [limit * 0.5, limit * 2.0, limit + 1.0])
    if variant in ("gate", "both"):
        i = next(i for i, v in enumerate(minimum.input_values()) if v.get_node().get_type_name() == "Constant")
        set_input_const(minimum, i, np.full_like(const_data(minimum.input_value(i)), new_limit))
    if variant in ("up_max", "up_min", "both"):
        low = -new_limit if variant in ("up_min", "both") else float(attrs["min"])
        high = new_limit if variant in ("up_max", "both") else limit
        replace(up, ops.clamp(up.input_value(0), low, high))
    if variant == "offset":
        add = next(iter(up.output(0).get_target_inputs())).get_node()
        if add.get_type_name() != "Add":
            return None
        i = next(i for i, v in enumerate(add.input_values()) if v.get_node().get_type_name() == "Constant")
        set_input_const(add, i, np.full_like(const_data(add.input_value(i)), 0.5))
        return Change(f"up lane offset of {label(add)} 1 -> 0.5", "declined")
    what = {"gate": "gate Minimum only", "up_max": "up Clamp max only", "up_min": "up Clamp min only",
            "both": "gate and up consistently"}[variant]
    return Change(f"clamp limit {limit:g} -> {new_limit:g} on {what}", "fused" if variant == "both" else "declined")


def _batched_clamp(site: Site, rng: np.random.Generator) -> Change | None:
    """`batched_mm`: the id Clamp's bounds, masked_fill's threshold or its fill value changed."""
    count = site.num_experts
    variants = [v for v, there in (("id_min", id_clamps(site)), ("id_max", id_clamps(site)),
                                   ("threshold", mask_thresholds(site)), ("fill", fill_values(site))) if there]
    variant = pick(rng, variants)
    if variant in ("id_min", "id_max"):
        node = pick(rng, id_clamps(site))
        low, high = (1.0, float(count - 1)) if variant == "id_min" else (0.0, float(count))
        new = ops.clamp(node.input_value(0), low, high)
        replace(node, new)
        if variant == "id_min":
            return Change(f"expert 0 runs as expert 1: id {label(node)} min 0 -> 1")
        # ids are top-k indices < E: a wider Clamp changes nothing
        return Change(f"id {label(node)} max {count - 1} -> {count} (no id reaches it)", "fused")
    if variant == "threshold":
        node, port = pick(rng, mask_thresholds(site))
        set_input_const(node, port, np.full_like(const_data(node.input_value(port)), count + 1))
        return Change(f"masked_fill test {label(node)} >= {count} -> >= {count + 1} (never true either)", "fused")
    if variant == "fill":
        node, port = pick(rng, fill_values(site))
        old = float(const_data(node.input_value(port)).reshape(-1)[0])
        set_input_const(node, port, np.full_like(const_data(node.input_value(port)), old + 1.5))
        return Change(f"masked_fill value of {label(node)} {old:g} -> {old + 1.5:g} (its mask is never true)", "fused")
    return None


def clamp(site: Site, rng: np.random.Generator) -> Change | None:
    """GPT-OSS's activation clamps, or `batched_mm`'s id Clamp and masked_fill constants, changed."""
    ids = {n.get_instance_id() for n in id_clamps(site)}
    minimum = site.of_type("Minimum")
    clamps = [c for c in site.of_type("Clamp") if c.get_instance_id() not in ids]
    batched = bool(ids or mask_thresholds(site) or fill_values(site))
    if minimum and clamps and (not batched or rng.random() < 0.5):
        return _gptoss_clamp(site, rng, minimum[0], clamps[0])
    return _batched_clamp(site, rng) if batched else None
