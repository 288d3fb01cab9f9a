"""GPT-OSS experts (GEMM2_BIAS_SWIGLU_CLAMP): real exports of both optimum-intel generations and synthetic
tiled blocks with non-default clamp, beta and lane order, fused by `patterns/gptoss.py`.

Tolerances: original and fused run in f32 (CPU, INFERENCE_PRECISION_HINT=f32) from the same weights and
differ only in summation order (the GEMMs, the sum over experts), measured at ~1e-7 of the logits' scale for
the fixtures and ~1e-7 of the output's scale for the synthetic blocks. We allow 1e-4 of the scale (as in
test_fixtures.py): a wrong lane, limit, beta, bias or expert moves the result by more than 1e-2 of it.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from llm import F32, generate_logits
from test_fixtures import PLUMBING

import moe_fusion
from models.synthetic import LogitsRouter, random_experts, tiled_gptoss_model
from moe_fusion import GEMM2_BIAS_SWIGLU_CLAMP
from moe_fusion.fusing import fuse
from moe_fusion.reference import fused_experts

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
GPTOSS = ("gen1-gptoss", "gen1-gptoss-zerobias", "gen2-gptoss", "gen2-gptoss-zerobias")
# transformers 4.57 and 5.5 hard-code both in GptOssExperts (limit 7.0, alpha 1.702); their config.json has no
# swiglu_limit (released GPT-OSS checkpoints' configs do, with 7.0). The IR holds alpha as an f32 constant.
SWIGLU_ALPHA = float(np.float32(1.702))
# The lanes' ops, which must all go with the block (the router's own Slice, etc. stay).
EXPERT_OPS = (*PLUMBING, "Clamp", "Minimum", "Swish", "ReduceSum")
RTOL = 1e-4
E, H, I, K = 6, 16, 12, 2


def fused_nodes(model: ov.Model) -> list:
    return [n for n in model.get_ordered_ops() if n.get_type_name() == "FusedExperts"]


def run(model: ov.Model, x: np.ndarray) -> np.ndarray:
    return moe_fusion.core().compile_model(model, "CPU", F32)(x)[0]


@pytest.mark.parametrize("fixture", GPTOSS)
def test_gptoss_export_fuses_and_stays_equivalent(fixture):
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    original = moe_fusion.read_model(FIXTURES / fixture / "openvino_model.xml")
    model = original.clone()
    report = fuse(model)

    layers = config["num_hidden_layers"]
    assert [b.status for b in report.blocks] == ["fused"] * layers, report.table()
    for block in report.blocks:
        assert (block.family, block.expert_type) == ("gptoss", GEMM2_BIAS_SWIGLU_CLAMP)
        assert (block.num_experts, block.top_k) == (config["num_local_experts"], config["num_experts_per_tok"])
        assert (block.hidden, block.intermediate) == (config["hidden_size"], config["intermediate_size"])
        assert block.router == "top-k on logits -> softmax over k"
        assert block.experts_covered == block.num_experts  # the proof saw every expert

    nodes = fused_nodes(model)
    assert len(nodes) == layers
    for node in nodes:
        attrs = node.attributes
        assert attrs["expert_alpha"] == config.get("swiglu_limit", 7.0)
        assert attrs["expert_beta"] == SWIGLU_ALPHA
        assert attrs["gate_idx"] == 0  # gate_up[..., ::2] is the gate
        biases = [node.input_value(i).get_node().get_data() for i in (4, 6)]
        assert [b.shape for b in biases] == [(8, 2 * config["intermediate_size"]), (8, config["hidden_size"])]
        # -zerobias: the exporter folded the bias Adds away; the block fuses with exact zeros.
        assert all((b == 0).all() for b in biases) == fixture.endswith("-zerobias")

    scopes = tuple(b.name.rsplit(".", 1)[0] for b in report.blocks)  # `...layers.N.mlp`
    left = Counter(
        n.get_type_name()
        for n in model.get_ordered_ops()
        if n.get_type_name() in EXPERT_OPS and n.get_friendly_name().startswith(scopes)
    )
    assert not left, f"MoE plumbing left after fusion: {dict(left)}"

    vocab = config["vocab_size"]
    for step, (want, got) in enumerate(
        zip(generate_logits(original, vocab), generate_logits(model, vocab), strict=True)
    ):
        assert np.abs(got - want).max() <= RTOL * float(np.abs(want).max()), f"logits differ at step {step}"


# ---- synthetic blocks in the exported tiled form -----------------------------------------------------


def synthetic(seed: int = 1, zero_bias: bool = False, **attrs):
    experts = random_experts(E, H, I, GEMM2_BIAS_SWIGLU_CLAMP, seed=seed, **attrs)
    if zero_bias:
        experts.weights[1][:], experts.weights[3][:] = 0, 0
    rng = np.random.default_rng(seed + 100)
    router = LogitsRouter(
        rng.standard_normal((H, E)).astype(np.float32), (0.1 * rng.standard_normal(E)).astype(np.float32), K
    )
    return experts, router


UP_FIRST = {"expert_alpha": 3.5, "expert_beta": 1.3, "gate_idx": 1}


@pytest.mark.parametrize(
    "zero_bias, transpose_b", [(False, True), (False, False), (True, False)], ids=["bias", "bias-kn", "zerobias-kn"]
)
def test_synthetic_attributes_are_read_from_the_graph(zero_bias, transpose_b):
    """Up lane first, clamp 3.5, beta 1.3: nothing GPT-OSS-specific may be assumed."""
    experts, router = synthetic(zero_bias=zero_bias, **UP_FIRST)
    original = tiled_gptoss_model(experts, router, transpose_b=transpose_b)
    model = original.clone()
    report = fuse(model)
    assert [(b.family, b.status) for b in report.blocks] == [("gptoss", "fused")], report.table()
    (node,) = fused_nodes(model)
    assert node.attributes == {
        "expert_type": GEMM2_BIAS_SWIGLU_CLAMP,
        "expert_alpha": 3.5,
        "expert_beta": float(np.float32(1.3)),
        "gate_idx": 1,
    }
    # The weights are the experts' own, [E, in, out], lanes still interleaved.
    stacked = [node.input_value(i).get_node().get_data() for i in range(3, 7)]
    for got, want in zip(stacked, experts.weights, strict=True):
        np.testing.assert_array_equal(got, want)
    x = np.random.default_rng(2).standard_normal((9, H)).astype(np.float32)
    want = run(original, x)
    assert np.abs(run(model, x) - want).max() <= RTOL * np.abs(want).max()


def test_clamp_engaged_on_both_lanes():
    """Inputs large enough that, among the routed (token, expert) pairs, gate pre-activations exceed the
    limit and up values leave [-limit, limit] on both sides; fused must still equal the original."""
    experts, router = synthetic(seed=3, **UP_FIRST)
    limit, gate_idx = experts.expert_alpha, experts.gate_idx
    x = (6 * np.random.default_rng(4).standard_normal((32, H))).astype(np.float32)

    idx = router.select(x)  # [T, K]
    w_gate_up, b_gate_up = experts.weights[:2]
    gate_up = np.einsum("th,tkho->tko", x, w_gate_up[idx]) + b_gate_up[idx]  # routed pairs only
    gate, up = gate_up[..., gate_idx::2], gate_up[..., 1 - gate_idx :: 2]
    assert (gate > limit).mean() > 0.05, "gate clamp not engaged"
    assert (up > limit).mean() > 0.05 and (up < -limit).mean() > 0.05, "up clamp not engaged on both sides"

    original = tiled_gptoss_model(experts, router)
    model = original.clone()
    report = fuse(model)
    assert [b.status for b in report.blocks] == ["fused"], report.table()
    want, got = run(original, x), run(model, x)
    scale = np.abs(want).max()
    assert np.abs(got - want).max() <= RTOL * scale

    # The clamp matters here: the same routing without it is far off.
    logits = np.take_along_axis(x @ router.weight + router.bias, idx, 1)
    routing = np.exp(logits - logits.max(1, keepdims=True))
    routing /= routing.sum(1, keepdims=True)
    unclamped = fused_experts(x, routing, idx, experts.weights, GEMM2_BIAS_SWIGLU_CLAMP, 0.0, 1.3, gate_idx)
    assert np.abs(unclamped - want).max() > 1e-2 * scale


# ---- near misses: blocks that would compute something else are declined with a reason -----------------


def only(model: ov.Model, kind: str, where=lambda n: True) -> ov.Node:
    (node,) = [n for n in model.get_ordered_ops() if n.get_type_name() == kind and where(n)]
    return node


def feeds(kind: str):
    return lambda n: any(t.get_node().get_type_name() == kind for t in n.output(0).get_target_inputs())


def overlapping_lanes(model):  # both lanes start at the gate's column
    gate_start = only(model, "Slice", feeds("Minimum")).input_value(1)
    only(model, "Slice", feeds("Clamp")).input(1).replace_source_output(gate_start)


def asymmetric_clamp(model):
    clamp = only(model, "Clamp")
    clamp.output(0).replace(ops.clamp(clamp.input_value(0), -3.5, 4.0).output(0))


def limits_differ(model):
    only(model, "Minimum").input(1).replace_source_output(ops.constant(np.float32(3.0)).output(0))


def up_offset_not_one(model):
    add = only(model, "Add", lambda n: n.input_value(0).get_node().get_type_name() == "Clamp")
    add.input(1).replace_source_output(ops.constant(np.float32(2.0)).output(0))


def stride_three(model):  # lanes gate_up[..., 0::3] and [..., 1::3]; down reads 8 columns to keep shapes valid
    for node in [n for n in model.get_ordered_ops() if n.get_type_name() == "Slice"]:
        node.input(3).replace_source_output(ops.constant(np.array([3])).output(0))
    down = only(model, "MatMul", lambda n: n.input_value(0).get_node().get_type_name() == "Multiply")
    down.input(1).replace_source_output(ops.constant(np.ones((E, H, 8), np.float32)).output(0))


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (overlapping_lanes, "lanes overlap"),
        (asymmetric_clamp, "is not symmetric"),
        (limits_differ, "gate limit 3.0 and up limit 3.5 differ"),
        (up_offset_not_one, "up lane adds 2.0, not 1"),
        (stride_three, "not interleaved: slice step 3"),
    ],
)
def test_near_miss_is_declined_with_reason(mutate, reason):
    experts, router = synthetic(**UP_FIRST)
    model = tiled_gptoss_model(experts, router)
    mutate(model)
    model.validate_nodes_and_infer_types()
    report = fuse(model)
    assert [(b.family, b.status) for b in report.blocks] == [("gptoss", "skipped")], report.table()
    assert reason in report.blocks[0].reason
    assert not fused_nodes(model)
