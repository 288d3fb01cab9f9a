"""Near misses: real exports changed so that fusing would compute something else. None may fuse; each
carries a reason, and the model stays runnable and unchanged in what it computes."""

from pathlib import Path

import numpy as np
import openvino.opset14 as ops
import pytest

import moe_fusion
from moe_fusion import catalogue
from moe_fusion.candidates import candidates
from moe_fusion.fusing import fuse

FIXTURE = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "gen1-mixtral" / "openvino_model.xml"
LAYER0 = "__module.model.layers.0.block_sparse_moe"


def load():
    model = moe_fusion.read_model(FIXTURE)
    return model, {n.get_friendly_name(): n for n in model.get_ordered_ops()}


def layer0(report):
    (row,) = [b for b in report.blocks if b.name == LAYER0]
    return row


def expert_node(nodes, expert: int, suffix: str):
    (node,) = [
        n
        for name, n in nodes.items()
        if f"experts.{expert}." in name and name.startswith(LAYER0) and name.endswith(suffix)
    ]
    return node


def test_gelu_expert_is_not_fused():
    model, nodes = load()
    swish = expert_node(nodes, 3, "silu/Swish")
    swish.output(0).replace(ops.gelu(swish.input_value(0), "erf").output(0))
    row = layer0(fuse(model))
    assert row.status == "skipped" and "experts [3] of 8 are missing" in row.reason


def test_missing_expert_is_reported_with_its_id():
    model, nodes = load()
    # Expert 5's loop body selects expert 4's tokens: as if the trace had dropped expert 5.
    gather = nodes[f"{LAYER0}/aten::select/Gather_5"]
    gather.input(1).replace_source_output(ops.constant(np.int64(4)).output(0))
    row = layer0(fuse(model))
    assert row.status == "skipped" and row.reason.startswith("broken export: experts [5] of 8 are never computed")


def test_non_constant_expert_weights_are_not_fused():
    model, nodes = load()
    matmul = expert_node(nodes, 2, "w3/aten::linear/MatMul")
    weight = matmul.input_value(1)
    scale = ops.parameter([], np.float32, name="scale")
    matmul.input(1).replace_source_output(ops.multiply(weight, scale).output(0))
    model.add_parameters([scale])
    row = layer0(fuse(model))
    assert row.status == "skipped" and "experts [2] of 8 are missing" in row.reason


def test_proof_rejects_what_the_pattern_cannot_see():
    """A wrong accumulation the pattern accepts (index_add_ replaced by plain assignment, reduction 'none')
    is caught; here the pattern itself refuses it, naming the node."""
    model, nodes = load()
    scatter = nodes[f"{LAYER0}/aten::index_add_/ScatterElementsUpdate_8"]
    replaced = ops.scatter_elements_update(*scatter.input_values(), reduction="none")
    scatter.output(0).replace(replaced.output(0))
    report = fuse(model)
    reasons = " ".join(b.reason for b in report.blocks if b.name == LAYER0)
    assert "fused" not in [b.status for b in report.blocks if b.name == LAYER0]
    assert reasons


def fixture_model(name: str):
    return moe_fusion.read_model(FIXTURE.parent.parent / name / "openvino_model.xml")


def test_llama4_with_top2_is_declined_not_approximated():
    """Llama-4 scales the experts' input by the routing weight: exact in FusedExperts for top-1 only."""
    model = fixture_model("gen1-llama4")
    for node in model.get_ordered_ops():
        if node.get_type_name() == "TopK" and "feed_forward.router" in node.get_friendly_name():
            node.input(1).replace_source_output(ops.constant(np.int64(2)).output(0))
    model.validate_nodes_and_infer_types()
    report = fuse(model)
    assert [b.status for b in report.blocks] == ["skipped", "skipped"], report.table()
    assert all("the same only for top-1" in b.reason for b in report.blocks)
    assert not any(n.get_type_name() == "FusedExperts" for n in model.get_ordered_ops())


@pytest.mark.parametrize("fixture", ["gen1-mixtral", "gen2-mixtral"])
def test_two_blocks_sharing_one_router_are_declined(fixture):
    """Layer 1's experts rewired to layer 0's router: two expert blocks, one router."""
    model = fixture_model(fixture)
    first, second = candidates(model, catalogue.load())[0]
    second.topk_indices.replace(first.topk_indices)
    second.routing_weights.replace(first.routing_weights)
    model.validate_nodes_and_infer_types()
    report = fuse(model)
    assert [b.status for b in report.blocks] == ["skipped", "skipped"], report.table()
    assert all("its router drives 2 expert blocks" in b.reason for b in report.blocks)
    assert not any(n.get_type_name() == "FusedExperts" for n in model.get_ordered_ops())


def test_router_whose_experts_match_no_family_is_reported():
    """gen2-mixtral (tiled form) with GELU experts: no family matches, yet the router is reported."""
    model = fixture_model("gen2-mixtral")
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Swish":
            node.output(0).replace(ops.gelu(node.input_value(0), "erf").output(0))
    report = fuse(model)
    assert [b.status for b in report.blocks] == ["skipped", "skipped"], report.table()
    assert all("whose experts match no family" in b.reason for b in report.blocks)
