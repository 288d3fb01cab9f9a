"""Broken-export messages lead with the evidence read from the graph, then the likely cause: a block whose
expert mask is read at expert 2 twice and never at 3 (a duplicated expert) says "experts [3] of 8 are
never computed", and blames no `eager` trace on a model that has none."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino.opset14 as ops
import pytest

import moe_fusion
from moe_fusion import broken
from moe_fusion.io import InputError

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"


def duplicated_expert(layer: str = "layers.0"):
    """gen1-mixtral with `layer`'s expert 3 reading expert 2's row of the routing mask."""
    model = moe_fusion.read_model(FIXTURES / "gen1-mixtral" / "openvino_model.xml")
    for node in model.get_ordered_ops():
        index = node.input_value(1).get_node() if node.get_type_name() == "Gather" else None
        if (index is not None and index.get_type_name() == "Constant" and layer in node.get_friendly_name()
                and index.get_data().size == 1 and int(index.get_data().reshape(-1)[0]) == 3
                and "OneHot" in {n.get_type_name() for n in _upstream(node, 4)}):
            data = np.array(index.get_data()).copy()
            data.reshape(-1)[0] = 2
            node.input(1).replace_source_output(ops.constant(data).output(0))
            return model
    raise AssertionError("no Gather of expert 3's mask row found")


def _upstream(node, depth: int) -> list:
    found, frontier = [], [node]
    for _ in range(depth):
        frontier = [v.get_node() for n in frontier for v in n.input_values()]
        found += frontier
    return found


def test_a_duplicated_expert_is_named_by_its_evidence_first():
    model = duplicated_expert()
    (finding,) = broken.findings(model)
    assert finding.problem.startswith("experts [3] of 8 are never computed: "), finding.problem
    assert finding.message.index("never computed") < finding.message.index("likely cause:")
    assert "eager" not in finding.message  # the graph shows no hit-expert loop: nothing blames one
    row = next(b for b in moe_fusion.fuse(model).blocks if "layers.0" in b.name)
    assert row.status == "skipped" and row.reason.startswith("broken export: experts [3] of 8 are never computed")
    assert "likely cause: a trace that froze the expert ids" in row.reason and "dropped or duplicated" in row.reason


def test_check_refuses_it_as_the_original_with_the_evidence(tmp_path):
    model = duplicated_expert()
    with pytest.raises(InputError, match=r"broken export \(1 MoE block\(s\)\): experts \[3\] of 8 are never computed; "
                                         r"likely cause: "):
        moe_fusion.check(model, model.clone(), tokens=(4,), steps=0)
