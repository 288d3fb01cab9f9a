"""Mutants of the real-export fixtures: each a fresh read of one fixture with ONE random graph mutation inside
one of its MoE blocks, for fuzzing the fusion (`benchmarks/fuzz.py`, `tests/test_fuzz.py`).

    for mutant in mutants(seed=0, count=200):
        mutant.name, mutant.description, mutant.model      # model is None when OpenVINO rejected the mutation

Where a block is: the blocks `moe_fusion.candidates.candidates` finds on the unmutated fixture, each as the ops
between its experts' input and its output (router included), walked backwards without crossing ShapeOf.
Experts of a per-expert loop are the ops downstream of one expert-id Gather of the one-hot mask up to its
scatter; experts of a sort-and-slice block are the MatMuls at one position of its Concats; stacked forms
(tiled, GPT-OSS, Llama-4) hold expert e in slab e of each weight constant.

Operators (OPERATORS), each with a few variants; `expect` is what a correct fusion should do ("fused",
"declined", or "" when either can be right). It is informational: the verdict is `moe_fusion.check` of
the fused mutant against the mutant itself.

Deterministic: mutant i depends only on (seed, i) and the fixtures. Operators are taken round-robin so a
run of N >= len(OPERATORS) mutants exercises every one; the fixture is drawn at random among those where
the operator finds a site.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops

import moe_fusion
from moe_fusion import catalogue
from moe_fusion.block import MoEBlock
from moe_fusion.candidates import candidates
from moe_fusion.compressed import DECOMPRESSION, is_weight
from moe_fusion.io import first_line
from moe_fusion.pattern import strip

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
FIXTURES = tuple(sorted(p.name for p in FIXTURES_DIR.iterdir() if p.is_dir()))
_NUMPY_TYPES = (ov.Type.f32, ov.Type.f16, ov.Type.i8, ov.Type.u8)
_SCATTERS = ("ScatterElementsUpdate", "ScatterNDUpdate")


@dataclass
class Mutant:
    name: str  # "0007-gen1-mixtral-activation": index, fixture, operator
    fixture: str
    operator: str
    description: str  # what was changed, naming the node
    block: str  # the mutated block's name as the fuse report gives it
    expect: str  # "fused" | "declined" | "" (either may be right)
    model: ov.Model | None  # None: OpenVINO rejected the mutated graph
    rejected: str = ""  # OpenVINO's message when it did

    def __iter__(self):  # name, description, model = mutant
        return iter((self.name, self.description, self.model))


@dataclass
class Expert:
    """One expert of a per-expert block: its id, its ops and its weight MatMuls."""

    id: int
    nodes: list[ov.Node]
    matmuls: list[ov.Node]
    id_node: ov.Node | None = None  # loop: Gather(mask, e); sort-and-slice: Gather(counts, [e])
    index_add: ov.Node | None = None  # loop: the op adding this expert into the accumulator


@dataclass
class Site:
    """One MoE block of the fresh model, where the operators look for something to change."""

    block: MoEBlock
    name: str
    family: str
    nodes: list[ov.Node]  # the block's ops in topological order (router included)
    experts: list[Expert] = field(default_factory=list)  # per-expert forms only

    @property
    def stacked(self) -> bool:
        return not self.experts

    def of_type(self, *types: str) -> list[ov.Node]:
        """The block's ops of these types, leaving out constant subgraphs (weight decompression)."""
        return [n for n in self.nodes if n.get_type_name() in types and not _constant_only(n)]

    @property
    def weight_matmuls(self) -> list[ov.Node]:
        return [n for n in self.of_type("MatMul") if is_weight(n.input_value(1)) and not _is_router(self, n)]


@dataclass
class Change:
    description: str
    expect: str = ""


Operator = Callable[[Site, np.random.Generator], Change | None]


# ---- finding the blocks -------------------------------------------------------------------------------


def _key(value: ov.Output) -> tuple[int, int]:
    return value.get_node().get_instance_id(), value.get_index()


def _block_nodes(model: ov.Model, block: MoEBlock) -> list[ov.Node]:
    hidden = _key(block.hidden)
    seen: set[int] = set()
    stack = [block.output.get_node()]
    while stack and len(seen) < 20_000:
        node = stack.pop()
        if node.get_instance_id() in seen or node.get_type_name() in ("Parameter", "ReadValue", "Result"):
            continue
        seen.add(node.get_instance_id())
        if node.get_type_name() == "ShapeOf":
            continue
        stack.extend(v.get_node() for v in node.input_values() if _key(v) != hidden)
    return [n for n in model.get_ordered_ops() if n.get_instance_id() in seen]


def _const_data(value: ov.Output) -> np.ndarray | None:
    node = strip(value).get_node()
    return np.asarray(node.get_data()) if node.get_type_name() == "Constant" else None


def _constant_only(node: ov.Node, depth: int = 8) -> bool:
    """An op computed from Constants only (a weight's decompression, a folded shape)."""
    if node.get_type_name() == "Constant":
        return True
    inputs = node.input_values()  # a Parameter or ReadValue has none and is not constant
    return depth > 0 and bool(inputs) and all(_constant_only(v.get_node(), depth - 1) for v in inputs)


def _is_router(site: Site, matmul: ov.Node) -> bool:
    """The router's linear layer: its output is E wide."""
    width = matmul.get_output_partial_shape(0)[-1]
    return width.is_static and width.get_length() == site.block.num_experts and site.block.num_experts != 1


def _forward(start: ov.Node, inside: set[int]) -> list[ov.Node]:
    """Ops downstream of `start` inside the block, up to (and including) the first scatter on each path."""
    seen, stack, out = set(), [start], []
    while stack:
        node = stack.pop()
        if node.get_instance_id() in seen or node.get_instance_id() not in inside:
            continue
        seen.add(node.get_instance_id())
        out.append(node)
        if node.get_type_name() in _SCATTERS:
            continue
        for output in node.outputs():
            stack.extend(t.get_node() for t in output.get_target_inputs())
    return out


def _loop_experts(site: Site) -> list[Expert]:
    inside = {n.get_instance_id() for n in site.nodes}
    experts = []
    for gather in site.of_type("Gather"):
        data = strip(gather.input_value(0)).get_node()
        index = _const_data(gather.input_value(1))
        if data.get_type_name() != "Transpose" or strip(data.input_value(0)).get_node().get_type_name() != "OneHot":
            continue
        if index is None or index.size != 1:
            continue
        nodes = _forward(gather, inside)
        for node in list(nodes):  # and the weights they read
            nodes.extend(v.get_node() for v in node.input_values() if v.get_node().get_type_name() == "Constant")
        matmuls = [n for n in nodes if n.get_type_name() == "MatMul" and is_weight(n.input_value(1))]
        scatter = next((n for n in nodes if n.get_type_name() in _SCATTERS), None)
        index_add = scatter
        into = strip(scatter.input_value(0)).get_node().get_type_name() if scatter is not None else ""
        if into in ("Broadcast", "Constant"):
            adds = [t.get_node() for t in scatter.output(0).get_target_inputs()]
            adds = [a for a in adds if a.get_type_name() == "Add"]
            index_add = adds[0] if adds else scatter  # ONNX: acc + scatter(zeros, ...)
        experts.append(Expert(int(index.reshape(-1)[0]), nodes, matmuls, gather, index_add))
    return experts


def _sliced_experts(site: Site) -> list[Expert]:
    """Sort-and-slice: position e of each Concat of weight MatMuls, and its run-length Gather(counts, [e])."""
    concats = [
        c
        for c in site.of_type("Concat")
        if all(v.get_node().get_type_name() == "MatMul" and is_weight(v.get_node().input_value(1))
               for v in c.input_values())
    ]
    if not concats:
        return []
    counts = {}
    for gather in site.of_type("Gather"):
        index = _const_data(gather.input_value(1))
        if strip(gather.input_value(0)).get_node().get_type_name() == "ReduceSum" and index is not None:
            counts.setdefault(int(index.reshape(-1)[0]), gather)
    experts = []
    for e in range(min(c.get_input_size() for c in concats)):
        matmuls = [c.input_value(e).get_node() for c in concats]
        experts.append(Expert(e, matmuls, matmuls, counts.get(e)))
    return experts


def sites(model: ov.Model) -> list[Site]:
    """The MoE blocks of a fresh (unmutated) model."""
    blocks, _misses = candidates(model, catalogue.load())
    found = []
    for block in sorted(blocks, key=lambda b: b.name):
        site = Site(block, block.name, block.family, _block_nodes(model, block))
        if block.family == "per_expert_loop":
            site.experts = _loop_experts(site)
        elif block.family == "sort_and_slice":
            site.experts = _sliced_experts(site)
        found.append(site)
    return found


# ---- editing helpers ----------------------------------------------------------------------------------


def _label(node: ov.Node) -> str:
    return f"{node.get_type_name()} '{node.get_friendly_name()}'"


def _replace(old: ov.Node, new: ov.Node) -> None:
    new.set_friendly_name(old.get_friendly_name())
    for i in range(old.get_output_size()):
        old.output(i).replace(new.output(i))


def _array(array: np.ndarray, like: ov.Output) -> np.ndarray:
    """`array` in `like`'s element type, C-contiguous, in `like`'s shape when it has as many elements
    (np.ascontiguousarray would turn a scalar into a 1-element vector)."""
    array = np.array(array, dtype=like.get_element_type().to_dtype(), order="C")
    shape = list(like.get_shape())
    return array.reshape(shape) if array.size == int(np.prod(shape)) else array


def _set_const(node: ov.Node, array: np.ndarray) -> None:
    """Replace Constant `node` by one holding `array` in the same element type and shape."""
    _replace(node, ops.constant(_array(array, node.output(0))))


def _set_input_const(node: ov.Node, index: int, array: np.ndarray) -> None:
    """Feed input `index` of `node` from a new Constant (leaves the old one to its other consumers)."""
    new = ops.constant(_array(array, node.input_value(index)))
    node.input(index).replace_source_output(new.output(0))


def _pick(rng: np.random.Generator, items: list):
    return items[int(rng.integers(len(items)))] if items else None


def _weight_constants(matmul: ov.Node) -> list[ov.Node]:
    """The Constants a weight MatMul's weight is decompressed from, numpy-readable ones only, largest first."""
    found, stack, seen = [], [matmul.input_value(1).get_node()], set()
    while stack:
        node = stack.pop()
        if node.get_instance_id() in seen:
            continue
        seen.add(node.get_instance_id())
        if node.get_type_name() == "Constant":
            if node.get_element_type() in _NUMPY_TYPES and node.get_output_shape(0):
                found.append(node)
        elif node.get_type_name() in DECOMPRESSION:
            stack.extend(v.get_node() for v in node.input_values())
    return sorted(found, key=lambda n: -int(np.prod(list(n.get_output_shape(0)))))


def _float_weight(matmul: ov.Node) -> ov.Node | None:
    """The float Constant behind a weight: the weight itself (f32/f16 storage) or its scale (int8/int4)."""
    floats = [c for c in _weight_constants(matmul) if c.get_element_type() in (ov.Type.f32, ov.Type.f16)]
    return floats[0] if floats else None


def _stacked(matmul: ov.Node) -> bool:
    return matmul.input_value(1).get_partial_shape().rank.get_length() == 3


def _experts_count(site: Site) -> int:
    return site.block.num_experts


def _edit_weight(
    site: Site, rng: np.random.Generator, matmul: ov.Node, expert: int | None, fn, what: str
) -> str | None:
    """Apply `fn` to one expert's part of `matmul`'s float weight (slab `expert` when stacked)."""
    constant = _float_weight(matmul)
    if constant is None:
        return None
    data = np.array(constant.get_data())
    if _stacked(matmul) and data.ndim >= 3 and data.shape[0] == _experts_count(site):
        e = int(rng.integers(data.shape[0])) if expert is None else expert
        data[e] = fn(data[e])
        where = f"expert {e}'s slab of {_label(constant)}"
    else:
        data = fn(data)
        where = _label(constant)
    _set_const(constant, data)
    return f"{what} in {where} (weight of {_label(matmul)})"


def _down(site: Site, matmuls: list[ov.Node]) -> ov.Node | None:
    """The down projection among `matmuls`: the one whose output is H wide."""
    hidden = site.block.hidden_size
    found = [m for m in matmuls if m.get_output_partial_shape(0)[-1] == ov.Dimension(hidden)]
    return found[0] if found else None


def _float_edges(site: Site) -> list[tuple[ov.Output, ov.Input]]:
    """(value, consumer input) pairs inside the block carrying f32 data (not into ShapeOf)."""
    inside = {n.get_instance_id() for n in site.nodes}
    edges = []
    for node in site.nodes:
        if node.get_type_name() in ("ShapeOf", "Constant"):
            continue
        for i, value in enumerate(node.input_values()):
            source = value.get_node()
            if value.get_element_type() != ov.Type.f32 or source.get_type_name() == "Constant":
                continue
            if source.get_instance_id() in inside or _key(value) == _key(site.block.hidden):
                edges.append((value, node.input(i)))
    return edges


# ---- operators ----------------------------------------------------------------------------------------


def _activations(site: Site) -> list[tuple[ov.Node, ov.Output]]:
    """(activation op, its input): Swish, or x * Sigmoid(x) as the ONNX frontend spells SiLU."""
    found = [(n, n.input_value(0)) for n in site.of_type("Swish")]
    for node in site.of_type("Multiply"):
        a, b = node.input_values()
        for x, s in ((a, b), (b, a)):
            if s.get_node().get_type_name() == "Sigmoid" and _key(s.get_node().input_value(0)) == _key(x):
                found.append((node, x))
    return found


def activation(site: Site, rng: np.random.Generator) -> Change | None:
    """One expert's activation (all experts' in stacked forms) replaced: GELU, ReLU, Sigmoid, Swish(beta)."""
    act = _pick(rng, _activations(site))
    if act is None:
        return None
    node, x = act
    variant = _pick(rng, ["gelu_erf", "gelu_tanh", "relu", "sigmoid", "swish_beta", "swish_op"])
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
        beta = _pick(rng, [b for b in (0.5, 1.702, 2.0) if b != beta])
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
    return Change(f"{what} activation {_label(node)} replaced by {name}", expect)


def drop_expert(site: Site, rng: np.random.Generator) -> Change | None:
    """Loop: one expert's index_add skipped (its accumulator passed on). Otherwise: its down weight zeroed."""
    if site.family == "per_expert_loop":
        expert = _pick(rng, [e for e in site.experts if e.index_add is not None])
        if expert is None:
            return None
        node = expert.index_add
        accumulator = node.input_value(0)
        if node.get_type_name() == "Add":  # ONNX: acc + scatter(zeros, ...)
            accumulator = next(v for v in node.input_values() if v.get_node().get_type_name() not in _SCATTERS)
        node.output(0).replace(accumulator)
        return Change(f"expert {expert.id} dropped: {_label(node)} bypassed", "declined")
    if site.experts:  # sort-and-slice: expert e's own down MatMul
        expert = _pick(rng, site.experts)
        e, down = expert.id, _down(site, expert.matmuls)
    else:  # stacked: slab e of the one down weight
        e, down = int(rng.integers(_experts_count(site))), _down(site, site.weight_matmuls)
    if down is None:
        return None
    text = _edit_weight(site, rng, down, e, np.zeros_like, "zeroed")
    return Change(f"expert {e}'s contribution removed: down weight {text}", "fused") if text else None


def duplicate_expert(site: Site, rng: np.random.Generator) -> Change | None:
    """Loop: one expert's mask Gather selects another expert's tokens. Sort-and-slice: one run length read
    from another expert. Stacked: one expert's weights replaced by a copy of another's."""
    count = _experts_count(site)
    if site.experts:
        expert = _pick(rng, [e for e in site.experts if e.id_node is not None])
        if expert is None:
            return None
        other = int((expert.id + 1 + rng.integers(count - 1)) % count)
        data = _const_data(expert.id_node.input_value(1))
        _set_input_const(expert.id_node, 1, np.full_like(data, other))
        return Change(f"expert {expert.id}'s {_label(expert.id_node)} reads expert {other} instead", "declined")
    e, other = (int(v) for v in rng.choice(count, 2, replace=False))
    copied = []
    for matmul in site.weight_matmuls:
        for constant in _weight_constants(matmul):
            data = np.array(constant.get_data())
            if data.ndim >= 3 and data.shape[0] == count:
                data[e] = data[other]
                _set_const(constant, data)
                copied.append(_label(constant))
    if not copied:
        return None
    return Change(f"expert {e}'s weights replaced by expert {other}'s ({len(copied)} constants)", "fused")


def weights(site: Site, rng: np.random.Generator) -> Change | None:
    """One expert's weight (or its int8/int4 scale) negated, scaled, permuted along an axis or reversed."""
    matmul = _pick(rng, site.weight_matmuls)
    if matmul is None:
        return None
    variant = _pick(rng, ["negated", "scaled by 1.7", "permuted", "reversed"])
    axis_rng = np.random.default_rng(int(rng.integers(2**31)))

    def fn(a: np.ndarray) -> np.ndarray:
        if variant == "negated":
            return -a
        if variant == "scaled by 1.7":
            return a * np.asarray(1.7, a.dtype)
        axes = [i for i, n in enumerate(a.shape) if n > 1] or [0]
        axis = int(_pick(axis_rng, axes))
        if variant == "reversed":
            return np.flip(a, axis)
        return np.take(a, axis_rng.permutation(a.shape[axis]), axis=axis)

    text = _edit_weight(site, rng, matmul, None, fn, variant)
    return Change(text, "fused") if text else None


def shape_const(site: Site, rng: np.random.Generator) -> Change | None:
    """A Reshape target, a Slice start/stop/step/axes or a Tile's repeats changed."""
    candidates_ = []
    for node in site.of_type("Reshape", "Slice", "Tile"):
        for i in range(1, node.get_input_size()):
            data = _const_data(node.input_value(i))
            if data is not None and data.ndim == 1 and node.input_value(i).get_node().get_type_name() == "Constant":
                candidates_.append((node, i, data))
    chosen = _pick(rng, candidates_)
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
    _set_input_const(node, i, new)
    return Change(f"{_label(node)} {role}: {data.tolist()} -> {new.tolist()}")


def split(site: Site, rng: np.random.Generator) -> Change | None:
    """A Split/VariadicSplit: its outputs' consumers swapped, its lengths changed, or its axis changed."""
    node = _pick(rng, site.of_type("Split", "VariadicSplit"))
    if node is None:
        return None
    variants = ["axis"]
    used = [i for i in range(node.get_output_size()) if node.output(i).get_target_inputs()]
    if len(used) >= 2:
        variants.append("swap")
    if node.get_type_name() == "VariadicSplit" and _const_data(node.input_value(2)) is not None:
        variants.append("lengths")
    variant = _pick(rng, variants)
    if variant == "swap":
        a, b = (int(v) for v in rng.choice(used, 2, replace=False))
        targets_a, targets_b = list(node.output(a).get_target_inputs()), list(node.output(b).get_target_inputs())
        for t in targets_a:
            t.replace_source_output(node.output(b))
        for t in targets_b:
            t.replace_source_output(node.output(a))
        return Change(f"{_label(node)}: consumers of outputs {a} and {b} swapped")
    if variant == "lengths":
        lengths = _const_data(node.input_value(2)).astype(np.int64)
        new = lengths[::-1].copy()
        if np.array_equal(new, lengths):
            new = lengths.copy()
            step = max(1, int(abs(new[0])) // 4) if new[0] > 0 else 1
            new[0], new[-1] = new[0] - step, new[-1] + step if new[-1] >= 0 else new[-1]
        _set_input_const(node, 2, new)
        return Change(f"{_label(node)} lengths {lengths.tolist()} -> {new.tolist()}")
    axis = int(_const_data(node.input_value(1)).reshape(-1)[0])
    rank = node.get_input_partial_shape(0).rank.get_length()
    if rank < 2:
        return None
    new_axis = (axis % rank + 1 + int(rng.integers(rank - 1))) % rank
    _set_input_const(node, 1, np.array(new_axis))
    return Change(f"{_label(node)} axis {axis} -> {new_axis}")


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
    node = _pick(rng, found)
    if node is None:
        return None
    node.output(0).replace(node.input_value(0))
    return Change(f"routing normalisation {_label(node)} removed (replaced by its input)", "fused")


def insert_op(site: Site, rng: np.random.Generator) -> Change | None:
    """An op inserted on one edge inside the block: x1.5, +0.1, Abs, or a lossy f16/i32 Convert round trip."""
    edge = _pick(rng, _float_edges(site))
    if edge is None:
        return None
    value, target = edge
    variant = _pick(rng, ["multiply", "add", "abs", "f16", "i32"])
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
    return Change(f"{name[variant]} inserted between {_label(source)} and input {target.get_index()} of "
                  f"{_label(target.get_node())}")


def topk(site: Site, rng: np.random.Generator) -> Change | None:
    """A TopK's k, axis, mode or sort changed."""
    node = _pick(rng, site.of_type("TopK"))
    if node is None:
        return None
    attrs = node.get_attributes()
    k = _const_data(node.input_value(1))
    variants = ["mode", "sort", "axis"] + (["k"] if k is not None and node.input_value(1).get_node().get_type_name()
                                          == "Constant" else [])
    variant = _pick(rng, variants)
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
        sort = _pick(rng, [s for s in ("value", "index", "none") if s != sort])
        after = f"sort={sort}"
    else:
        axis = (axis + 1) % rank if rank > 1 else axis
        after = f"axis={axis}"
    index_type = node.get_output_element_type(1)
    stable = bool(attrs.get("stable"))
    new = ops.topk(node.input_value(0), k_value, axis, mode, sort, index_type.get_type_name(), stable)
    _replace(node, new)
    return Change(f"{_label(node)} ({before}): {after}")


def scatter_reduction(site: Site, rng: np.random.Generator) -> Change | None:
    """A ScatterElementsUpdate's reduction (index_add_, dense routing, histogram) changed."""
    node = _pick(rng, site.of_type("ScatterElementsUpdate"))
    if node is None:
        return None
    attrs = node.get_attributes()
    reduction = _pick(rng, [r for r in ("none", "sum", "prod", "min", "max", "mean") if r != attrs["reduction"]])
    use_init = bool(attrs.get("use_init_val", True))
    new = ops.scatter_elements_update(*node.input_values(), reduction=reduction, use_init_val=use_init)
    _replace(node, new)
    return Change(f"{_label(node)} reduction {attrs['reduction']} -> {reduction}")


def softmax_axis(site: Site, rng: np.random.Generator) -> Change | None:
    """A Softmax's axis changed (over tokens instead of experts / slots)."""
    node = _pick(rng, site.of_type("Softmax"))
    if node is None:
        return None
    axis = int(node.get_attributes()["axis"])
    rank = node.get_input_partial_shape(0).rank.get_length()
    new_axis = (axis % rank + 1) % rank
    _replace(node, ops.softmax(node.input_value(0), new_axis))
    return Change(f"{_label(node)} axis {axis} -> {new_axis}", "fused")


def concat_order(site: Site, rng: np.random.Generator) -> Change | None:
    """Two inputs of a Concat swapped."""
    node = _pick(rng, [c for c in site.of_type("Concat") if c.get_input_size() >= 2])
    if node is None:
        return None
    a, b = (int(v) for v in rng.choice(node.get_input_size(), 2, replace=False))
    va, vb = node.input_value(a), node.input_value(b)
    node.input(a).replace_source_output(vb)
    node.input(b).replace_source_output(va)
    return Change(f"{_label(node)}: inputs {a} and {b} swapped")


def swap_gate_up(site: Site, rng: np.random.Generator) -> Change | None:
    """Gate and up weights swapped (one expert; all in stacked forms), or GPT-OSS's gate/up lanes swapped."""
    pairs = []
    matmuls = site.weight_matmuls
    for i, a in enumerate(matmuls):
        for b in matmuls[i + 1 :]:
            if _key(a.input_value(0)) == _key(b.input_value(0)) and (
                a.input_value(1).get_partial_shape() == b.input_value(1).get_partial_shape()
            ):
                pairs.append((a, b))
    lanes = [s for s in site.of_type("Slice") if s.get_input_size() > 3 and _const_data(s.input_value(3)) is not None
             and list(_const_data(s.input_value(3)).reshape(-1)) == [2]]
    if len(lanes) == 2:
        pairs.append(tuple(lanes))
    pair = _pick(rng, pairs)
    if pair is None:
        return None
    a, b = pair
    if a.get_type_name() == "Slice":
        start_a, start_b = a.input_value(1), b.input_value(1)
        a.input(1).replace_source_output(start_b)
        b.input(1).replace_source_output(start_a)
        return Change(f"gate/up lanes swapped: starts of {_label(a)} and {_label(b)} exchanged", "fused")
    wa, wb = a.input_value(1), b.input_value(1)
    a.input(1).replace_source_output(wb)
    b.input(1).replace_source_output(wa)
    return Change(f"weights of {_label(a)} and {_label(b)} swapped", "fused")


def clamp(site: Site, rng: np.random.Generator) -> Change | None:
    """GPT-OSS: the clamp limits changed on one side only, both consistently, or the up lane's +1 changed."""
    minimum, clamps = site.of_type("Minimum"), site.of_type("Clamp")
    if not minimum or not clamps:
        return None
    minimum, up = minimum[0], clamps[0]
    attrs = up.get_attributes()
    limit = float(attrs["max"])
    variant = _pick(rng, ["gate", "up_max", "up_min", "both", "offset"])
    new_limit = _pick(rng, [limit * 0.5, limit * 2.0, limit + 1.0])
    if variant in ("gate", "both"):
        i = next(i for i, v in enumerate(minimum.input_values()) if v.get_node().get_type_name() == "Constant")
        _set_input_const(minimum, i, np.full_like(_const_data(minimum.input_value(i)), new_limit))
    if variant in ("up_max", "up_min", "both"):
        low = -new_limit if variant in ("up_min", "both") else float(attrs["min"])
        high = new_limit if variant in ("up_max", "both") else limit
        _replace(up, ops.clamp(up.input_value(0), low, high))
    if variant == "offset":
        add = next(iter(up.output(0).get_target_inputs())).get_node()
        if add.get_type_name() != "Add":
            return None
        i = next(i for i, v in enumerate(add.input_values()) if v.get_node().get_type_name() == "Constant")
        _set_input_const(add, i, np.full_like(_const_data(add.input_value(i)), 0.5))
        return Change(f"up lane offset of {_label(add)} 1 -> 0.5", "declined")
    what = {"gate": "gate Minimum only", "up_max": "up Clamp max only", "up_min": "up Clamp min only",
            "both": "gate and up consistently"}[variant]
    return Change(f"clamp limit {limit:g} -> {new_limit:g} on {what}", "fused" if variant == "both" else "declined")


def convert_type(site: Site, rng: np.random.Generator) -> Change | None:
    """A Convert's destination type changed."""
    node = _pick(rng, [c for c in site.of_type("Convert") if not is_weight(c.output(0))])
    if node is None:
        return None
    old = node.get_output_element_type(0)
    choices = [t for t in (ov.Type.i32, ov.Type.i64, ov.Type.f32, ov.Type.f16, ov.Type.boolean) if t != old]
    new_type = _pick(rng, choices)
    _replace(node, ops.convert(node.input_value(0), new_type))
    return Change(f"{_label(node)} destination {old.get_type_name()} -> {new_type.get_type_name()}")


def transpose_perm(site: Site, rng: np.random.Generator) -> Change | None:
    """A Transpose's permutation changed."""
    found = [t for t in site.of_type("Transpose") if (p := _const_data(t.input_value(1))) is not None and p.size >= 2]
    node = _pick(rng, found)
    if node is None:
        return None
    perm = _const_data(node.input_value(1)).reshape(-1)
    new = perm.copy()
    while np.array_equal(new, perm):
        new = rng.permutation(perm)
    _set_input_const(node, 1, new.astype(perm.dtype))
    return Change(f"{_label(node)} perm {perm.tolist()} -> {new.tolist()}")


OPERATORS: dict[str, Operator] = {
    "activation": activation,
    "drop_expert": drop_expert,
    "duplicate_expert": duplicate_expert,
    "weights": weights,
    "shape_const": shape_const,
    "split": split,
    "renorm": renorm,
    "insert_op": insert_op,
    "topk": topk,
    "scatter_reduction": scatter_reduction,
    "softmax_axis": softmax_axis,
    "concat_order": concat_order,
    "swap_gate_up": swap_gate_up,
    "clamp": clamp,
    "convert_type": convert_type,
    "transpose_perm": transpose_perm,
}


# ---- the generator ------------------------------------------------------------------------------------


def fixture_path(name: str) -> Path:
    folder = FIXTURES_DIR / name
    xml = folder / "openvino_model.xml"
    return xml if xml.is_file() else folder / "model.onnx"


def mutate(fixture: str, operator: str, rng: np.random.Generator) -> tuple[ov.Model, Site, Change] | None:
    """A fresh read of `fixture` with one mutation by `operator` in one of its blocks; None if no site."""
    model = moe_fusion.read_model(fixture_path(fixture))
    found = sites(model)
    for site in (found[i] for i in rng.permutation(len(found))):
        change = OPERATORS[operator](site, rng)
        if change is not None:
            return model, site, change
    return None


_BARREN: set[tuple[str, str]] = set()  # (fixture, operator) pairs where the operator finds no site


def mutant(
    seed: int, index: int, fixtures: Iterable[str] | None = None, operators: Iterable[str] | None = None
) -> Mutant:
    """Mutant `index` of the run `seed`: operator `index` round-robin, fixture drawn among those where it
    applies. Depends on (seed, index, fixtures, operators) only. OpenVINO's rejection (validation) is
    recorded in `rejected` with `model=None`."""
    fixtures = list(fixtures or FIXTURES)
    names = list(operators or OPERATORS)
    unknown = sorted(set(names) - set(OPERATORS))
    if unknown:
        raise ValueError(f"unknown mutation operators {unknown}; known: {', '.join(OPERATORS)}")
    operator = names[(index + seed) % len(names)]
    order = np.random.default_rng([seed, index]).permutation(len(fixtures))
    for attempt, fixture in enumerate(fixtures[j] for j in order):
        if (fixture, operator) in _BARREN:
            continue
        made = mutate(fixture, operator, np.random.default_rng([seed, index, attempt]))
        if made is None:
            _BARREN.add((fixture, operator))
            continue
        model, site, change = made
        found = Mutant(f"{index:04d}-{fixture}-{operator}", fixture, operator, change.description, site.name,
                       change.expect, model)
        try:
            model.validate_nodes_and_infer_types()
        except (RuntimeError, ValueError) as error:
            found = dataclasses.replace(found, model=None, rejected=first_line(error))
        return found
    raise ValueError(f"operator {operator} finds nothing to change in {', '.join(fixtures)}")


def mutants(
    seed: int = 0,
    count: int = 200,
    fixtures: Iterable[str] | None = None,
    operators: Iterable[str] | None = None,
    start: int = 0,
) -> Iterator[Mutant]:
    """Mutants `start` .. `start + count - 1` of the run `seed` (see `mutant`): every operator once per
    len(OPERATORS) mutants. A run split into ranges gives the same mutants as one run."""
    fixtures, operators = list(fixtures or FIXTURES), list(operators or OPERATORS)
    for index in range(start, start + count):
        yield mutant(seed, index, fixtures, operators)


# ---- the oracle ---------------------------------------------------------------------------------------

OUTCOMES = ("fused", "declined", "unreported", "rejected", "crashed", "WRONG")


def _same_block(row: str, block: str) -> bool:
    """A report row about `block`: the same module, or one inside the other (a decline is named after its
    router and the node where matching stopped, e.g. `...layers.1.mlp.gate` for block `...layers.1.mlp`)."""
    if row == block:
        return True
    inner, outer = (row, block) if len(row) > len(block) else (block, row)
    return bool(outer) and inner.startswith(outer) and inner[len(outer)] in "./"


@dataclass
class Verdict:
    """What became of one mutant.

    outcome: "fused" (the mutated block fused, and `check` of the fused model against the mutant passed),
    "declined" (the mutated block was left as ops with a reason; anything else fused passed `check`),
    "unreported" (the mutated block was left as ops, but the report has no row for it: not a wrong fusion,
    yet the user is not told where fusion stopped),
    "rejected" (OpenVINO rejected the mutated graph, or cannot compile or run it: nothing to compare),
    "crashed" (the process judging it died, twice: a native crash in OpenVINO outside the proof's own
    worker processes, e.g. in `check`; not judged, counted and listed),
    "WRONG" (a fused model that `check` finds not equivalent, a skipped block without a reason, or a crash)."""

    mutant: Mutant
    outcome: str
    detail: str  # the decline reason, OpenVINO's message, or what is wrong
    blocks_fused: int = 0
    seconds: float = 0.0

    @property
    def missed(self) -> bool:
        """Declined although a correct fusion was expected (informational, not wrong)."""
        return self.outcome == "declined" and self.mutant.expect == "fused"


REFERENCE_RTOL = 1e-2  # reference kernels and CPU differ by up to ~5e-4 of the scale on int8 weights


def _against_reference(mutant: Mutant, tokens: int = 16) -> str:
    """The mutated block cut out and run by OpenVINO's reference implementation (`Model.evaluate`, no plugin
    transformations) beside its FusedExperts on CPU: '' when they agree, else why not. Independent of the
    CPU plugin, which compiles some mutants as if unmutated (it ignores a tiled block's Tile repeats).
    Off by default: `Model.evaluate` crashes the process (SIGSEGV) on some mutants that the CPU runs."""
    from moe_fusion.inputs import token_shape
    from moe_fusion.proof import cut
    from moe_fusion.rewrite import build

    model = mutant.model.clone()
    blocks, _ = candidates(model, catalogue.load())
    block = next((b for b in blocks if _same_block(b.name, mutant.block)), None)
    if block is None:
        return ""
    try:
        _fused, replacement = build(block)
        sides = cut(block, replacement, forced=False)
        original, rewritten = sides.original, sides.replacement
    except (ValueError, RuntimeError):
        return ""
    rng = np.random.default_rng(0)
    feeds = [
        rng.standard_normal(token_shape(p.get_partial_shape(), tokens)).astype(p.get_element_type().to_dtype())
        for p in original.get_parameters()
    ]
    outputs = ov.TensorVector([ov.Tensor(o.get_element_type(), ov.Shape([0])) for o in original.outputs])
    if not original.evaluate(outputs, ov.TensorVector([ov.Tensor(f) for f in feeds])):
        return ""
    want = np.asarray(outputs[0].data, np.float64).reshape(-1)
    from moe_fusion.runtime import F32

    compiled = moe_fusion.core().compile_model(rewritten, "CPU", F32)
    got = np.asarray(compiled(feeds[: len(rewritten.get_parameters())])[0], np.float64).reshape(-1)
    finite = np.isfinite(want)
    scale = float(np.abs(want[finite]).max()) if finite.any() else 0.0
    error = float(np.abs(got[finite] - want[finite]).max()) if finite.any() else 0.0
    if got.size != want.size or error > REFERENCE_RTOL * max(scale, 1e-6):
        return (f"fused block differs from the mutant's reference evaluation (Model.evaluate): max |diff| "
                f"{error:.3g} vs scale {scale:.3g} on {tokens} tokens")
    return ""


def judge(mutant: Mutant, tokens: Iterable[int] = (1, 16), steps: int = 1, reference: bool = False) -> Verdict:
    """Fuse a copy of the mutant; every fused block must leave the model equivalent to the mutant itself
    (`moe_fusion.check`), every skipped block must carry a reason."""
    import time
    import traceback

    from moe_fusion.io import InputError

    start = time.perf_counter()

    def verdict(outcome: str, detail: str, fused: int = 0) -> Verdict:
        # the verdict keeps the mutant's description, not its model: a run holds hundreds of verdicts
        return Verdict(dataclasses.replace(mutant, model=None), outcome, detail, fused, time.perf_counter() - start)

    if mutant.model is None:
        return verdict("rejected", f"invalid graph: {mutant.rejected}")
    fused = mutant.model.clone()
    try:
        report = moe_fusion.fuse(fused)
    except Exception:  # a crash of the fusion is a failure, whatever the input
        return verdict("WRONG", "fuse crashed: " + traceback.format_exc(limit=-3).strip().replace("\n", " | "))
    silent = [b.name for b in report.blocks if b.status == "skipped" and not b.reason.strip()]
    if silent:
        return verdict("WRONG", f"blocks skipped without a reason: {silent}", len(report.fused))
    ops_left = sum(n.get_type_name() == "FusedExperts" for n in fused.get_ordered_ops())
    if ops_left != len(report.fused):
        return verdict("WRONG", f"report says {len(report.fused)} fused, model holds {ops_left} FusedExperts")
    try:
        result = moe_fusion.check(mutant.model, fused, tokens=tokens, steps=steps)
    except InputError as error:
        if str(error).startswith("original model"):
            return verdict("rejected", f"OpenVINO cannot run the mutant: {error}", len(report.fused))
        return verdict("WRONG", f"check refused the fused model: {error}", len(report.fused))
    except Exception:
        return verdict("WRONG", "check crashed: " + traceback.format_exc(limit=-3).strip().replace("\n", " | "))
    if not result.equivalent:
        return verdict("WRONG", f"fused model not equivalent to the mutant: {result.reason}", len(report.fused))
    rows = [b for b in report.blocks if _same_block(b.name, mutant.block)]
    if any(b.status == "fused" for b in rows):
        wrong = _against_reference(mutant) if reference else ""
        if wrong:
            return verdict("WRONG", wrong, len(report.fused))
        return verdict("fused", f"max abs error {result.max_abs:.3g}", len(report.fused))
    if not rows:
        others = "; ".join(f"{b.name}: {b.status} {b.reason}".strip() for b in report.blocks) or "empty report"
        return verdict("unreported", f"no row for {mutant.block} ({others})", len(report.fused))
    return verdict("declined", "; ".join(b.reason for b in rows), len(report.fused))


def _judge_index(task: tuple) -> Verdict:
    seed, index, fixtures, operators, tokens, steps, reference = task
    try:
        found = mutant(seed, index, fixtures, operators)
    except Exception:  # the generator's own failure: reported, never counted as a pass
        import traceback

        stub = Mutant(f"{index:04d}-?", "?", "?", "generator failed", "", "", None)
        trace = traceback.format_exc(limit=-2).replace("\n", " | ")
        return Verdict(stub, "WRONG", f"mutant generation crashed: {trace}")
    return judge(found, tokens=tokens, steps=steps, reference=reference)


def judge_many(
    seed: int,
    indices: Iterable[int],
    fixtures: Iterable[str] | None = None,
    operators: Iterable[str] | None = None,
    tokens: Iterable[int] = (1, 16),
    steps: int = 1,
    jobs: int = 1,
    per_child: int = 16,
    reference: bool = False,
) -> Iterator[Verdict]:
    """Verdicts of mutants `indices` of the run `seed`, in order, each made and judged in a worker process
    that is replaced after `per_child` mutants: building OpenVINO patterns leaks memory (each
    `openvino.passes.WrapType` keeps ~1.5 KB per type name; ~47 MB per `fuse` on the fixtures), which a
    long run in one process would pile up to many GB."""
    import multiprocessing

    fixtures = list(fixtures or FIXTURES)
    operators = list(operators or OPERATORS)
    tasks = [(seed, i, fixtures, operators, tuple(tokens), steps, reference) for i in indices]
    context = multiprocessing.get_context("spawn")  # no fork of a process running OpenVINO's threads
    chunk = max(per_child, 1) * max(jobs, 1)
    # a fresh pool per chunk, not max_tasks_per_child: Python 3.11's pool hangs when it replaces a worker
    for begin in range(0, len(tasks), chunk):
        yield from _judge_chunk(tasks[begin : begin + chunk], jobs, context)


def _judge_chunk(tasks: list[tuple], jobs: int, context) -> Iterator[Verdict]:
    """Verdicts in order. A worker that dies breaks its pool: the tasks not yet judged then run one at a time,
    each in a fresh worker, so the one that kills its worker is known and counted as crashed."""
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    judged = 0
    with ProcessPoolExecutor(jobs, mp_context=context) as pool:
        futures = [pool.submit(_judge_index, task) for task in tasks]
        for future in futures:
            try:
                verdict = future.result()
            except BrokenProcessPool:
                break
            judged += 1
            yield verdict
    for task in tasks[judged:]:
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            try:
                yield pool.submit(_judge_index, task).result()
            except BrokenProcessPool:
                seed, index, fixtures, operators = task[:4]
                detail = "the process judging it died (a native crash in OpenVINO while fusing or checking it)"
                yield Verdict(mutant(seed, index, fixtures, operators), "crashed", detail)
