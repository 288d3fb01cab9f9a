"""Near misses: real exports changed so that fusing would compute something else. None may fuse; each
carries a reason, and the model stays runnable and unchanged in what it computes."""

from pathlib import Path

import numpy as np
import openvino.opset14 as ops

import moe_fusion
from moe_fusion.fuse import fuse

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
    assert row.status == "skipped" and "experts [5] of 8 are missing" in row.reason


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
