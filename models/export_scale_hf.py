#!/usr/bin/env python
"""A Hugging Face folder at a real MoE layer shape, for measuring `moe-fusion convert` at scale
(benchmarks/convert_scale.py): Qwen3-30B-A3B's dims (hidden 2048, 32 query / 4 KV heads of 128,
moe_intermediate 768, 128 experts, top-8) with 2 layers and the vocabulary cut to 16384 (the real 151936
would add 1.1 GB of embeddings that say nothing about the MoE layers). Random weights, saved as bf16
safetensors as released checkpoints are (2.56 GB).

    python models/export_scale_hf.py OUT_DIR [--layers 2] [--vocab 16384]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers


def config(layers: int, vocab: int) -> transformers.Qwen3MoeConfig:
    return transformers.Qwen3MoeConfig(
        vocab_size=vocab, hidden_size=2048, num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4,
        head_dim=128, moe_intermediate_size=768, intermediate_size=6144, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=16384)
    args = ap.parse_args()
    torch.manual_seed(0)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config(args.layers, args.vocab), dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    with torch.no_grad():  # init std 0.02 as transformers does; routers wider (models/README.md)
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.02)
    model.save_pretrained(args.out)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"{args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, {size / 1e9:.2f} GB bf16")


if __name__ == "__main__":
    main()
