#!/usr/bin/env python
"""bf16 checkpoints through `moe-fusion convert`'s 16-bit route (moe_fusion/convert/storage.py), per architecture.

    python models/sweep_bf16.py [names...]      # default: every spec of export_convert.py and export_convert_recent.py

Each fixture spec (tiny, random, routers as the fixtures) is saved as a bf16 checkpoint, converted (fp32 weights,
lowered `tiled`) and run by openvino-genai's LLMPipeline; its greedy tokens are compared with transformers' on
the same checkpoint loaded in f32. Prints one line per architecture: proof error, blocks fused, tokens equal.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]
from test_convert import greedy_genai  # noqa: E402

from models.export_convert import SPECS  # noqa: E402
from models.export_convert_recent import RECENT  # noqa: E402
from moe_fusion.convert import convert  # noqa: E402

NEW = 8


def model_class(name: str):
    return transformers.Mistral4ForCausalLM if name == "mistral4" else transformers.AutoModelForCausalLM


def one(name: str, config, root: Path) -> str:
    torch.manual_seed(0)
    cls = model_class(name)
    model = cls.from_config(config, dtype=torch.float32) if cls is transformers.AutoModelForCausalLM else cls(config)
    with torch.no_grad():  # routers drawn wider than init (models/README.md)
        for key, p in model.named_parameters():
            if key.endswith(("mlp.gate.weight", "router.weight")) and p.dim() == 2:
                p.copy_(torch.randn(p.shape) * 0.5)
    model.to(torch.bfloat16).save_pretrained(root / "hf")
    ids = np.random.default_rng(3).integers(3, 300, (1, 9)).astype(np.int64)
    reference = model_class(name).from_pretrained(root / "hf", dtype=torch.float32).eval()
    with torch.no_grad():
        want = reference.generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                  max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    report = convert(root / "hf", root / "out", weight_format="fp32", lower="tiled")
    got = greedy_genai(root / "out", ids, NEW)
    fused = len(report.fuse.fused)
    return (f"{name}: proof {report.proof_worst:.1e}, fused {fused}/{fused + len(report.fuse.skipped)}, "
            f"genai tokens {'equal' if got == want[0, ids.shape[1]:].tolist() else 'DIFFER'}")


def main() -> None:
    specs = {**SPECS, **RECENT}
    for name in sys.argv[1:] or specs:
        with tempfile.TemporaryDirectory() as scratch:
            try:
                print(one(name, specs[name](), Path(scratch)), flush=True)
            except Exception as error:  # one line per architecture, whatever fails
                print(f"{name}: FAILED {type(error).__name__}: {str(error).splitlines()[0][:300]}", flush=True)


if __name__ == "__main__":
    main()
