"""Fusion of real exports (models/fixtures, made by models/export_hf.py from Hugging Face architectures).

End-to-end tolerance: both models run in f32 (CPU, INFERENCE_PRECISION_HINT=f32); fusion only reorders
float sums inside each MoE layer, which moves logits by ~1e-7 of their scale here. We allow 1e-4 of the
logits' scale: decode steps feed back argmax tokens, and a wrong expert or weight moves logits by > 1e-2.
"""

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from llm import F32, generate_logits

import moe_fusion
from moe_fusion.fusing import fuse
from moe_fusion.io import save

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
PLUMBING = ("OneHot", "NonZero", "ScatterElementsUpdate", "ScatterNDUpdate", "Tile")
# Router ops of those types, which stay: DeepSeek's group-limited top-k and PhiMoE's sparsemixer scatter masks.
ROUTER_OPS = {
    "gen1-deepseekv3": {"ScatterElementsUpdate": 2},
    "gen1-phimoe": {"ScatterElementsUpdate": 2},
    "gen2-phimoe": {"ScatterElementsUpdate": 2},
    # GraniteMoE's router counts slots per expert by scattering ones into [T, E].
    "gen1-granitemoe": {"ScatterElementsUpdate": 2},
    "gen2-granitemoe": {"ScatterElementsUpdate": 2},
}

# fixture -> (family, MoE layers, config keys for E, K, intermediate)
FUSES = {
    "gen1-mixtral": ("per_expert_loop", 2, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "gen1-qwen2moe": ("per_expert_loop", 2, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gen1-qwen3moe": ("per_expert_loop", 2, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gen1-qwen3moe-norm": ("tiled", 2, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gen1-olmoe": ("per_expert_loop", 2, "num_experts", "num_experts_per_tok", "intermediate_size"),
    "gen1-phimoe": ("per_expert_loop", 2, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "gen1-deepseekv3": ("per_expert_loop", None, "n_routed_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gen1-granitemoe": ("sort_and_slice", 2, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "gen1-llama4": ("llama4", 2, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "convert-olmoe-block": ("per_expert_loop", 1, "num_experts", "num_experts_per_tok", "intermediate_size"),
    "gen2-mixtral": ("tiled", 2, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "gen2-qwen2moe": ("tiled", 2, "num_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gen2-qwen3moe": ("tiled", 2, "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gen2-qwen3moe-norm": ("tiled", 2, "num_local_experts", "num_experts_per_tok", "moe_intermediate_size"),
    "gen2-granitemoe": ("sort_and_slice", 2, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
    "gen2-phimoe": ("tiled", 2, "num_local_experts", "num_experts_per_tok", "intermediate_size"),
}


# Models with a shared expert beside the routed ones (the report's shared_expert column).
SHARED_EXPERT = {"gen1-qwen2moe", "gen2-qwen2moe", "gen1-deepseekv3", "gen1-llama4"}


def ops_by_type(model) -> Counter:
    return Counter(n.get_type_name() for n in model.get_ordered_ops())


@pytest.mark.parametrize("fixture", sorted(FUSES))
def test_real_export_fuses_and_stays_equivalent(fixture, tmp_path):
    family, layers, experts_key, top_k_key, inter_key = FUSES[fixture]
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    if layers is None:  # DeepSeek: dense layers first
        layers = config["num_hidden_layers"] - config.get("first_k_dense_replace", 0)
    original = moe_fusion.read_model(FIXTURES / fixture / "openvino_model.xml")
    model = original.clone()
    report = fuse(model)

    assert [b.status for b in report.blocks] == ["fused"] * layers, report.table()
    assert ops_by_type(model)["FusedExperts"] == layers
    for block in report.blocks:
        assert block.family == family
        assert (block.num_experts, block.top_k) == (config[experts_key], config[top_k_key])
        assert (block.hidden, block.intermediate) == (config["hidden_size"], config[inter_key])
        assert block.experts_covered == block.num_experts  # the proof saw every expert
        assert block.shared_expert == (fixture in SHARED_EXPERT)
    scopes = tuple(b.name for b in report.blocks)  # the module holding each block
    in_blocks = Counter(
        n.get_type_name()
        for n in model.get_ordered_ops()
        if n.get_type_name() in PLUMBING and n.get_friendly_name().startswith(scopes)
    )
    left = {t: n for t, n in in_blocks.items() if n != ROUTER_OPS.get(fixture, {}).get(t)}
    assert not left, f"MoE plumbing left after fusion: {left}"

    # No weight stored twice: the per-expert constants are replaced, not kept beside the stacked ones.
    save(model, FIXTURES / fixture, tmp_path / "fused")
    assert (tmp_path / "fused" / "openvino_model.bin").stat().st_size <= (
        FIXTURES / fixture / "openvino_model.bin"
    ).stat().st_size

    if fixture.startswith("convert-"):  # a single MoE module converted with ov.convert_model
        x = np.random.default_rng(0).standard_normal((1, 7, config["hidden_size"])).astype(np.float32)
        want, got = (moe_fusion.core().compile_model(m, "CPU", F32)(x)[0] for m in (original, model))
        assert np.abs(got - want).max() <= 1e-4 * float(np.abs(want).max())
        return
    vocab = config["vocab_size"]
    for step, (want, got) in enumerate(
        zip(generate_logits(original, vocab), generate_logits(model, vocab), strict=True)
    ):
        scale = float(np.abs(want).max())
        assert np.abs(got - want).max() <= 1e-4 * scale, f"logits differ at step {step}"
