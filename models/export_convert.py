#!/usr/bin/env python
"""Deployable fixtures made by `moe-fusion convert`: `models/fixtures/deploy-<arch>/`, full folders
(stateful fused lowered IR, openvino tokenizer/detokenizer, configs, tokenizer files, fuse report) plus
`expected.json`: the greedy tokens transformers generated for a fixed prompt when the fixture was made.

    python models/export_convert.py [--out models/fixtures] [--keep-hf DIR] [names...]
    python models/export_convert.py --list

Each model is random-initialised from a tiny config (hidden 64, 2 layers, 8 experts, vocab 320; routers
redrawn with std 0.5 as models/README.md explains), saved as a Hugging Face folder with a byte-level BPE
tokenizer trained here with the `tokenizers` library (no hub), and converted with
`moe_fusion.convert.convert` (fp32 weights, lowered `tiled`: what `auto` chose when the first fixtures were
made, and a form the tiled family fuses again, which tests/test_lower.py needs to lower each fixture to every
target; `auto`'s `hybrid` hides its forms in an If). tests/test_convert_fixtures.py runs
the folders with openvino-genai's LLMPipeline (no torch needed) and compares with expected.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models.export_direct import realistic_init
from moe_fusion.convert import convert

C = transformers
VOCAB = 320
BASE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=512, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0)
I, DENSE = 40, 56  # expert / dense-or-shared intermediate sizes, as the other fixtures
PROMPT = "The quick brown fox jumps over the lazy dog because"
NEW_TOKENS = 12
LOWER = "tiled"
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route every token to a few experts out of many.",
    "OpenVINO runs the converted model on the CPU, with a key value cache held as states.",
    "A router picks the top experts; their outputs are weighted and summed.",
    "Because the dog was lazy, the fox jumped over it again and again.",
] * 4

SPECS = {
    "mixtral": lambda: C.MixtralConfig(**BASE, num_experts_per_tok=2, head_dim=16, intermediate_size=I,
                                       num_local_experts=8),
    "qwen3moe": lambda: C.Qwen3MoeConfig(**BASE, head_dim=16, num_experts_per_tok=2, moe_intermediate_size=I,
                                         intermediate_size=DENSE, num_experts=8, norm_topk_prob=True,
                                         decoder_sparse_step=1, mlp_only_layers=[]),
    "deepseekv3": lambda: C.DeepseekV3Config(
        **{**BASE, "num_key_value_heads": 4}, num_experts_per_tok=2, intermediate_size=DENSE,
        moe_intermediate_size=I, n_routed_experts=8, n_group=2, topk_group=1, n_shared_experts=1,
        first_k_dense_replace=0, q_lora_rank=32, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=16,
        v_head_dim=16, norm_topk_prob=True, routed_scaling_factor=2.5),
    "glm4moe": lambda: C.Glm4MoeConfig(
        **BASE, head_dim=16, num_experts_per_tok=2, intermediate_size=DENSE, moe_intermediate_size=I,
        n_routed_experts=8, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
        norm_topk_prob=False, routed_scaling_factor=1.5, use_qk_norm=True),
    "ernie45moe": lambda: C.Ernie4_5_MoeConfig(
        **BASE, intermediate_size=DENSE, moe_intermediate_size=I, moe_k=2, moe_num_experts=8,
        moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_interval=1, use_bias=False),
    "gptoss": lambda: C.GptOssConfig(
        **{**BASE, "max_position_embeddings": 131072}, num_experts_per_tok=2, head_dim=16, intermediate_size=I,
        num_local_experts=8, sliding_window=32),
    # sparsemixer router: two TopK passes, their ids concatenated (patterns/batched_mm.py `_router_topks`)
    "phimoe": lambda: C.PhimoeConfig(**BASE, num_experts_per_tok=2, intermediate_size=I, num_local_experts=8,
                                     sliding_window=None),
}


def tokenizer(folder: Path) -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE of VOCAB tokens trained on CORPUS: <pad> 0, <s> 1, </s> 2, as the configs say."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    bpe.train_from_iterator(CORPUS, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>",
                                                pad_token="<pad>")
    fast.save_pretrained(folder)
    return fast


def hf_folder(name: str, folder: Path) -> tuple[transformers.PreTrainedModel, transformers.PreTrainedTokenizerFast]:
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(SPECS[name](), dtype=torch.float32).eval()
    realistic_init(model)
    model.save_pretrained(folder)
    return model, tokenizer(folder)


def greedy(model, ids: list[int]) -> list[int]:
    """What transformers generates greedily (no stop token: the test asks genai for exactly as many)."""
    inputs = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(inputs, attention_mask=torch.ones_like(inputs), max_new_tokens=NEW_TOKENS,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def export(name: str, out_root: Path, keep_hf: Path | None = None) -> Path:
    with tempfile.TemporaryDirectory() as scratch:
        hf = (keep_hf / f"hf-{name}") if keep_hf else Path(scratch) / f"hf-{name}"
        shutil.rmtree(hf, ignore_errors=True)
        model, fast = hf_folder(name, hf)
        ids = fast(PROMPT)["input_ids"]
        expected = {"prompt": PROMPT, "prompt_ids": ids, "tokens": greedy(model, ids),
                    "transformers": transformers.__version__, "torch": torch.__version__}
        out = out_root / f"deploy-{name}"
        report = convert(hf, out, lower=LOWER, force=True)
        print(f"  {report.summary()}")
        (out / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "fixtures")
    ap.add_argument("--keep-hf", type=Path, help="also keep the Hugging Face folders here (hf-<name>)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("names", nargs="*", help="spec names (default: all)")
    args = ap.parse_args()
    if args.list:
        print(*SPECS, sep="\n")
        return
    for name in args.names or SPECS:
        if name not in SPECS:
            sys.exit(f"{name}: no such spec (have: {', '.join(SPECS)})")
        print(f"[ok] {name} -> {export(name, args.out, args.keep_hf)}")


if __name__ == "__main__":
    main()
