"""Fusion of ONNX exports read through OpenVINO's ONNX frontend (models/fixtures/onnx-*, made by
models/export_onnx.py with optimum's ONNX exporter, `task="text-generation-with-past"`).

These models are stateless: the KV cache is explicit, `past_key_values.N.key/value` inputs `[B, kv_heads, past,
head_dim]` and `present.N.key/value` outputs. They are run as ONNX users run them: a prefill of 12 tokens with an
empty cache (past length 0), then decode steps feeding each step's presents back as the next step's past.

Tolerance: both models run in f32 on CPU (INFERENCE_PRECISION_HINT=f32). Fusion only reorders the float sums
inside each MoE layer (measured: max |diff| ~1e-7 on logits of magnitude ~0.5), so we allow 1e-4 of the logits'
scale, as for the IR fixtures; a wrong expert, weight or routing weight moves logits by > 1e-2.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import openvino as ov
import pytest
from click.testing import CliRunner

import moe_fusion
from moe_fusion.cli import main
from moe_fusion.fusing import fuse
from moe_fusion.io import load
from moe_fusion.runtime import F32

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
PLUMBING = ("OneHot", "NonZero", "ScatterElementsUpdate", "ScatterNDUpdate")

# fixture -> (family, MoE layers, config keys for E, K, intermediate)
FUSES = {
    "onnx-mixtral": ("per_expert_loop", 2, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "onnx-qwen2moe": ("per_expert_loop", 2, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "onnx-qwen3moe": ("per_expert_loop", 2, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
}


def generate_logits(model: ov.Model, vocab: int, prompt: int = 12, steps: int = 3, seed: int = 0) -> list[np.ndarray]:
    """Logits of a random prompt's prefill (empty cache) and of `steps` greedy decode steps, f32 on CPU."""
    compiled = moe_fusion.core().compile_model(model, "CPU", F32)
    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    caches = [n for n in params if n.startswith("past_key_values.")]
    ids = np.random.default_rng(seed).integers(0, vocab, (1, prompt))
    past = {}
    for name in caches:  # [B, kv_heads, 0, head_dim]
        shape = params[name].get_partial_shape()
        past[name] = np.zeros((1, shape[1].get_length(), 0, shape[3].get_length()), np.float32)
    length, outs = 0, []
    for _ in range(steps + 1):
        feeds = {
            "input_ids": ids,
            "attention_mask": np.ones((1, length + ids.shape[1]), np.int64),
            "position_ids": np.arange(length, length + ids.shape[1], dtype=np.int64)[None],
            **past,
        }
        result = compiled(feeds)
        logits = result[compiled.output("logits")].copy()
        outs.append(logits)
        past = {name: result[compiled.output(name.replace("past_key_values.", "present."))] for name in caches}
        length += ids.shape[1]
        ids = logits[:, -1:].argmax(-1).astype(np.int64)
    return outs


def assert_same_logits(original: ov.Model, fused: ov.Model, vocab: int, steps: int = 3) -> None:
    pairs = zip(generate_logits(original, vocab, steps=steps), generate_logits(fused, vocab, steps=steps), strict=True)
    for step, (want, got) in enumerate(pairs):
        scale = float(np.abs(want).max())
        assert np.abs(got - want).max() <= 1e-4 * scale, f"logits differ at step {step}"


@pytest.mark.parametrize("fixture", sorted(FUSES))
def test_onnx_export_fuses_and_stays_equivalent(fixture):
    family, layers, experts_key, top_k_key, inter_key = FUSES[fixture]
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    original = load(FIXTURES / fixture / "model.onnx")  # what the CLI reads: ov.Core().read_model on the .onnx
    model = original.clone()
    report = fuse(model)

    assert [b.status for b in report.blocks] == ["fused"] * layers, report.table()
    assert Counter(n.get_type_name() for n in model.get_ordered_ops())["FusedExperts"] == layers
    for block in report.blocks:
        assert block.family == family
        assert (block.num_experts, block.top_k) == (config[experts_key], config[top_k_key])
        assert (block.hidden, block.intermediate) == (config["hidden_size"], config[inter_key])
        assert block.experts_covered == block.num_experts
    scopes = tuple(b.name + "/" for b in report.blocks)  # ONNX names: /model/layers.0/mlp/NonZero_3
    left = Counter(
        n.get_type_name()
        for n in model.get_ordered_ops()
        if n.get_type_name() in PLUMBING and n.get_friendly_name().startswith(scopes)
    )
    assert not left, f"MoE plumbing left after fusion: {left}"
    assert_same_logits(original, model, config["vocab_size"])


def test_cli_fuses_an_onnx_file_to_ir(tmp_path):
    source = FIXTURES / "onnx-mixtral" / "model.onnx"
    before = source.read_bytes()
    result = CliRunner().invoke(main, ["fuse", str(source), "-o", str(tmp_path / "out.xml")])
    assert result.exit_code == 0, result.stderr
    assert "2 blocks fused, 0 skipped" in result.stdout
    assert (tmp_path / "out.bin").is_file()
    assert source.read_bytes() == before
    fused = moe_fusion.read_model(tmp_path / "out.xml")
    assert Counter(n.get_type_name() for n in fused.get_ordered_ops())["FusedExperts"] == 2
    vocab = json.loads((FIXTURES / "onnx-mixtral" / "config.json").read_text())["vocab_size"]
    assert_same_logits(load(source), fused, vocab, steps=1)  # the saved IR runs like the ONNX model


def test_index_add_into_a_non_zero_tensor_is_declined():
    """torch.onnx's index_add_ is `acc + scatter(zeros, ...)`: with anything but zeros under the scatter the Add
    would count that tensor in again, so the block is declined, not fused."""
    model = load(FIXTURES / "onnx-mixtral" / "model.onnx")
    scatter = next(n for n in model.get_ordered_ops() if n.get_type_name() == "ScatterElementsUpdate")
    zeros = scatter.input_value(0).get_node()
    assert zeros.get_type_name() == "Broadcast"
    zeros.input(0).replace_source_output(ov.op.Constant(np.array(1.0, np.float32)).output(0))
    report = fuse(model)
    declined = [b for b in report.blocks if b.status == "skipped"]
    assert len(declined) == 1 and "non-zero tensor" in declined[0].reason, report.table()
    assert [b.status for b in report.blocks].count("fused") == 1  # the other layer still fuses


def test_convert_model_of_the_onnx_file_fuses_too():
    """`ov.convert_model("model.onnx")` also runs MOC transformations (x * Sigmoid(x) becomes Swish, constants
    fold): the other spelling users get from the same file."""
    source = FIXTURES / "onnx-qwen3moe" / "model.onnx"
    original = ov.convert_model(source)
    assert not any(n.get_type_name() == "Sigmoid" for n in original.get_ordered_ops())
    model = original.clone()
    report = fuse(model)
    assert [b.status for b in report.blocks] == ["fused", "fused"], report.table()
    assert_same_logits(original, model, 256, steps=1)
