"""Where the operators look: each MoE block of a fresh (unmutated) model as a `Site`.

A block is the ops between its experts' input and its output (router included), walked backwards without
crossing ShapeOf. Experts of a per-expert loop are the ops downstream of one expert-id Gather of the one-hot
mask up to its scatter; experts of a sort-and-slice block are the MatMuls at one position of its Concats;
stacked forms (tiled, GPT-OSS, Llama-4, batched_mm) hold expert e in slab e of each weight constant, which
`batched_mm` reads through a Gather of the stacked constant at the routed expert ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import openvino as ov

from models.mutants.engine_api import find_blocks, is_weight, strip

SCATTERS = ("ScatterElementsUpdate", "ScatterNDUpdate")


def key(value: ov.Output) -> tuple[int, int]:
    return value.get_node().get_instance_id(), value.get_index()


def const_data(value: ov.Output) -> np.ndarray | None:
    node = strip(value).get_node()
    return np.asarray(node.get_data()) if node.get_type_name() == "Constant" else None


def constant_only(node: ov.Node, depth: int = 8) -> bool:
    """An op computed from Constants only (a weight's decompression, a folded shape)."""
    if node.get_type_name() == "Constant":
        return True
    inputs = node.input_values()  # a Parameter or ReadValue has none and is not constant
    return depth > 0 and bool(inputs) and all(constant_only(v.get_node(), depth - 1) for v in inputs)


def gathered_weight(value: ov.Output) -> ov.Output | None:
    """`batched_mm`: the stacked weight behind Gather(weight [E, ...], ids, axis 0), else None."""
    node = strip(value).get_node()
    if node.get_type_name() != "Gather" or not is_weight(node.input_value(0)):
        return None
    return node.input_value(0) if node.input_value(0).get_partial_shape().rank.get_length() >= 3 else None


def weight_port(matmul: ov.Node) -> int | None:
    """Which input of `matmul` is its weight: a constant (through decompression) or a gathered stacked one."""
    if is_weight(matmul.input_value(1)):
        return 1
    for port in (0, 1):
        if gathered_weight(matmul.input_value(port)) is not None:
            return port
    return None


def weight_value(matmul: ov.Node) -> ov.Output | None:
    """The weight `matmul` reads, before any Gather of a stacked constant."""
    port = weight_port(matmul)
    if port is None:
        return None
    return gathered_weight(matmul.input_value(port)) or matmul.input_value(port)


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

    block: object  # the engine's MoEBlock
    name: str
    family: str
    nodes: list[ov.Node]  # the block's ops in topological order (router included)
    experts: list[Expert] = field(default_factory=list)  # per-expert forms only

    @property
    def stacked(self) -> bool:
        return not self.experts

    @property
    def num_experts(self) -> int:
        return self.block.num_experts

    def of_type(self, *types: str) -> list[ov.Node]:
        """The block's ops of these types, leaving out constant subgraphs (weight decompression)."""
        return [n for n in self.nodes if n.get_type_name() in types and not constant_only(n)]

    @property
    def weight_matmuls(self) -> list[ov.Node]:
        return [n for n in self.of_type("MatMul") if weight_port(n) is not None and not is_router(self, n)]


def is_router(site: Site, matmul: ov.Node) -> bool:
    """The router's linear layer: its output is E wide."""
    width = matmul.get_output_partial_shape(0)[-1]
    return width.is_static and width.get_length() == site.num_experts and site.num_experts != 1


def _block_nodes(model: ov.Model, block) -> list[ov.Node]:
    hidden = key(block.hidden)
    seen: set[int] = set()
    stack = [block.output.get_node()]
    while stack and len(seen) < 20_000:
        node = stack.pop()
        if node.get_instance_id() in seen or node.get_type_name() in ("Parameter", "ReadValue", "Result"):
            continue
        seen.add(node.get_instance_id())
        if node.get_type_name() == "ShapeOf":
            continue
        stack.extend(v.get_node() for v in node.input_values() if key(v) != hidden)
    return [n for n in model.get_ordered_ops() if n.get_instance_id() in seen]


def _forward(start: ov.Node, inside: set[int]) -> list[ov.Node]:
    """Ops downstream of `start` inside the block, up to (and including) the first scatter on each path."""
    seen, stack, out = set(), [start], []
    while stack:
        node = stack.pop()
        if node.get_instance_id() in seen or node.get_instance_id() not in inside:
            continue
        seen.add(node.get_instance_id())
        out.append(node)
        if node.get_type_name() in SCATTERS:
            continue
        for output in node.outputs():
            stack.extend(t.get_node() for t in output.get_target_inputs())
    return out


def _loop_experts(site: Site) -> list[Expert]:
    inside = {n.get_instance_id() for n in site.nodes}
    experts = []
    for gather in site.of_type("Gather"):
        data = strip(gather.input_value(0)).get_node()
        index = const_data(gather.input_value(1))
        if data.get_type_name() != "Transpose" or strip(data.input_value(0)).get_node().get_type_name() != "OneHot":
            continue
        if index is None or index.size != 1:
            continue
        nodes = _forward(gather, inside)
        for node in list(nodes):  # and the weights they read
            nodes.extend(v.get_node() for v in node.input_values() if v.get_node().get_type_name() == "Constant")
        matmuls = [n for n in nodes if n.get_type_name() == "MatMul" and is_weight(n.input_value(1))]
        scatter = next((n for n in nodes if n.get_type_name() in SCATTERS), None)
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
        index = const_data(gather.input_value(1))
        if strip(gather.input_value(0)).get_node().get_type_name() == "ReduceSum" and index is not None:
            counts.setdefault(int(index.reshape(-1)[0]), gather)
    experts = []
    for e in range(min(c.get_input_size() for c in concats)):
        matmuls = [c.input_value(e).get_node() for c in concats]
        experts.append(Expert(e, matmuls, matmuls, counts.get(e)))
    return experts


def sites(model: ov.Model) -> list[Site]:
    """The MoE blocks of a fresh (unmutated) model."""
    found = []
    for block in find_blocks(model):
        site = Site(block, block.name, block.family, _block_nodes(model, block))
        if block.family == "per_expert_loop":
            site.experts = _loop_experts(site)
        elif block.family == "sort_and_slice":
            site.experts = _sliced_experts(site)
        found.append(site)
    return found
