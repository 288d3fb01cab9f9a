"""Operators on the block's graph: the activation, shape constants, splits, an inserted op, Concat order,
Convert types and transposes (a Transpose's perm, or a `batched_mm` MatMul's transposed weight)."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from models.mutants.edits import Change, float_edges, label, pick, replace, set_input_const, weight_constants
from models.mutants.engine_api import is_weight
from models.mutants.operators.batched import weight_gathers
from models.mutants.sites import Site, const_data, key, weight_port


def _activations(site: Site) -> list[tuple[ov.Node, ov.Output]]:
    """(activation op, its input): Swish, or x * Sigmoid(x) as the ONNX frontend spells SiLU."""
    found = [(n, n.input_value(0)) for n in site.of_type("Swish")]
    for node in site.of_type("Multiply"):
        a, b = node.input_values()
        for x, s in ((a, b), (b, a)):
            if s.get_node().get_type_name() == "Sigmoid" and key(s.get_node().input_value(0)) == key(x):
                found.append((node, x))
    return found


def activation(site: Site, rng: np.random.Generator) -> Change | None:
    """One expert's activation (all experts' in stacked forms) replaced: GELU, ReLU, Sigmoid, Swish(beta)."""
    act = pick(rng, _activations(site))
    if act is None:
        return None
    node, x = act
    variant = pick(rng, ["gelu_erf", "gelu_tanh", "relu", "sigmoid", "swish_beta", "swish_op"])
    beta = 1.0
    if node.get_type_name() == "Swish" and node.get_input_size() == 2:
        beta = float(np.asarray(node.input_value(1).get_node().get_data()).reshape(-1)[0])
    if variant == "swish_op" and node.get_type_name() == "Swish" and node.get_input_size() == 1:
        variant = "swish_beta"
    if variant == "gelu_erf":
        new = ops.gelu(x, "erf")
    elif variant == "gelu_tanh":
        new = ops.gelu(x, "tanh")
    elif variant == "relu":
        new = ops.relu(x)
    elif variant == "sigmoid":
        new = ops.sigmoid(x)
    elif variant == "swish_op":  # the same function as one op: x * sigmoid(beta x) -> Swish(x, beta)
        new = ops.swish(x, ops.constant(np.float32(beta))) if beta != 1.0 else ops.swish(x)
    else:
        beta = pick(rng, [b for b in (0.5, 1.702, 2.0) if b != beta])
        new = ops.swish(x, ops.constant(np.float32(beta)))
    node.output(0).replace(new.output(0))
    what = "all experts'" if site.stacked else "one expert's"
    name = {"swish_beta": f"Swish(beta={beta})", "swish_op": "Swish (same function)"}.get(variant, variant)
    if variant == "swish_op":
        expect = "fused"
    elif variant == "swish_beta" and site.stacked:
        expect = "fused" if site.family in ("tiled", "gptoss", "llama4") else ""
    else:
        expect = "declined"
    return Change(f"{what} activation {label(node)} replaced by {name}", expect)


def shape_const(site: Site, rng: np.random.Generator) -> Change | None:
    """A Reshape target, a Slice start/stop/step/axes or a Tile's repeats changed."""
    candidates_ = []
    for node in site.of_type("Reshape", "Slice", "Tile"):
        for i in range(1, node.get_input_size()):
            data = const_data(node.input_value(i))
            if data is not None and data.ndim == 1 and node.input_value(i).get_node().get_type_name() == "Constant":
                candidates_.append((node, i, data))
    chosen = pick(rng, candidates_)
    if chosen is None:
        return None
    node, i, data = chosen
    new = data.copy()
    j = int(rng.integers(new.size))
    if node.get_type_name() == "Slice":
        role = ["data", "start", "stop", "step", "axes"][i]
        if role == "step":
            new[j] = 1 if new[j] != 1 else 2
        elif role == "axes":
            new[j] = new[j] - 1 if new[j] > 0 else new[j] + 1
        else:
            new[j] = new[j] + 1 if abs(int(new[j])) < 2**30 else 1
    elif new.size > 1 and rng.random() < 0.5 and len(set(new.tolist())) > 1:
        a, b = rng.choice(new.size, 2, replace=False)
        while new[a] == new[b]:
            a, b = rng.choice(new.size, 2, replace=False)
        new[[a, b]] = new[[b, a]]
        role = f"entries {a} and {b} swapped"
    else:
        new[j] = 2 * new[j] if new[j] > 1 else (2 if new[j] == 1 else 1)
        role = f"entry {j}"
    if node.get_type_name() == "Slice":
        role = f"{role}[{j}]"
    set_input_const(node, i, new)
    return Change(f"{label(node)} {role}: {data.tolist()} -> {new.tolist()}")


def split(site: Site, rng: np.random.Generator) -> Change | None:
    """A Split/VariadicSplit: its outputs' consumers swapped, its lengths changed, or its axis changed."""
    node = pick(rng, site.of_type("Split", "VariadicSplit"))
    if node is None:
        return None
    variants = ["axis"]
    used = [i for i in range(node.get_output_size()) if node.output(i).get_target_inputs()]
    if len(used) >= 2:
        variants.append("swap")
    if node.get_type_name() == "VariadicSplit" and const_data(node.input_value(2)) is not None:
        variants.append("lengths")
    variant = pick(rng, variants)
    if variant == "swap":
        a, b = (int(v) for v in rng.choice(used, 2, replace=False))
        targets_a, targets_b = list(node.output(a).get_target_inputs()), list(node.output(b).get_target_inputs())
        for t in targets_a:
            t.replace_source_output(node.output(b))
        for t in targets_b:
            t.replace_source_output(node.output(a))
        return Change(f"{label(node)}: consumers of outputs {a} and {b} swapped")
    if variant == "lengths":
        lengths = const_data(node.input_value(2)).astype(np.int64)
        new = lengths[::-1].copy()
        if np.array_equal(new, lengths):
            new = lengths.copy()
            step = max(1, int(abs(new[0])) // 4) if new[0] > 0 else 1
            new[0], new[-1] = new[0] - step, new[-1] + step if new[-1] >= 0 else new[-1]
        set_input_const(node, 2, new)
        return Change(f"{label(node)} lengths {lengths.tolist()} -> {new.tolist()}")
    axis = int(const_data(node.input_value(1)).reshape(-1)[0])
    rank = node.get_input_partial_shape(0).rank.get_length()
    if rank < 2:
        return None
    new_axis = (axis % rank + 1 + int(rng.integers(rank - 1))) % rank
    set_input_const(node, 1, np.array(new_axis))
    return Change(f"{label(node)} axis {axis} -> {new_axis}")


def insert_op(site: Site, rng: np.random.Generator) -> Change | None:
    """An op inserted on one edge inside the block: x1.5, +0.1, Abs, or a lossy f16/i32 Convert round trip."""
    edge = pick(rng, float_edges(site))
    if edge is None:
        return None
    value, target = edge
    variant = pick(rng, ["multiply", "add", "abs", "f16", "i32"])
    if variant == "multiply":
        new = ops.multiply(value, ops.constant(np.float32(1.5)))
    elif variant == "add":
        new = ops.add(value, ops.constant(np.float32(0.1)))
    elif variant == "abs":
        new = ops.abs(value)
    else:
        new = ops.convert(ops.convert(value, variant), "f32")
    target.replace_source_output(new.output(0))
    name = {"multiply": "x 1.5", "add": "+ 0.1", "abs": "Abs", "f16": "Convert f16 -> f32", "i32": "Convert i32 -> f32"}
    source = value.get_node()
    return Change(f"{name[variant]} inserted between {label(source)} and input {target.get_index()} of "
                  f"{label(target.get_node())}")


def concat_order(site: Site, rng: np.random.Generator) -> Change | None:
    """Two inputs of a Concat swapped."""
    node = pick(rng, [c for c in site.of_type("Concat") if c.get_input_size() >= 2])
    if node is None:
        return None
    a, b = (int(v) for v in rng.choice(node.get_input_size(), 2, replace=False))
    va, vb = node.input_value(a), node.input_value(b)
    node.input(a).replace_source_output(vb)
    node.input(b).replace_source_output(va)
    return Change(f"{label(node)}: inputs {a} and {b} swapped")


def convert_type(site: Site, rng: np.random.Generator) -> Change | None:
    """A Convert's destination type changed."""
    node = pick(rng, [c for c in site.of_type("Convert") if not is_weight(c.output(0))])
    if node is None:
        return None
    old = node.get_output_element_type(0)
    choices = [t for t in (ov.Type.i32, ov.Type.i64, ov.Type.f32, ov.Type.f16, ov.Type.boolean) if t != old]
    new_type = pick(rng, choices)
    replace(node, ops.convert(node.input_value(0), new_type))
    return Change(f"{label(node)} destination {old.get_type_name()} -> {new_type.get_type_name()}")


def _flippable(site: Site) -> list[tuple[ov.Node, int, ov.Node]]:
    """`batched_mm`: (MatMul, weight port, Gather) where the stacked weight is one plain Constant (f32, or
    f16 behind a Convert) that can be stored transposed."""
    gathers = {g.get_instance_id(): g for g in weight_gathers(site)}
    found = []
    for matmul in site.weight_matmuls:
        port = weight_port(matmul)
        gather = gathers.get(matmul.input_value(port).get_node().get_instance_id())
        if gather is not None and len(weight_constants(matmul, readable_only=False)) == 1:
            found.append((matmul, port, gather))
    return found


def _transposed_weight(site: Site, rng: np.random.Generator) -> Change | None:
    """`batched_mm`: a gathered weight stored with its last two axes swapped, and either the MatMul's
    transpose flag on that side flipped to match (the same function) or a Transpose+Reshape back to the old
    shape (each expert's weight scrambled)."""
    chosen = pick(rng, _flippable(site))
    if chosen is None:
        return None
    matmul, port, gather = chosen
    (constant,) = weight_constants(matmul, readable_only=False)
    data = np.asarray(constant.get_data())
    stored = ops.constant(np.ascontiguousarray(np.swapaxes(data, -1, -2))).output(0)
    source = gather.input_value(0)
    if source.get_node().get_type_name() == "Convert":  # f16 storage
        stored = ops.convert(stored, source.get_element_type()).output(0)
    if rng.random() < 0.5:
        regathered = ops.gather(stored, gather.input_value(1), gather.input_value(2),
                                int(gather.get_attributes()["batch_dims"]))
        attrs = matmul.get_attributes()
        flags = [bool(attrs["transpose_a"]), bool(attrs["transpose_b"])]
        flags[port] = not flags[port]
        inputs = [matmul.input_value(0), matmul.input_value(1)]
        inputs[port] = regathered.output(0)
        replace(matmul, ops.matmul(*inputs, *flags))
        return Change(f"{label(gather)} reads {label(constant)} stored transposed; {label(matmul)} "
                      f"transpose_{'ab'[port]} -> {flags[port]} (the same function)", "fused")
    rank = len(data.shape)
    perm = [*range(rank - 2), rank - 1, rank - 2]
    shape = ops.constant(np.array(data.shape, dtype=np.int64))
    back = ops.reshape(ops.transpose(source, ops.constant(np.array(perm, dtype=np.int64))), shape, False)
    gather.input(0).replace_source_output(back.output(0))
    return Change(f"{label(gather)} reads {label(constant)} transposed {perm} and reshaped back to "
                  f"{list(data.shape)} (each expert's weight scrambled)")


def transpose_perm(site: Site, rng: np.random.Generator) -> Change | None:
    """A Transpose's permutation changed; in `batched_mm` (no Transpose in the block), a gathered weight's
    layout against its MatMul's transpose flag."""
    found = [t for t in site.of_type("Transpose") if (p := const_data(t.input_value(1))) is not None and p.size >= 2]
    node = pick(rng, found)
    if node is None:
        return _transposed_weight(site, rng)
    perm = const_data(node.input_value(1)).reshape(-1)
    new = perm.copy()
    while np.array_equal(new, perm):
        new = rng.permutation(perm)
    set_input_const(node, 1, new.astype(perm.dtype))
    return Change(f"{label(node)} perm {perm.tolist()} -> {new.tolist()}")
