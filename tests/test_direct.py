"""Direct `openvino.convert_model` exports (models/export_direct.py, transformers 5.5.4): the `batched_mm`
family fuses and proves every MoE layer, and broken traces are named as broken exports.

Tolerance end to end: `moe_fusion.check`'s default for f32 weights (1e-4 of each output's scale, f32 on CPU):
fusion reorders float sums inside each layer, which moves logits by ~1e-7 here; a wrong expert, weight half
or routing weight moves them by > 1e-2.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from click.testing import CliRunner

import moe_fusion
from moe_fusion import broken
from moe_fusion.cli import main
from moe_fusion.fusing import fuse
from moe_fusion.io import InputError, load

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"

# fixture -> (router kind in the report, shared expert beside the routed ones)
BATCHED_MM = {
    "direct-mixtral": ("softmax -> top-k -> renormalise", False),
    "direct-olmoe": ("softmax -> top-k", False),
    "direct-hunyuanmoe": ("softmax -> top-k -> renormalise", True),
    "direct-ernie45moe": ("softmax + bias -> top-k -> renormalise", True),
    "direct-deepseekv3": ("sigmoid + bias -> group top-k -> scaled", True),
    "direct-glm4moe": ("sigmoid + bias -> group top-k -> scaled", True),
    "direct-gptoss": ("top-k on logits -> softmax over k", False),  # GEMM2: biased, interleaved, clamped
}
# broken-export fixture -> words its report must contain
BROKEN = {
    "direct-eager-mixtral": ("loop over experts is unrolled for ", "set_experts_implementation(\"batched_mm\")"),
    "direct-eager-deepseekv3": ("loop over experts is unrolled for ", "set_experts_implementation(\"batched_mm\")"),
    "direct-granitemoeshared": ("split with constant sizes [", "no experts switch helps"),
    "direct-longcatflash": ("of 12 are never computed", "patch the loop to run every expert"),
}


def _experts(config: dict) -> tuple[int, int]:
    for e, k in (("num_local_experts", "num_experts_per_tok"), ("n_routed_experts", "num_experts_per_tok"),
                 ("moe_num_experts", "moe_k"), ("num_experts", "moe_topk"), ("num_experts", "num_experts_per_tok")):
        if e in config and k in config:
            return config[e], config[k]
    raise KeyError("experts")


def test_every_fixture_is_listed():
    direct = {p.name for p in FIXTURES.iterdir() if p.name.startswith("direct-")}
    assert direct == set(BATCHED_MM) | set(BROKEN)


@pytest.mark.parametrize("fixture", sorted(BATCHED_MM))
def test_batched_mm_fuses_every_layer_and_stays_equivalent(fixture):
    router, shared = BATCHED_MM[fixture]
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    experts, top_k = _experts(config)
    original = load(FIXTURES / fixture)
    model = original.clone()
    report = fuse(model)

    layers = config["num_hidden_layers"]
    assert [(b.family, b.status) for b in report.blocks] == [("batched_mm", "fused")] * layers, report.table()
    for block in report.blocks:
        assert (block.num_experts, block.top_k, block.hidden) == (experts, top_k, config["hidden_size"])
        assert block.experts_covered == experts and block.max_abs_error < 1e-5  # the proof saw every expert
        assert (block.router, block.shared_expert) == (router, shared)
        assert not block.broken_export
    before = Counter(n.get_type_name() for n in original.get_ordered_ops())
    after = Counter(n.get_type_name() for n in model.get_ordered_ops())
    assert after["FusedExperts"] == layers
    # the per-slot plumbing is gone: the id Clamp, the masked_fill Select, two batched MatMuls per layer
    assert (after["Clamp"], before["Select"] - after["Select"]) == (0, layers)
    assert before["MatMul"] - after["MatMul"] == 2 * layers
    result = moe_fusion.check(original, model, tokens=(1, 7, 33))
    assert result.equivalent, result.reason


def _with_clamp(model: ov.Model, high: float) -> ov.Model:
    """The model with every expert-id Clamp replaced by clamp(0, high)."""
    model = model.clone()
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Clamp":
            node.output(0).replace(ops.clamp(node.input_value(0), 0, high).output(0))
    model.validate_nodes_and_infer_types()
    return model


def test_a_clamp_that_remaps_experts_is_declined():
    model = _with_clamp(load(FIXTURES / "direct-mixtral"), 6)  # expert 7 would run as expert 6
    report = fuse(model)
    assert report.blocks and not report.fused
    assert all("remaps some of the 8 experts" in b.reason for b in report.blocks), report.table()


def test_a_wider_clamp_is_still_a_no_op():
    report = fuse(_with_clamp(load(FIXTURES / "direct-mixtral"), 100), verify=True)
    assert [b.status for b in report.blocks] == ["fused", "fused"], report.table()


def test_halves_swapped_is_declined():
    """gate and up read the other halves of gate_up: not Mixtral's chunk order, so not fused as it."""
    model = load(FIXTURES / "direct-olmoe").clone()
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Swish":
            split = node.input_value(0).get_node()
            product = next(iter(node.output(0).get_target_inputs())).get_node()
            node.input(0).replace_source_output(split.output(1))
            up = next(i for i in product.inputs() if i.get_source_output().get_node().get_type_name() != "Swish")
            up.replace_source_output(split.output(0))
    report = fuse(model)
    assert report.blocks and not report.fused
    assert all("first half" in b.reason for b in report.blocks), report.table()


@pytest.mark.parametrize("fixture", sorted(BROKEN))
def test_broken_exports_are_named(fixture, capsys):
    problem, fix = BROKEN[fixture]
    model = load(FIXTURES / fixture)
    report = fuse(model.clone())
    assert report.blocks and not report.fused
    for block in report.blocks:
        assert block.reason.startswith("broken export: ") and problem in block.reason and fix in block.reason
        assert block.broken_export and block.stopped_at
    main_run = CliRunner().invoke(main, ["inspect", str(FIXTURES / fixture)])
    assert main_run.exit_code == 0 and "come from a broken export" in main_run.stderr, main_run.output
    with pytest.raises(InputError, match="is a broken export"):
        moe_fusion.check(model, model)
    with pytest.raises(SystemExit) as exit_code:  # check of the model against itself is not a pass
        main(["check", str(FIXTURES / fixture), str(FIXTURES / fixture)])
    assert exit_code.value.code == 2
    assert "broken export" in capsys.readouterr().err


def test_broken_export_details():
    """What is wrong, concretely: how many experts the unrolled loop kept, which split sizes were frozen."""
    rows = {b.name: b.reason for b in fuse(load(FIXTURES / "direct-eager-mixtral")).blocks}
    assert any("unrolled for 4 of 8 experts" in r for r in rows.values()), rows
    frozen = broken.findings(load(FIXTURES / "direct-granitemoeshared"))
    sizes = [f.problem for f in frozen]
    assert len(frozen) == 2 and all("(the example input's 16 routed rows)" in s for s in sizes), sizes
    assert any("experts [7] got no rows" in s for s in sizes), sizes
    (longcat,) = broken.findings(load(FIXTURES / "direct-longcatflash"))  # .item() froze the hit experts' ids
    never = "experts [0, 2, 3, 4, 5, 6, 8, 10, 11] of 12 are never computed: "
    assert longcat.problem.startswith(never), longcat.problem
    assert "constant expert ids [1, 7, 9]" in longcat.problem and "`.item()`" in longcat.cause


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if p.is_dir()))
def test_no_false_alarm(fixture):
    """Every sound export (all but the broken-export fixtures) has no broken-export finding."""
    found = broken.findings(load(FIXTURES / fixture))
    assert bool(found) == (fixture in BROKEN), [f.problem for f in found]


def test_eager_ir_really_is_broken():
    """The fixture is what the report says: on an input that hits other than 4 experts it fails to run."""
    model = load(FIXTURES / "direct-eager-mixtral")
    compiled = moe_fusion.core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    ids = np.arange(1, dtype=np.int64).reshape(1, 1)  # one token hits 2 experts per layer, not 4
    with pytest.raises(RuntimeError, match="num_splits"):
        compiled({"input_ids": ids, "attention_mask": np.ones_like(ids)})


def test_convert_helper_stays_out_of_the_base_install():
    """moe_fusion never imports torch; without it, moe_fusion.convert's torch parts say which extra to install."""
    import importlib.util
    import subprocess
    import sys

    code = "import moe_fusion, moe_fusion.fusing, moe_fusion.cli, sys; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    if importlib.util.find_spec("torch") is None:
        with pytest.raises(ImportError, match=r"moe-fusion\[convert\]"):
            from moe_fusion.convert import convert_model  # noqa: F401


def test_benchmark_builder_is_the_batched_mm_form():
    """models/bench_models.batched_mm_layer (benchmarks/direct.py) computes the layer and fuses as this form."""
    from models.bench_models import SHAPES, batched_mm_layer, layer_weights, reference_output

    weights = layer_weights(SHAPES["small"])
    model = batched_mm_layer(weights)
    x = np.random.default_rng(0).standard_normal((1, 5, SHAPES["small"].hidden)).astype(np.float32)
    got = moe_fusion.core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})(x)[0]
    want = reference_output(weights, x)
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()  # f32 sums reordered: ~1e-7 relative
    report = fuse(model)
    assert [(b.family, b.status) for b in report.blocks] == [("batched_mm", "fused")]


def test_gemm2_with_another_clamp_is_declined():
    """GPT-OSS's up lane is clamp(-limit, limit): an asymmetric clamp is not what FusedExperts computes."""
    model = load(FIXTURES / "direct-gptoss").clone()
    for node in model.get_ordered_ops():
        if node.get_type_name() == "Clamp" and node.get_output_partial_shape(0).rank.get_length() == 2:
            node.output(0).replace(ops.clamp(node.input_value(0), -5.0, 7.0).output(0))  # the up lane's clamp
    model.validate_nodes_and_infer_types()
    report = fuse(model)
    assert report.blocks and not report.fused
    assert all("is not GPT-OSS's clamp" in b.reason for b in report.blocks), report.table()
