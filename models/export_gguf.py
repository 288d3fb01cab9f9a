#!/usr/bin/env python
"""One Qwen3-30B-A3B-shaped decoder layer as a Hugging Face folder and as llama.cpp GGUF files (BF16 and
Q4_0), for timing llama.cpp beside our OpenVINO forms on the same expert weights (benchmarks/lowering.py
--peer-dir, benchmarks/peer_llamacpp.py).

    python models/export_gguf.py OUT_DIR [--llama-cpp LLAMA_CPP_SOURCE_DIR] [--seed 0]

writes into OUT_DIR:
  qwen3moe-1l/                 HF folder: Qwen3MoeForCausalLM, 1 layer, hidden 2048, 32 query / 4 KV heads of
                               128 (Qwen3-30B-A3B's attention), 128 experts of width 768, top-8, norm_topk_prob,
                               vocab 512; random init with a fixed seed (std 0.02, routers 0.5 as
                               models/export_scale_hf.py), bf16 safetensors; a byte-level BPE tokenizer of 512
                               tokens trained here (convert_hf_to_gguf.py needs one; llama-bench feeds random ids)
  qwen3moe-1l-attn1/           the same model with one query and one KV head: identical embeddings, norms, router
                               and experts (copied), attention weights 1/16 of the size, so llama.cpp's time is
                               the MoE's nearly alone (32-head attention reads 38 MB per decoded token, half
                               again the 75 MB of its 8 experts)
  <name>-bf16.gguf             convert_hf_to_gguf.py --outtype bf16 (the HF tensors, bit for bit)
  <name>-q4_0.gguf             llama-quantize <name>-bf16.gguf Q4_0 (needs <src>/build/bin/llama-quantize)

Without --llama-cpp only the HF folders are written. The llama.cpp source tree must hold gguf-py installed
into this python (`pip install LLAMA_CPP_SOURCE_DIR/gguf-py`). The converter checks the tokenizer against
known pre-tokenizers by hash; this tokenizer is none of them, so it is run with `get_vocab_base_pre`
answering "qwen2" (the pre-tokenizer only matters to text input, which the benchmark does not use).

`hf_layer_weights(folder, weight_type)` reads the layer's router and experts from the folder into
models/bench_models.py's LayerWeights (f16: the bf16 values, exact but for the few below f16's normal
range, |x| < 6.1e-5, 0.02% of them, which lose low bits; int4: those quantised by
bench_models' asymmetric group-128 scheme, as NNCF's int4_asym), so benchmarks/lowering.py builds its forms
from the same weights the GGUF holds.

Regenerating (as measured in docs/lowering.md, llama.cpp b11434 built in /work/peer/llama.cpp):
    python models/export_gguf.py /work/peer/gguf --llama-cpp /work/peer/llama.cpp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.bench_models import LayerShape, LayerWeights, _quantize_int4

NAME = "qwen3moe-1l"
VOCAB = 512


def config(heads: int = 32, kv_heads: int = 4):
    from models.export_scale_hf import config as scale_config

    cfg = scale_config(1, VOCAB)
    cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv_heads
    return cfg


def tokenizer():
    """A byte-level BPE of VOCAB tokens (the byte alphabet, merges learnt from a little text, <|endoftext|>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = (__doc__ + " the quick brown fox jumps over the lazy dog 0123456789 ") * 20
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 3, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([text], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def write_hf(out: Path, seed: int) -> list[Path]:
    import torch
    import transformers

    folders = []
    torch.manual_seed(seed)
    shared = None
    for suffix, heads, kv_heads in (("", 32, 4), ("-attn1", 1, 1)):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config(heads, kv_heads), dtype=torch.bfloat16)
        model = model.to_empty(device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "norm" in name:
                    p.fill_(1.0)
                elif shared is not None and name in shared and shared[name].shape == p.shape:
                    p.copy_(shared[name])  # the 1-head variant: everything but attention copied
                else:
                    p.normal_(0.0, 0.5 if name.endswith("mlp.gate.weight") else 0.02)
        if shared is None:
            shared = {n: p.detach().clone() for n, p in model.named_parameters() if "self_attn" not in n}
        folder = out / f"{NAME}{suffix}"
        model.save_pretrained(folder)
        tokenizer().save_pretrained(folder)
        size = sum(p.numel() * p.element_size() for p in model.parameters())
        count = sum(p.numel() for p in model.parameters())
        print(f"{folder}: {count / 1e6:.0f} M parameters, {size / 1e9:.2f} GB bf16", flush=True)
        folders.append(folder)
        del model
    return folders


_CONVERT = """
import sys
sys.path.insert(0, {src!r})
sys.path.insert(1, {gguf!r})
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def write_gguf(folder: Path, src: Path) -> list[Path]:
    bf16 = folder.parent / f"{folder.name}-bf16.gguf"
    q4 = folder.parent / f"{folder.name}-q4_0.gguf"
    script = _CONVERT.format(src=str(src), gguf=str(src / "gguf-py"),
                             args=[str(folder), "--outtype", "bf16", "--outfile", str(bf16)])
    subprocess.run([sys.executable, "-c", script], check=True, cwd=src)
    quantize = src / "build" / "bin" / "llama-quantize"
    subprocess.run([str(quantize), str(bf16), str(q4), "Q4_0"], check=True)
    for path in (bf16, q4):
        print(f"{path}: {path.stat().st_size / 1e9:.3f} GB", flush=True)
    return [bf16, q4]


def _tensors(folder: Path) -> dict:
    """The layer's router and expert tensors, torch bf16, by HF name (per-expert or stacked, as saved)."""
    from safetensors import safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                if ".mlp." in key:
                    tensors[key] = f.get_tensor(key)
    return tensors


def hf_layer_weights(folder: Path, weight_type: str = "f16") -> LayerWeights:
    """The first layer's router and experts as LayerWeights (`[E, out, in]` f16; int4 quantised here)."""
    import torch

    cfg = json.loads((Path(folder) / "config.json").read_text())
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5 writes num_local_experts
    shape = LayerShape("Qwen3-30B-A3B (HF)", cfg["hidden_size"], cfg["moe_intermediate_size"], experts,
                       cfg["num_experts_per_tok"], bool(cfg["norm_topk_prob"]))
    t = _tensors(Path(folder))
    prefix = "model.layers.0.mlp."
    router = t[prefix + "gate.weight"].float().numpy()
    if prefix + "experts.gate_up_proj" in t:  # stacked [E, 2I, H] and [E, H, I]
        gate_up = t[prefix + "experts.gate_up_proj"]
        i = shape.intermediate
        gate, up, down = gate_up[:, :i], gate_up[:, i:], t[prefix + "experts.down_proj"]
    else:
        def stack(part: str) -> torch.Tensor:
            return torch.stack([t[f"{prefix}experts.{e}.{part}.weight"] for e in range(shape.experts)])
        gate, up, down = stack("gate_proj"), stack("up_proj"), stack("down_proj")
    mats = [m.to(torch.float16).contiguous().numpy() for m in (gate, up, down)]
    # bf16 -> f16 is exact but for values below f16's normal range (|x| < 6.1e-5), which keep fewer bits
    inexact = sum(int((torch.from_numpy(m).to(torch.bfloat16) != ref).sum())
                  for m, ref in zip(mats, (gate, up, down), strict=True))
    print(f"{folder}: experts bf16 -> f16: {inexact} of {sum(m.size for m in mats)} values not exact "
          "(f16 subnormals, |x| < 6.1e-5)", flush=True)
    if weight_type == "f16":
        return LayerWeights(shape, "f16", *mats, router)
    scales, packed = {}, []
    for name, w in zip(("gate", "up", "down"), mats, strict=True):
        q, scale, zero = _quantize_int4(w, symmetric=weight_type == "int4-sym")
        scales[name] = (scale, zero)
        packed.append(q)
    return LayerWeights(shape, weight_type, *packed, router, scales)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source dir (built llama-quantize in build/bin)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folders = write_hf(args.out, args.seed)
    if args.llama_cpp:
        for folder in folders:
            write_gguf(folder, args.llama_cpp.resolve())


if __name__ == "__main__":
    main()
