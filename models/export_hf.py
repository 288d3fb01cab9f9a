#!/usr/bin/env python
"""Export tiny, random-initialised Hugging Face MoE models to OpenVINO IR fixtures.

Runs in either exporter generation (see models/README.md for the two venvs):
  gen1 = transformers 4.57 + optimum-intel 1.27, gen2 = transformers 5.x + optimum-intel 2.2.
The generation is detected from the installed transformers; only the matching specs are exported.

    python models/export_hf.py --out models/fixtures [names...]
    python models/export_hf.py --list

Every model is built from a config object (no hub access), its routers and zero biases are
re-initialised (see `realistic_init`), it is saved with save_pretrained to a temp folder and exported
from that folder with optimum-intel's `main_export`, which is what
`optimum-cli export openvino -m <dir> --task text-generation-with-past --weight-format fp32 <out>` calls
(checked: byte-identical IR). Specs that need a registration or a patch do it in-process before
`main_export`. `--hf-only` just writes the Hugging Face folders (<out>/<gen>-<name>-hf) for the CLI.
"""
import argparse
import contextlib
import re
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

GEN = "gen2" if int(transformers.__version__.split(".")[0]) >= 5 else "gen1"
KEEP = ("openvino_model.xml", "openvino_model.bin", "config.json", "generation_config.json")

# Tiny shapes shared by all specs: hidden 64, 2 layers, 4 heads x 16, 2 kv heads, 8 experts of width 40.
# Sizes are pairwise distinct (H 64, I 40, 2I 80, kv 32, dense/shared 56, E 8, V 256) so that a weight's
# shape tells which axis is which (with I = 32 a fused gate_up [.., 2I, H] would be square).
I, DENSE = 40, 56
BASE = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False)


@dataclass
class Spec:
    gens: tuple                      # exporter generations the spec is exported under
    config: Callable[[], "transformers.PretrainedConfig"]
    setup: Callable | None = None  # context manager factory: registration / patches around the export
    post_init: Callable | None = None  # extra weight edits after realistic_init


# ---------------------------------------------------------------- registrations and patches
@contextlib.contextmanager
def register_olmoe():
    """optimum-intel has no 'olmoe' export config: register it with the Llama one (a user's workaround)."""
    from optimum.exporters.openvino.model_configs import LlamaOpenVINOConfig, register_in_tasks_manager

    @register_in_tasks_manager("olmoe", "text-generation", "text-generation-with-past", library_name="transformers")
    class OlmoeOpenVINOConfig(LlamaOpenVINOConfig):
        pass

    yield


@contextlib.contextmanager
def register_deepseek_v3():
    """optimum-intel 1.27 refuses deepseek_v3 on transformers > 4.53.3, and its DeepseekPatcher targets the
    remote-code model. Re-register it with the MLA-aware dummy cache generator (k head dim = nope + rope,
    v head dim = v_head_dim) of MiniCPM3, no version cap and the plain decoder patcher (native HF attention).
    Also drop the eager `if token_indices.numel() > 0` skip in DeepseekV3MoE.moe: tracing with it keeps only
    the experts hit by the dummy input."""
    from optimum.exporters.openvino.model_configs import MiniCPM3OpenVINOConfig, register_in_tasks_manager
    from optimum.exporters.openvino.model_patcher import OVDecoderModelPatcher
    from transformers.models.deepseek_v3 import modeling_deepseek_v3 as m

    @register_in_tasks_manager("deepseek_v3", "text-generation", "text-generation-with-past",
                               library_name="transformers")
    class DeepseekV3OpenVINOConfig(MiniCPM3OpenVINOConfig):
        MAX_TRANSFORMERS_VERSION = None
        _MODEL_PATCHER = OVDecoderModelPatcher

    def moe_all_experts(self, hidden_states, topk_indices, topk_weights):
        # Same as transformers 4.57 DeepseekV3MoE.moe minus the data-dependent skip of empty experts.
        final = torch.zeros_like(hidden_states, dtype=topk_weights.dtype)
        expert_mask = torch.nn.functional.one_hot(topk_indices, num_classes=len(self.experts)).permute(2, 0, 1)
        for expert_idx, expert in enumerate(self.experts):
            token_indices, weight_indices = torch.where(expert_mask[expert_idx])
            out = expert(hidden_states[token_indices]) * topk_weights[token_indices, weight_indices].unsqueeze(-1)
            final.index_add_(0, token_indices, out)
        return final.type(hidden_states.dtype)

    orig = m.DeepseekV3MoE.moe
    m.DeepseekV3MoE.moe = moe_all_experts
    try:
        yield
    finally:
        m.DeepseekV3MoE.moe = orig


def zero_expert_biases(model):
    """GPT-OSS variant: expert biases exactly zero (as in a random init) so the exporter may fold them."""
    for name, p in model.named_parameters():
        if re.search(r"experts\.(gate_up_proj|down_proj)_bias$", name):
            torch.nn.init.zeros_(p)


# ---------------------------------------------------------------- config builders
C = transformers
TOP2 = dict(num_experts_per_tok=2)


def qwen3moe_config(norm):
    return C.Qwen3MoeConfig(**BASE, **TOP2, head_dim=16, intermediate_size=DENSE, moe_intermediate_size=I,
                            num_experts=8, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=norm)


def gptoss_config():
    # max_position_embeddings as in the release, so YaRN's implicit factor matches its default factor 32
    return C.GptOssConfig(**{**BASE, "max_position_embeddings": 131072}, **TOP2, head_dim=16,
                          intermediate_size=I, num_local_experts=8, sliding_window=32)


SPECS = {
    "mixtral": Spec(("gen1", "gen2"), lambda: C.MixtralConfig(
        **BASE, **TOP2, head_dim=16, intermediate_size=I, num_local_experts=8)),
    "qwen2moe": Spec(("gen1", "gen2"), lambda: C.Qwen2MoeConfig(
        **BASE, **TOP2, intermediate_size=DENSE, moe_intermediate_size=I, num_experts=8,
        shared_expert_intermediate_size=DENSE, decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)),
    "qwen3moe": Spec(("gen1", "gen2"), lambda: qwen3moe_config(norm=False)),
    "qwen3moe-norm": Spec(("gen1", "gen2"), lambda: qwen3moe_config(norm=True)),
    "phimoe": Spec(("gen1", "gen2"), lambda: C.PhimoeConfig(
        **BASE, **TOP2, intermediate_size=I, num_local_experts=8)),
    "olmoe": Spec(("gen1",), lambda: C.OlmoeConfig(
        **BASE, **TOP2, intermediate_size=I, num_experts=8, norm_topk_prob=False),
        setup=register_olmoe),
    "deepseekv3": Spec(("gen1",), lambda: C.DeepseekV3Config(
        **{**BASE, "num_key_value_heads": 4}, **TOP2, intermediate_size=DENSE, moe_intermediate_size=I,
        n_routed_experts=8, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
        q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16, v_head_dim=16,
        norm_topk_prob=True, routed_scaling_factor=2.5),
        setup=register_deepseek_v3),
    "granitemoe": Spec(("gen1", "gen2"), lambda: C.GraniteMoeConfig(
        **BASE, **TOP2, intermediate_size=I, num_local_experts=8)),
    "llama4": Spec(("gen1",), lambda: C.Llama4TextConfig(   # top-1, shared expert, every layer MoE
        **BASE, head_dim=16, intermediate_size=I, intermediate_size_mlp=DENSE, num_local_experts=8,
        num_experts_per_tok=1, interleave_moe_layer_step=1)),
    "gptoss": Spec(("gen1", "gen2"), gptoss_config),
    "gptoss-zerobias": Spec(("gen1", "gen2"), gptoss_config, post_init=zero_expert_biases),
}


# ---------------------------------------------------------------- model building
ROUTER = re.compile(r"(^|\.)(gate|router|shared_expert_gate)(\.layer)?\.weight$")


@torch.no_grad()
def realistic_init(model, seed=0):
    """Random init leaves routers near uniform (std 0.02) and biases at exactly 0, which the exporter (or
    OpenVINO's constant folding) may fold away. Real checkpoints have neither: give routers std 0.5 and
    every all-zero bias (parameters and buffers, e.g. DeepSeek's e_score_correction_bias) std 0.1."""
    g = torch.Generator().manual_seed(seed)
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    for name, t in tensors:
        if ROUTER.search(name):
            t.copy_(torch.randn(t.shape, generator=g) * 0.5)
        elif name.endswith("bias") and t.is_floating_point() and not t.any():
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)


def build(name, spec, folder):
    torch.manual_seed(0)
    config = spec.config()
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    realistic_init(model)
    if spec.post_init:
        spec.post_init(model)
    model.save_pretrained(folder)
    return model


# --weight-format variants and the quantization config `optimum-cli export openvino --weight-format W [--sym]
# [--group-size G] --ratio 1.0 --group-size-fallback adjust` builds for them (NNCF data-free compression,
# applied by optimum's _main_quantize after the fp32 export, as the CLI does). The fixture is named
# <gen>-<spec>-<variant>. "adjust": expert down projections have 40 input channels, which no group of
# 16/32 divides, so NNCF keeps them at its int8_asym backup, as it does for such layers in real models.
WEIGHT_FORMATS = {
    "fp16": None,
    "int8-sym": dict(bits=8, sym=True, group_size=-1),
    "int8-asym": dict(bits=8, sym=False, group_size=-1),
    "int4-g16-sym": dict(bits=4, sym=True, group_size=16),
    "int4-g16-asym": dict(bits=4, sym=False, group_size=16),
    "int4-g32-sym": dict(bits=4, sym=True, group_size=32),
    "int4-g32-asym": dict(bits=4, sym=False, group_size=32),
}


def quantization_config(weight_format):
    options = dict(WEIGHT_FORMATS[weight_format])
    dtype = f"int{options['bits']}"
    return {**options, "ratio": 1.0, "dtype": dtype, "quant_method": "default", "group_size_fallback": "adjust"}


def export(name, spec, out_root, hf_only=False, weight_format=None):
    from optimum.exporters.openvino import main_export
    from optimum.exporters.openvino.__main__ import _main_quantize
    from optimum.intel import OVConfig

    out = Path(out_root) / (f"{GEN}-{name}" + (f"-{weight_format}" if weight_format else ""))
    if hf_only:
        build(name, spec, out.with_name(out.name + "-hf"))
        return out.with_name(out.name + "-hf")
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "hf", Path(tmp) / "ov"
        build(name, spec, src)
        dtype = "fp16" if weight_format == "fp16" else "fp32"
        with (spec.setup() if spec.setup else contextlib.nullcontext()):
            # == optimum-cli export openvino --task text-generation-with-past --weight-format fp32 src dst
            main_export(model_name_or_path=str(src), output=dst, task="text-generation-with-past",
                        ov_config=OVConfig(dtype=dtype), convert_tokenizer=False, library_name="transformers")
            if WEIGHT_FORMATS.get(weight_format):
                _main_quantize(model_name_or_path=str(src), task="text-generation-with-past",
                               library_name="transformers", quantization_config=quantization_config(weight_format),
                               output=dst, cache_dir=str(Path(tmp) / "cache"))
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        for f in KEEP:
            if (dst / f).exists():
                shutil.copy(dst / f, out / f)
    return out


def build_olmoe_block():
    from transformers.models.olmoe.modeling_olmoe import OlmoeSparseMoeBlock

    torch.manual_seed(0)
    config = SPECS["olmoe"].config()
    block = OlmoeSparseMoeBlock(config).eval()
    realistic_init(block)
    return config, block


def convert_olmoe_block(out_root):
    """Direct ov.convert_model of one OlmoeSparseMoeBlock (gen1): OLMoE's eager loop has no skip of empty
    experts, so tracing keeps all of them. Sequence (and batch) dims are left dynamic."""
    import openvino as ov

    config, block = build_olmoe_block()
    x = torch.randn(1, 8, config.hidden_size)
    with torch.no_grad():
        ovm = ov.convert_model(block, example_input=(x,), input=[ov.PartialShape([-1, -1, config.hidden_size])])
    out = Path(out_root) / "convert-olmoe-block"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    ov.save_model(ovm, out / "openvino_model.xml", compress_to_fp16=False)
    config.to_json_file(out / "config.json")
    return out


EXTRA = {"convert-olmoe-block": ("gen1", convert_olmoe_block)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).parent / "fixtures"))
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--hf-only", action="store_true", help="only save the HF source folders")
    ap.add_argument("--weight-format", choices=sorted(WEIGHT_FORMATS), help="compressed export (default fp32)")
    ap.add_argument("names", nargs="*", help=f"spec names (default: all for {GEN})")
    args = ap.parse_args()
    mine = [n for n, s in SPECS.items() if GEN in s.gens] + [n for n, (g, _) in EXTRA.items() if g == GEN]
    if args.list:
        print(GEN, *mine, sep="\n  ")
        return
    names = [n.removeprefix(GEN + "-") for n in args.names] or mine
    failed = []
    for n in names:
        if n not in mine:
            sys.exit(f"{n}: not a {GEN} spec (have: {', '.join(mine)})")
        if n in EXTRA and args.hf_only:
            continue
        try:
            if n in EXTRA:
                out = EXTRA[n][1](args.out)
            else:
                out = export(n, SPECS[n], args.out, args.hf_only, args.weight_format)
            print(f"[ok] {n} -> {out}")
        except Exception as e:  # keep going: record failures, export the rest
            failed.append(n)
            print(f"[FAILED] {n}: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
