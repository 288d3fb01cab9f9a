#!/usr/bin/env python
"""Convert tiny random Hugging Face MoE models with `openvino.convert_model` directly, as users must for the
architectures optimum-intel refuses (DeepSeek-V3, GLM-4-MoE, ERNIE-4.5-MoE, Hunyuan-MoE, OLMoE, ...).

    python models/export_direct.py --out models/fixtures [names...]
    python models/export_direct.py --list

Needs transformers 5.5.4, torch 2.13, openvino 2026.4.1 and moe-fusion itself (see models/README.md). It
converts with `moe_fusion.convert.convert_model`, the recipe of docs/converting.md:

1. `model.set_experts_implementation("batched_mm")`: transformers 5's default `grouped_mm` does not convert
   (`aten::histc`), and `eager` loops over the experts the example input hit, so the IR keeps only those.
2. Two mask fixes (transformers 5.5.4's masking code, not the MoE): a mask function without the tensor
   `q_length` branch and vmap, registered for "sdpa" and "eager", and `find_packed_sequence_indices`
   returning None (it traces to `aten::diff`, which has no conversion rule). `--verify-fixes` shows that
   each is needed.
3. `ov.convert_model` of `forward(input_ids, attention_mask) -> logits` with dynamic batch and sequence.

The fixtures are logits models without a KV cache: the MoE blocks are the same with or without it, and the
stateful cache (optimum-intel's job) is not what a user converting by hand gets for free.

Every `batched_mm` IR is compared with torch on fresh inputs (1, 5 and 33 tokens, batch 1 and a padded
batch of 2) when made; the largest logit difference is printed and must stay below 1e-4 (f32 on CPU;
logits are ~1 in magnitude). Broken specs (`eager`, JetMoE, GraniteMoE-shared) are exported on purpose,
as fixtures for moe-fusion's broken-export report; for them the script shows how the IR fails.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import torch
import transformers

import moe_fusion
from moe_fusion.convert import conversion_fixes, convert_model

C = transformers
BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)
I, DENSE = 40, 56  # expert / dense-or-shared intermediate sizes, as in export_hf.py (all sizes distinct)
TOLERANCE = 1e-4
F32 = {"INFERENCE_PRECISION_HINT": "f32"}


@dataclass
class Spec:
    config: Callable[[], transformers.PretrainedConfig]
    experts: str = "batched_mm"  # the experts implementation traced
    broken: str = ""  # why the IR is wrong (a broken-export fixture), or ""
    trace_tokens: int = 8  # tokens of the example input


def deepseek_v3():
    return C.DeepseekV3Config(
        **{**BASE, "num_key_value_heads": 4}, num_experts_per_tok=2, intermediate_size=DENSE,
        moe_intermediate_size=I, n_routed_experts=8, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, norm_topk_prob=True, routed_scaling_factor=2.5)


def mixtral():
    return C.MixtralConfig(**BASE, num_experts_per_tok=2, head_dim=16, intermediate_size=I, num_local_experts=8)


EAGER = "eager experts: the trace keeps only the experts the example input hit"
SPECS = {
    "mixtral": Spec(mixtral),  # softmax -> top-k -> renormalise
    "deepseekv3": Spec(deepseek_v3),  # sigmoid + correction bias, group-limited top-k, routed scaling, shared
    "glm4moe": Spec(lambda: C.Glm4MoeConfig(  # as DeepSeek-V3, GLM's attention; no renormalisation
        **BASE, head_dim=16, num_experts_per_tok=2, intermediate_size=DENSE, moe_intermediate_size=I,
        n_routed_experts=8, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
        norm_topk_prob=False, routed_scaling_factor=1.5, use_qk_norm=True)),
    "ernie45moe": Spec(lambda: C.Ernie4_5_MoeConfig(  # softmax, top-k on softmax + bias, gathered, renormalised
        **BASE, intermediate_size=DENSE, moe_intermediate_size=I, moe_k=2, moe_num_experts=8,
        moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_interval=1, use_bias=False)),
    "hunyuanmoe": Spec(lambda: C.HunYuanMoEV1Config(  # softmax -> top-k -> renormalise, shared MLP
        **BASE, head_dim=16, intermediate_size=I, num_experts=8, num_local_experts=8, moe_topk=2)),
    "olmoe": Spec(lambda: C.OlmoeConfig(  # softmax -> top-k, not renormalised
        **BASE, num_experts_per_tok=2, intermediate_size=I, num_experts=8, norm_topk_prob=False)),
    "gptoss": Spec(lambda: C.GptOssConfig(  # GEMM2: interleaved gate_up with biases, clamped SwiGLU
        **{**BASE, "max_position_embeddings": 131072}, num_experts_per_tok=2, head_dim=16, intermediate_size=I,
        num_local_experts=8, sliding_window=32)),
    "eager-mixtral": Spec(mixtral, experts="eager", broken=EAGER, trace_tokens=2),
    "eager-deepseekv3": Spec(deepseek_v3, experts="eager", broken=EAGER, trace_tokens=2),
    "granitemoeshared": Spec(lambda: C.GraniteMoeSharedConfig(
        **BASE, num_experts_per_tok=2, intermediate_size=I, num_local_experts=8, shared_intermediate_size=DENSE),
        broken="split sizes per expert frozen at trace time (.tolist())"),
    "longcatflash": Spec(lambda: C.LongcatFlashConfig(  # 8 routed + 4 identity ("zero") experts
        **{**BASE, "num_key_value_heads": 4}, num_layers=1, ffn_hidden_size=DENSE, expert_ffn_hidden_size=I,
        moe_topk=2, n_routed_experts=8, zero_expert_num=4, q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16,
        qk_rope_head_dim=8, head_dim=8, v_head_dim=16, routed_scaling_factor=2.0),
        broken="expert ids frozen at trace time (.item())", trace_tokens=2),
}


# ---------------------------------------------------------------- model building and conversion
ROUTER = re.compile(r"(^|\.)(gate|router|wg|shared_expert_gate)(\.layer)?\.weight$|mlp\.gate\.weight$")


@torch.no_grad()
def realistic_init(model, seed=0):
    """As export_hf.py: routers redrawn with std 0.5 (random init leaves them near uniform) and every all-zero
    float bias or buffer given std 0.1, so nothing folds away. Score-correction biases (DeepSeek, GLM, ERNIE)
    are drawn positive: group-limited routers mask the other groups' scores to 0, and a negative biased score
    would tie with those zeros, where torch and OpenVINO may pick different experts."""
    g = torch.Generator().manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if ROUTER.search(name):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
        elif "correction_bias" in name:
            t.copy_(torch.rand(t.shape, generator=g) * 0.2)
        elif name.endswith("bias") and t.is_floating_point() and not t.any():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def build(spec: Spec):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(spec.config(), dtype=torch.float32).eval()
    realistic_init(model)
    return model


def compare(model, ovm: ov.Model, core: ov.Core | None = None) -> float:
    """Largest |logit difference| IR vs torch on fresh inputs: 1, 5 and 33 tokens, and a padded batch of 2."""
    compiled = (core or ov.Core()).compile_model(ovm, "CPU", F32)
    rng = np.random.default_rng(7)
    cases = [np.ones((1, n), np.int64) for n in (1, 5, 33)] + [np.array([[1] * 9, [0] * 3 + [1] * 6], np.int64)]
    worst = 0.0
    for mask in cases:
        ids = rng.integers(0, model.config.vocab_size, mask.shape)
        with torch.no_grad():
            want = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), use_cache=False).logits
        got = compiled({"input_ids": ids, "attention_mask": mask})[0]
        keep = mask.astype(bool)  # padded positions' logits are not defined
        diff = np.abs(got - want.numpy())[keep]
        worst = max(worst, float("inf") if np.isnan(diff).any() else float(diff.max()))
    return worst


def export(name: str, out_root: Path) -> Path:
    spec = SPECS[name]
    model = build(spec)
    ovm = convert_model(model, experts=spec.experts, tokens=spec.trace_tokens)
    if spec.broken:
        try:
            print(f"  {name}: broken on purpose ({spec.broken}); max |dlogit| = {compare(model, ovm):.3g}")
        except RuntimeError as error:
            lines = [line.strip() for line in str(error).splitlines() if line.strip()]
            reason = next((line for line in lines if "Check '" in line or "dimension" in line), lines[-1])
            print(f"  {name}: broken on purpose ({spec.broken}); fails on fresh input: {reason}")
    else:
        worst = compare(model, ovm)
        fused = ovm.clone()
        report = moe_fusion.fuse(fused)  # and the fused IR against torch too (FusedExperts needs moe_fusion)
        worst_fused = compare(model, fused, moe_fusion.core())
        print(f"  {name}: max |dlogit| vs torch = {worst:.3g}; fused {len(report.fused)}/{len(report.blocks)} "
              f"blocks, fused IR vs torch {worst_fused:.3g}")
        assert worst < TOLERANCE and worst_fused < TOLERANCE, f"{name}: IR differs from torch by {worst}"
    out = out_root / f"direct-{name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ov.save_model(ovm, out / "openvino_model.xml", compress_to_fp16=False)
    model.config.to_json_file(out / "config.json")
    return out


def verify_fixes() -> None:
    """Convert Mixtral without each fix and show the error, then with both."""
    model = build(SPECS["mixtral"])
    model.set_experts_implementation("batched_mm")
    for label, fixes in (("no mask fix", {"mask": False}), ("no packed-sequence fix", {"packed": False}),
                         ("both fixes", {})):
        for attention_mask in (True, False):
            try:
                if attention_mask:
                    convert_model(model, **fixes)
                else:  # a user tracing input_ids alone: masks are built from position ids
                    ids = torch.randint(0, 256, (1, 8))
                    with torch.no_grad(), conversion_fixes(**fixes):
                        ov.convert_model(_IdsOnly(model), example_input=(ids,))
                result = "converts"
            except Exception as error:  # the point is to print it
                lines = [line for line in str(error).splitlines() if line.strip()]
                result = "fails: " + next((line for line in lines if "aten::" in line or "Error" in line), lines[0])
            print(f"{label:24} {'with' if attention_mask else 'without'} attention_mask: {result[:200]}")


class _IdsOnly(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "fixtures")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--verify-fixes", action="store_true", help="show that both mask fixes are needed")
    ap.add_argument("names", nargs="*", help="spec names (default: all)")
    args = ap.parse_args()
    if args.list:
        print(*(f"{n:18} {s.experts:10} {s.broken}" for n, s in SPECS.items()), sep="\n")
        return
    if args.verify_fixes:
        verify_fixes()
        return
    for name in args.names or SPECS:
        if name not in SPECS:
            sys.exit(f"{name}: no such spec (have: {', '.join(SPECS)})")
        print(f"[ok] {name} -> {export(name, args.out)}")


if __name__ == "__main__":
    main()
