#!/usr/bin/env python
"""Deployable fixtures of MoE architectures that need transformers >= 5.6 (optimum-intel 2.2 cannot export
them: it requires transformers < 5.6), made by models/export_convert.py's recipe with these specs:

    python models/export_convert_recent.py [--out models/fixtures] [names...]

| fixture | what it adds to the 5.5-era fixtures |
|---|---|
| deploy-minimaxm2 | MiniMax-M2: qk-norm over all heads, sigmoid router with correction bias, partial RoPE |
| deploy-mistral4 | Mistral 4: MLA with YaRN RoPE; no AutoModelForCausalLM mapping (loaded by `architectures`) |
| deploy-exaonemoe | EXAONE-MoE: sliding and full layers (window 4 < the 11-token prompt), a shared expert |
| deploy-cohere2moe | Cohere2-MoE: sliding and full layers (window 4), no RoPE on the full layer |

The sliding windows are smaller than the prompt on purpose: under openvino-genai's default PagedAttention
backend the window survives only if the traced mask has the shape OpenVINO reads it from
(moe_fusion/convert/patches.py); tests/test_convert_fixtures.py runs every deploy-* folder that way.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import export_convert
from models.export_direct import realistic_init

C = transformers
BASE, I, DENSE = export_convert.BASE, export_convert.I, export_convert.DENSE

RECENT = {
    "minimaxm2": lambda: C.MiniMaxM2Config(**BASE, head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                                           intermediate_size=I),
    "mistral4": lambda: C.Mistral4Config(
        **{**BASE, "num_key_value_heads": 4}, intermediate_size=DENSE, moe_intermediate_size=I,
        n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
        first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
        v_head_dim=16, head_dim=16, qk_head_dim=16),
    "exaonemoe": lambda: C.ExaoneMoeConfig(
        **BASE, head_dim=16, intermediate_size=DENSE, moe_intermediate_size=I, num_experts=8,
        num_experts_per_tok=2, num_shared_experts=1, first_k_dense_replace=0, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"]),
    "cohere2moe": lambda: C.Cohere2MoeConfig(
        **BASE, head_dim=16, intermediate_size=I, num_experts=8, num_experts_per_tok=2, sliding_window=4,
        layer_types=["sliding_attention", "full_attention"], mlp_layer_types=["sparse", "sparse"]),
}


def hf_folder(name: str, folder: Path):
    """export_convert.hf_folder, with the model class the config's `architectures` names (Mistral 4 has no
    AutoModelForCausalLM mapping)."""
    torch.manual_seed(0)
    config = export_convert.SPECS[name]()
    cls = transformers.AutoModelForCausalLM
    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, cls)
    if name == "mistral4":
        cls = transformers.Mistral4ForCausalLM
    model = (cls.from_config(config, dtype=torch.float32) if cls is transformers.AutoModelForCausalLM
             else cls(config).to(torch.float32)).eval()
    realistic_init(model)
    model.save_pretrained(folder)
    return model, export_convert.tokenizer(folder)


def main() -> None:
    export_convert.SPECS.clear()
    export_convert.SPECS.update(RECENT)
    export_convert.hf_folder = hf_folder
    export_convert.main()


if __name__ == "__main__":
    main()
