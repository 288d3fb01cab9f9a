#!/usr/bin/env python
"""One decoder layer at a real MoE model's shape (Qwen3-30B-A3B or Mixtral-8x7B) as a Hugging Face folder and
as llama.cpp GGUF files (BF16 and Q4_0), for timing llama.cpp beside our OpenVINO forms on the same expert
weights (benchmarks/lowering.py --peer-dir, benchmarks/peer_llamacpp.py).

    python models/export_gguf.py OUT_DIR [--layer qwen3|mixtral] [--llama-cpp LLAMA_CPP_SOURCE_DIR] [--seed 0]

writes into OUT_DIR, for `--layer qwen3` (the default):
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

and for `--layer mixtral` the same four as mixtral-1l*: MixtralForCausalLM, 1 layer at Mixtral-8x7B's dims
(hidden 4096, 32 query / 8 KV heads of 128, 8 experts of width 14336, top-2, renormalised), same vocab, init
(but its router, `block_sparse_moe.gate`, is drawn at std 0.02 like the other weights: the 0.5 rule matches
Qwen3's `mlp.gate` only; the GGUFs timed in docs/lowering.md were made so, and top-2 routes 2 experts a token
either way) and tokenizer (2.9 GB bf16; its 32-head attention reads 84 MB per decoded token beside the 705 MB of its 2
experts; the attn1 variant 2 MB). transformers 5 saves Mixtral's experts per expert, as the released
checkpoint (`block_sparse_moe.experts.N.w1/w2/w3`: gate, down, up), Qwen3's per expert as `mlp.experts.N.*`.

Without --llama-cpp only the HF folders are written. The llama.cpp source tree must hold gguf-py installed
into this python (`pip install LLAMA_CPP_SOURCE_DIR/gguf-py`). The converter checks the tokenizer against
known pre-tokenizers by hash; this tokenizer is none of them, so it is run with `get_vocab_base_pre`
answering "qwen2" (the pre-tokenizer only matters to text input, which the benchmark does not use); for
Mixtral the converter's SentencePiece attempt is told there is no tokenizer.model, so it falls back to this
BPE (its attempt imports sentencepiece, not needed here, before looking for the file).

`hf_layer_weights(folder, weight_type)` reads the layer's router and experts from the folder into
models/bench_models.py's LayerWeights (f16: the bf16 values, exact but for the few below f16's normal
range, |x| < 6.1e-5, 0.02% of them, which lose low bits; int4 / int4-sym: those quantised by bench_models'
group-128 schemes, as NNCF's int4_asym / int4_sym), so benchmarks/lowering.py builds its forms from the same
weights the GGUF holds.

Regenerating (as measured in docs/lowering.md, llama.cpp b11434 built in /work/peer/llama.cpp):
    python models/export_gguf.py /work/peer/gguf --llama-cpp /work/peer/llama.cpp
    python models/export_gguf.py /work/peer/gguf --layer mixtral --llama-cpp /work/peer/llama.cpp
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.bench_models import SHAPES, LayerShape, LayerWeights, _quantize_int4

VOCAB = 512
# --layer -> (folder name, query / KV heads of the full model); the -attn1 variant has one of each
LAYERS = {"qwen3": ("qwen3moe-1l", 32, 4), "mixtral": ("mixtral-1l", 32, 8)}
_MODEL_TYPES = {"qwen3_moe": "qwen3", "mixtral": "mixtral"}  # config.json model_type -> bench_models.SHAPES


def folder_name(layer: str) -> str:
    return LAYERS[layer][0]


def config(layer: str = "qwen3", heads: int | None = None, kv_heads: int | None = None):
    """The 1-layer config at `layer`'s real shape (bench_models.SHAPES), with heads of 128."""
    import transformers

    from models.export_scale_hf import config as scale_config

    _, full_heads, full_kv = LAYERS[layer]
    if layer == "qwen3":
        cfg = scale_config(1, VOCAB)
    else:
        s = SHAPES[layer]
        cfg = transformers.MixtralConfig(
            vocab_size=VOCAB, hidden_size=s.hidden, intermediate_size=s.intermediate, num_hidden_layers=1,
            head_dim=128, num_local_experts=s.experts, num_experts_per_tok=s.top_k, max_position_embeddings=4096,
            tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.num_attention_heads = full_heads if heads is None else heads
    cfg.num_key_value_heads = full_kv if kv_heads is None else kv_heads
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


def write_hf(out: Path, seed: int, layer: str = "qwen3") -> list[Path]:
    import torch
    import transformers

    folders = []
    torch.manual_seed(seed)
    shared = None
    for suffix, heads, kv_heads in (("", None, None), ("-attn1", 1, 1)):
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config(layer, heads, kv_heads),
                                                                  dtype=torch.bfloat16)
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
        folder = out / f"{folder_name(layer)}{suffix}"
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
def no_sentencepiece(self):  # Llama/Mixtral try SentencePiece first and import it before looking for its file
    raise FileNotFoundError("no tokenizer.model: a byte-level BPE tokenizer")
base.TextModel._create_vocab_sentencepiece = no_sentencepiece
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
                if ".mlp." in key or ".block_sparse_moe." in key:
                    tensors[key] = f.get_tensor(key)
    return tensors


# per-expert names as saved: mlp.experts.N.gate_proj (Qwen3) or block_sparse_moe.experts.N.w1 (Mixtral)
_PARTS = {"mlp": ("gate_proj", "up_proj", "down_proj"), "block_sparse_moe": ("w1", "w3", "w2")}


def hf_layer_weights(folder: Path, weight_type: str = "f16") -> LayerWeights:
    """The first layer's router and experts as LayerWeights (`[E, out, in]` f16; int4 quantised here)."""
    import torch

    cfg = json.loads((Path(folder) / "config.json").read_text())
    base = SHAPES[_MODEL_TYPES[cfg["model_type"]]]
    experts = cfg.get("num_experts", cfg.get("num_local_experts"))  # transformers 5 writes num_local_experts
    width = cfg.get("moe_intermediate_size", cfg["intermediate_size"])  # Qwen3: the dense MLP's is also there
    shape = LayerShape(f"{base.name} (HF)", cfg["hidden_size"], width, experts, cfg["num_experts_per_tok"],
                       bool(cfg.get("norm_topk_prob", base.normalize)))  # Mixtral always renormalises
    t = _tensors(Path(folder))
    block = "mlp" if "model.layers.0.mlp.gate.weight" in t else "block_sparse_moe"
    prefix = f"model.layers.0.{block}."
    router = t.pop(prefix + "gate.weight").float().numpy()
    if prefix + "experts.gate_up_proj" in t:  # stacked [E, 2I, H] and [E, H, I]
        gate_up = t.pop(prefix + "experts.gate_up_proj")
        i = shape.intermediate
        gate, up, down = gate_up[:, :i], gate_up[:, i:], t.pop(prefix + "experts.down_proj")
    else:
        def stack(part: str) -> torch.Tensor:
            return torch.stack([t.pop(f"{prefix}experts.{e}.{part}.weight") for e in range(shape.experts)])
        gate, up, down = (stack(part) for part in _PARTS[block])
    if t:
        raise ValueError(f"{folder}: unexpected MoE tensors {sorted(t)[:4]}")
    mats = []
    inexact = 0
    for ref in (gate, up, down):  # one matrix at a time (Mixtral: 0.94 GB bf16 each)
        mats.append(ref.to(torch.float16).contiguous().numpy())
        # bf16 -> f16 is exact but for values below f16's normal range (|x| < 6.1e-5), which keep fewer bits
        inexact += int((torch.from_numpy(mats[-1]).to(torch.bfloat16) != ref).sum())
    del gate, up, down, ref
    print(f"{folder}: experts bf16 -> f16: {inexact} of {sum(m.size for m in mats)} values not exact "
          "(f16 subnormals, |x| < 6.1e-5)", flush=True)
    if weight_type == "f16":
        return LayerWeights(shape, "f16", *mats, router)
    scales, packed = {}, []
    for name in ("gate", "up", "down"):
        w = mats.pop(0)
        # a few experts at a time: quantising a whole Mixtral matrix needs ~8 GB of f32 temporaries
        step = max(1, shape.experts // 8)
        parts = [_quantize_int4(w[e:e + step], symmetric=weight_type == "int4-sym")
                 for e in range(0, shape.experts, step)]
        del w
        q, scale = (np.concatenate([part[j] for part in parts]) for j in (0, 1))
        zero = None if parts[0][2] is None else np.concatenate([part[2] for part in parts])
        scales[name] = (scale, zero)
        packed.append(q)
    return LayerWeights(shape, weight_type, *packed, router, scales)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--layer", choices=sorted(LAYERS), default="qwen3")
    ap.add_argument("--llama-cpp", type=Path, help="llama.cpp source dir (built llama-quantize in build/bin)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    folders = write_hf(args.out, args.seed, args.layer)
    if args.llama_cpp:
        for folder in folders:
            write_gguf(folder, args.llama_cpp.resolve())


if __name__ == "__main__":
    main()
