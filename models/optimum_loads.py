#!/usr/bin/env python
"""Does optimum-intel's OVModelForCausalLM load a `moe-fusion convert` folder and generate what transformers does?

optimum-intel (2.2.0, the newest) pins transformers < 5.6, so this runs in a venv of its own:

    python -m venv /tmp/oi && /tmp/oi/bin/pip install torch==2.13.0 "optimum-intel[openvino]" "transformers<5.6"
    /tmp/oi/bin/pip uninstall -y torchvision      # PyPI's torchvision does not import beside this torch
    /tmp/oi/bin/python models/optimum_loads.py OUT HF_MODEL_DIR

Greedy tokens of one prompt and of a left-padded batch of 2, from OVModelForCausalLM (f32 inference, f32 KV
cache: the CPU's default u8 cache moves logits by ~1e-3, enough to flip a near-tie of a random tiny model) and
from the torch model; exit 1 when they differ.
"""

from __future__ import annotations

import sys

import torch
import transformers
from optimum.intel import OVModelForCausalLM

F32 = {"INFERENCE_PRECISION_HINT": "f32", "KV_CACHE_PRECISION": "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": "0"}


def greedy(model, ids: torch.Tensor, mask: torch.Tensor, new: int) -> list[list[int]]:
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    return out[:, ids.shape[1]:].tolist()


def main() -> None:
    out, hf = sys.argv[1], sys.argv[2]
    ov_model = OVModelForCausalLM.from_pretrained(out, ov_config=F32)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    prompt = torch.tensor([[5, 17, 33, 90, 12, 64, 7]])
    batch = torch.tensor([[0, 0, 5, 17, 33], [9, 8, 7, 6, 5]])
    cases = {"prompt": (prompt, torch.ones_like(prompt)), "left-padded batch": (batch, (batch != 0).long())}
    same = True
    for name, (ids, mask) in cases.items():
        got, want = greedy(ov_model, ids, mask, 6), greedy(torch_model, ids, mask, 6)
        print(f"{name}: OVModelForCausalLM {got}, transformers {want}: {'equal' if got == want else 'DIFFER'}")
        same &= got == want
    print(f"stateful: {ov_model.stateful}; transformers {transformers.__version__}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
