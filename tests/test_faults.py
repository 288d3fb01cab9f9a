"""Fault injection: every realistic way a rewrite can be wrong must fail `check` AND the per-block proof.

Each fault is one function `(inputs, attrs) -> (inputs, attrs)` on a FusedExperts' inputs and attributes.
It is applied (a) to the first FusedExperts of a fused real export, then `check` must say not equivalent,
and (b) to the replacement `build` makes for the same block before `prove`, which must reject it.
Tolerances are check's and prove's defaults (f32: 1e-4 of the output's scale): the faults move outputs
by far more, which is the point of the test. check runs 16 and 64 tokens with 1 decode step to stay fast.

A weight transposed on these fixtures (H=64, I=40) no longer fits FusedExperts' shapes: check refuses
the fused model as invalid input (InputError, CLI exit 2, one line naming the input and its shape) and
the proof rejects the block because it cannot even be cut out. A transposition that keeps the shapes
valid (H == I) is a numerical fault like the others: tested on a square synthetic block.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from click.testing import CliRunner

import moe_fusion
from models.synthetic import Router, random_experts, unfused_model
from moe_fusion import catalogue
from moe_fusion.block import MoEBlock, Weight
from moe_fusion.candidates import candidates
from moe_fusion.checking import check
from moe_fusion.cli import main
from moe_fusion.fusing import fuse
from moe_fusion.io import InputError, save
from moe_fusion.op import FusedExperts, FusedExpertsError
from moe_fusion.proof import prove
from moe_fusion.rewrite import build

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
FAST = {"tokens": (16, 64), "steps": 1}


# ---- faults -------------------------------------------------------------------------------------------


def array(value: ov.Output) -> np.ndarray:
    node = value.get_node()
    if node.get_type_name() == "Convert":
        node = node.input_value(0).get_node()
    assert node.get_type_name() == "Constant", f"weight is {node.get_type_name()}, not a Constant"
    return np.array(node.get_data())


def like(new: np.ndarray, old: ov.Output) -> ov.Output:
    """A constant holding `new`, behind the same decompression Convert as `old` if it had one."""
    out = ops.constant(np.ascontiguousarray(new)).output(0)
    node = old.get_node()
    return ops.convert(out, node.get_output_element_type(0)).output(0) if node.get_type_name() == "Convert" else out


def map_weights(inputs, fn):
    return [*inputs[:3], *(like(fn(array(w)), w) for w in inputs[3:])]


def swap_experts(inputs, attrs):
    return map_weights(inputs, lambda w: w[[1, 0, *range(2, w.shape[0])]]), attrs


def transpose_down(inputs, attrs):
    down = 5  # w_down in both expert types
    new = list(inputs)
    new[down] = like(np.swapaxes(array(inputs[down]), 1, 2), inputs[down])
    return new, attrs


def drop_renormalisation(inputs, attrs):
    divide = inputs[1].get_node()
    assert divide.get_type_name() == "Divide", "this fixture's routing weights are not renormalised"
    return [inputs[0], divide.input_value(0), *inputs[2:]], attrs


def swap_gate_up(inputs, attrs):
    return [*inputs[:3], inputs[4], inputs[3], *inputs[5:]], attrs


def flip_gate_idx(inputs, attrs):
    return inputs, {**attrs, "gate_idx": 1 - attrs["gate_idx"]}


def scale_routing(inputs, attrs):
    scaled = ops.multiply(inputs[1], np.array(0.9, inputs[1].get_element_type().to_dtype())).output(0)
    return [inputs[0], scaled, *inputs[2:]], attrs


def zero_expert(inputs, attrs):
    def zero(w):
        w = w.copy()
        w[3] = 0
        return w

    return map_weights(inputs, zero), attrs


def drop_last_expert(inputs, attrs):
    return map_weights(inputs, lambda w: w[:-1]), attrs


GEMM3_FAULTS = {
    "two experts swapped": swap_experts,
    "w_down transposed": transpose_down,
    "renormalisation dropped": drop_renormalisation,
    "gate and up swapped": swap_gate_up,
    "routing weights scaled by 0.9": scale_routing,
    "one expert zeroed": zero_expert,
    "expert count E-1": drop_last_expert,
}
GEMM2_FAULTS = {"gate_idx flipped": flip_gate_idx, "two experts swapped": swap_experts}


def faulty(fused: ov.Node, fault) -> FusedExperts:
    inputs, attrs = fault(list(fused.input_values()), dict(fused.get_attributes()))
    return FusedExperts(*inputs, **attrs)


def inject(model: ov.Model, fault) -> ov.Model:
    """The first FusedExperts of a copy of `model` replaced by its faulty version."""
    model = model.clone()
    node = next(n for n in model.get_ordered_ops() if n.get_type_name() == "FusedExperts")
    names = node.output(0).get_names()
    bad = faulty(node, fault)  # may raise FusedExpertsError for shapes that no longer fit
    node.output(0).replace(bad.output(0))
    bad.output(0).get_tensor().set_names(names)
    return model


def prove_faulty(model: ov.Model, fault, block_index: int = 0):
    """The per-block proof of the first block of `model` with `fault` injected into its replacement."""
    blocks, _ = candidates(model.clone(), catalogue.load(()))
    block = sorted(blocks, key=lambda b: b.name)[block_index]
    fused, replacement = build(block)
    bad = faulty(fused, fault)
    if replacement.get_node().get_instance_id() != fused.get_instance_id():  # build flattened the output
        return block, prove(block, bad, ops.reshape(bad, [-1, block.hidden_size], False).output(0))
    return block, prove(block, bad, bad.output(0))


# ---- fixtures -----------------------------------------------------------------------------------------

PAIRS: dict[str, tuple[ov.Model, ov.Model]] = {}


def pair(name: str) -> tuple[ov.Model, ov.Model]:
    if name not in PAIRS:
        original = moe_fusion.read_model(FIXTURES / name / "openvino_model.xml")
        fused = original.clone()
        report = fuse(fused)
        assert report.fused and not report.skipped, report.table()
        PAIRS[name] = (original, fused)
    return PAIRS[name]


CASES = [(f, name) for f in ("gen1-mixtral", "gen1-qwen3moe-norm") for name in GEMM3_FAULTS] + [
    ("gen1-gptoss", name) for name in GEMM2_FAULTS
]


@pytest.mark.parametrize(("fixture", "fault"), CASES, ids=[f"{f}-{n}" for f, n in CASES])
def test_fault_fails_check_and_proof(fixture, fault):
    fn = {**GEMM3_FAULTS, **GEMM2_FAULTS}[fault]
    original, fused = pair(fixture)  # the unfaulted pairs pass: test_check.py::test_every_fused_fixture_passes

    if fault == "w_down transposed":  # shape-invalid here (H=64, I=40): refused cleanly, see the docstring
        with pytest.raises(ValueError, match=r"FusedExperts input 5 'w_down' has shape \[8, 64, 40\]"):
            inject(fused, fn)
    else:
        report = check(original, inject(fused, fn), **FAST)
        assert not report.equivalent, report.summary()
        assert report.reason.startswith(("output 'logits' at prefill", "fused model fails at prefill")), report.reason

    if fault == "w_down transposed":  # build refuses it: fuse keeps the block unfused with this reason
        with pytest.raises(FusedExpertsError, match="w_down"):
            prove_faulty(original, fn)
        return
    _block, proof = prove_faulty(original, fn)
    assert not proof.ok
    assert proof.reason.startswith(("outputs differ on", "cannot cut the block out", "block does not run on"))


def test_shape_invalid_fused_model_is_bad_input(tmp_path):
    """A saved fused model whose w_down is stored transposed (the IR says [8, 64, 40] for [E, I, H]) fails
    validation on read: the CLI says so in one line with exit 2, the Python API raises InputError."""
    _original, fused = pair("gen1-mixtral")
    save(fused, FIXTURES / "gen1-mixtral", tmp_path / "broken")
    xml = tmp_path / "broken" / "openvino_model.xml"
    text = xml.read_text()
    at = text.index('shape="8, 40, 64"')  # layer 0's w_down Constant, then its output port dims
    head, tail = text[:at], text[at:]
    tail = tail.replace('shape="8, 40, 64"', 'shape="8, 64, 40"', 1)
    tail = tail.replace("<dim>40</dim>\n\t\t\t\t\t<dim>64</dim>", "<dim>64</dim>\n\t\t\t\t\t<dim>40</dim>", 1)
    xml.write_text(head + tail)
    result = CliRunner().invoke(main, ["check", str(FIXTURES / "gen1-mixtral"), str(tmp_path / "broken")])
    assert result.exit_code == 2, result.output
    assert "w_down" in result.stderr and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    with pytest.raises(InputError, match="w_down"):
        check(FIXTURES / "gen1-mixtral", tmp_path / "broken")


def test_cli_exits_1_on_a_fault_and_names_output_step_and_element(tmp_path):
    _original, fused = pair("gen1-mixtral")
    save(inject(fused, zero_expert), FIXTURES / "gen1-mixtral", tmp_path / "bad")
    result = CliRunner().invoke(
        main, ["check", str(FIXTURES / "gen1-mixtral"), str(tmp_path / "bad"), "--steps", "1", "--tokens", "16,64"]
    )
    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("moe-fusion: NOT equivalent: output 'logits' at prefill 16")
    assert "original" in line and "fused" in line and "at [0," in line  # the worst element and its values


# ---- square synthetic block: a transposition that keeps shapes valid ---------------------------------


def synthetic_block(experts, top_k: int = 2) -> tuple[ov.Model, MoEBlock]:
    """An unfused synthetic model (plain ops) and the MoEBlock a family would have found in it."""
    rng = np.random.default_rng(1)
    router = Router(rng.standard_normal((experts.hidden_size, experts.num_experts)).astype(np.float32), top_k)
    model = unfused_model(experts, router)
    total = model.output(0).get_node().input_value(0)
    topk = next(n for n in model.get_ordered_ops() if n.get_type_name() == "TopK")
    divide = next(n for n in model.get_ordered_ops() if n.get_type_name() == "Divide")
    names = ("w_gate", "w_up", "w_down") if experts.expert_type == "gemm3_swiglu" else (
        "w_gate_up", "b_gate_up", "w_down", "b_down"
    )
    block = MoEBlock(
        family="synthetic",
        router=topk,
        hidden=model.get_parameters()[0].output(0),
        routing_weights=divide.output(0),
        topk_indices=topk.output(1),
        output=total,
        num_experts=experts.num_experts,
        expert_ids=list(range(experts.num_experts)),
        weights={n: Weight([w]) for n, w in zip(names, experts.weights, strict=True)},
        **experts.attributes,
    )
    return model, block


def test_square_transposition_fails_check_and_proof():
    experts = random_experts(8, 32, 32, seed=3)  # H == I: w_down^T has a valid shape
    model, block = synthetic_block(experts)
    fused, replacement = build(block)
    assert prove(block, fused, replacement).ok  # the correct replacement is proven
    bad = faulty(fused, transpose_down)
    proof = prove(block, bad, bad.output(0))
    assert not proof.ok and proof.reason.startswith("outputs differ on"), proof.reason

    fused_model = ov.Model([replacement], [model.get_parameters()[0]]).clone()
    assert check(model, fused_model, tokens=(1, 16, 64)).equivalent
    report = check(model, inject(fused_model, transpose_down), tokens=(1, 16, 64))
    assert not report.equivalent and "at 1 tokens" in report.reason
