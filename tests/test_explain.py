"""`moe-fusion inspect --explain`: for each near miss the first failing condition, the node where matching
stopped, and how far each family's pattern got from the router (issue 8, item 6)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from click.testing import CliRunner
from test_direct import BROKEN  # broken-export fixtures: nothing to fuse, nothing for a hook to trace

from moe_fusion import catalogue
from moe_fusion.candidates import candidates
from moe_fusion.cli import main
from moe_fusion.explain import Trace, Walk, explain, family_trace
from moe_fusion.io import load

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
FAMILIES = ("per_expert_loop", "tiled", "gptoss", "sort_and_slice", "llama4")


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def read(name: str) -> ov.Model:
    return load(FIXTURES / name)  # a folder's openvino_model.xml (deploy-* folders also hold tokenizer IRs)


def gelu(model: ov.Model, where: str = "") -> ov.Model:
    """Every Swish whose name contains `where` becomes an erf GELU."""
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Swish" and where in node.get_friendly_name():
            node.output(0).replace(ops.gelu(node.input_value(0), "erf").output(0))
    return model


def saved(model: ov.Model, path: Path) -> Path:
    ov.save_model(model, path, compress_to_fp16=False)
    return path


@pytest.fixture(scope="module")
def tiled_gelu(tmp_path_factory) -> Path:
    return saved(gelu(read("gen2-mixtral")), tmp_path_factory.mktemp("tiled") / "gelu.xml")


@pytest.fixture(scope="module")
def loop_gelu(tmp_path_factory) -> Path:
    return saved(gelu(read("gen1-mixtral"), "experts.3."), tmp_path_factory.mktemp("loop") / "gelu.xml")


def test_tiled_gelu_expert_stops_at_the_gelu(tiled_gelu):
    """No family claims the router: every family says how far it got; tiled got to the activation."""
    code, out, err = run("inspect", tiled_gelu, "--explain")
    assert code == 0, err
    assert out.count("(no family)") == 2 and "whose experts match no family" in out
    (line,) = [ln for ln in out.splitlines() if "layers.0" in ln and ln.strip().startswith("tiled:")]
    product = "Multiply '__module.model.layers.0.mlp.experts/aten::mul"
    assert f"matched up to activation times up projection: {product}" in line
    assert "stopped at Gelu '" in line and line.endswith("expected Swish (SiLU) of the gate projection")
    # per_expert_loop finds no OneHot: it stops at the first thing the router's indices feed
    loop = [ln for ln in out.splitlines() if ln.strip().startswith("per_expert_loop:")]
    assert len(loop) == 2 and all("stopped at ScatterElementsUpdate" in ln for ln in loop)
    assert all("expected OneHot of the router's indices" in ln for ln in loop)
    for family in FAMILIES:
        assert out.count(f"  {family}") == 2, family  # each family's line, for each router


def test_loop_gelu_expert_names_the_expert_and_the_gelu(loop_gelu):
    code, out, err = run("inspect", loop_gelu, "--explain")
    assert code == 0, err
    paragraph = out.split("why not fused:")[1].split("\n\n")[1]
    assert paragraph.startswith("__module.model.layers.0.block_sparse_moe  (per_expert_loop)")
    assert "condition:  experts [3] of 8 are missing or do not match the SwiGLU expert pattern\n" in paragraph
    assert "stopped at: TopK '__module.model.layers.0.block_sparse_moe/aten::topk/TopK'" in paragraph
    (line,) = [ln for ln in paragraph.splitlines() if "per_expert_loop (" in ln]
    assert "per_expert_loop (7 of 8 expert slots match)" in line
    assert "Multiply '__module.model.layers.0.block_sparse_moe.experts.3/aten::mul/Multiply'" in line
    assert "stopped at Gelu" in line and line.endswith("expected Swish (SiLU) of expert 3's gate projection")
    assert "tiled:" not in paragraph  # only the family that declined it is traced


def test_json_carries_the_explanation(loop_gelu):
    code, out, err = run("inspect", loop_gelu, "--explain", "--json")
    assert code == 0, err
    blocks = json.loads(out)["blocks"]
    assert len(blocks) == 2 and all(b["status"] == "skipped" for b in blocks)
    explained = blocks[0]["explain"]
    assert explained["condition"] == "experts [3] of 8 are missing or do not match the SwiGLU expert pattern"
    assert explained["stopped_at"].startswith("TopK '") and explained["stopped_at"] == blocks[0]["stopped_at"]
    (trace,) = explained["families"]
    assert trace["family"] == "per_expert_loop" and trace["note"] == "7 of 8 expert slots match"
    assert trace["stopped_at"].startswith("Gelu '") and "expert 3" in trace["expected"]
    assert trace["matched"][0].startswith("router: TopK") and len(trace["matched"]) == 11
    # without --explain the JSON has no explain objects, and the report rows name the node anyway
    plain = json.loads(run("inspect", loop_gelu, "--json")[1])["blocks"]
    assert "explain" not in plain[0] and plain[0]["stopped_at"] == blocks[0]["stopped_at"]


def test_a_decline_names_the_node_it_stopped_at(tmp_path):
    """index_add_ replaced by plain assignment: per_expert_loop declines at that scatter."""
    model = read("gen1-mixtral")
    (scatter,) = [
        n for n in model.get_ordered_ops()
        if n.get_friendly_name() == "__module.model.layers.0.block_sparse_moe/aten::index_add_/ScatterElementsUpdate_8"
    ]
    scatter.output(0).replace(ops.scatter_elements_update(*scatter.input_values(), reduction="none").output(0))
    _, explanations = explain(model)
    (near,) = explanations
    assert near.condition == "scatter does not accumulate (reduction != sum)"
    assert near.row.stopped_at.startswith("ScatterElementsUpdate '")
    assert near.row.reason == f"{near.condition} (at {near.row.stopped_at})"
    assert [t.family for t in near.traces] == ["per_expert_loop"]
    assert not near.traces[0].expected  # every anchor is there: the failing condition is the reduction
    assert "every anchor matched" in near.text()


def test_nothing_to_explain_when_everything_fuses():
    code, out, _ = run("inspect", FIXTURES / "gen1-qwen3moe", "--explain")
    assert code == 0 and out.rstrip().endswith("every block found would fuse: nothing to explain")


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir() and p.name not in BROKEN
                                            and not p.name.startswith("deploy-")))  # deploy-*: lowered outputs
def test_hooks_agree_with_the_families(fixture):
    """On every real export: the family that fuses a block traces it to the end; every other family's hook
    stops somewhere. A hook that matched everything everywhere would explain nothing."""
    model = read(fixture)
    blocks, _ = candidates(model, catalogue.load())
    assert blocks
    for block in blocks:
        for family in catalogue.load():
            trace = family_trace(family, model, block.router)
            assert trace is not None, family.FAMILY
            if block.family == family.FAMILY:
                assert not trace.expected, trace.text()
            else:
                assert trace.expected and trace.stopped_at, trace.text()


def test_user_family_hooks(tmp_path):
    """A user family may explain with a string; a hook that raises says so in its line."""
    (tmp_path / "mine.py").write_text(
        "from moe_fusion.block import Decline\nFAMILY = 'mine'\n"
        "def find(model):\n"
        "    for n in model.get_ordered_ops():\n"
        "        if n.get_type_name() == 'TopK':\n"
        "            yield Decline('my family looked at it', n, router=n)\n"
        "def explain(model, router):\n"
        "    return 'my expert MLP needs a GELU, found ' + router.get_type_name()\n"
    )
    (tmp_path / "worse.py").write_text(
        "FAMILY = 'worse'\ndef find(model):\n    return []\ndef explain(model, router):\n    raise KeyError('x')\n"
    )
    code, out, err = run("inspect", FIXTURES / "gen2-mixtral", "--explain", "--patterns", tmp_path)
    assert code == 0, err
    assert "(mine)" not in out  # the built-in tiled family fuses these blocks: no near miss
    model = gelu(read("gen2-mixtral"))
    _, explanations = explain(model, [tmp_path])
    assert len(explanations) == 2
    for near in explanations:
        assert near.row.family == "mine" and near.condition == "my family looked at it"
        (trace,) = near.traces
        assert trace.text() == "mine: my expert MLP needs a GELU, found TopK"
    hooks = {f.FAMILY: f for f in catalogue.load([tmp_path])}
    router = next(n for n in model.get_ordered_ops() if n.get_type_name() == "TopK")
    assert family_trace(hooks["worse"], model, router).expected == "its explain() failed: KeyError: 'x'"


def test_walk_records_the_first_missing_anchor():
    x = ops.parameter([4, 8], np.float32, name="x")
    scores = ops.topk(x, 2, -1, "max", "value")
    relu = ops.relu(ops.convert(scores.output(1), np.float32))  # through a layout-only Convert
    ov.Model([relu.output(0), scores.output(0)], [x])  # keep the graph alive
    walk = Walk("demo", scores)
    walk.down("Relu", "relu of the indices", port=1).down("Sigmoid", "a sigmoid").down("Relu", "never reached")
    assert walk.trace == Trace(
        "demo",
        [f"router: TopK '{scores.get_friendly_name()}'", f"relu of the indices: Relu '{relu.get_friendly_name()}'"],
        stopped_at=f"Relu '{relu.get_friendly_name()}'",  # nothing reads the Relu: it stops there
        expected="a sigmoid",
    )
