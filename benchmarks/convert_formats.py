#!/usr/bin/env python
"""What each `--weight-format` costs and how accurate it is, on Hugging Face folders (e.g. those
`models/export_convert.py --keep-hf DIR` writes).

    python benchmarks/convert_formats.py HF_DIR [HF_DIR...] [--formats fp32,fp16,int8,int4]

Per folder and format: conversion wall time, openvino_model.bin size, and against the torch f32 model on a
fixed 32-token prompt: the largest logit difference relative to the logits' scale (OpenVINO at f32
inference, KV cache f32, dynamic quantisation off, so only the stored weights differ), and how many of 16
greedy tokens openvino-genai (default backend, default CPU settings) generates as transformers does, counted
up to the first difference.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino_genai
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_fusion.convert import convert  # noqa: E402
from moe_fusion.convert.proof import F32  # noqa: E402

NEW = 16


def logits_error(out: Path, model, ids: np.ndarray) -> float:
    compiled = ov.Core().compile_model(out / "openvino_model.xml", "CPU", F32)
    request = compiled.create_infer_request()
    got = request.infer({"input_ids": ids, "attention_mask": np.ones_like(ids),
                         "position_ids": np.arange(ids.shape[1])[None], "beam_idx": np.zeros(1, np.int32)})["logits"]
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids)).logits.numpy()
    return float(np.abs(got - want).max() / max(1.0, np.abs(want).max()))


def agreement(out: Path, want: list[int], ids: np.ndarray) -> int:
    pipe = openvino_genai.LLMPipeline(str(out), "CPU")
    config = pipe.get_generation_config()
    config.max_new_tokens, config.do_sample, config.ignore_eos = NEW, False, True
    config.eos_token_id, config.stop_token_ids = 1 << 30, {1 << 30}
    got = list(pipe.generate(openvino_genai.TokenizedInputs(ov.Tensor(ids), ov.Tensor(np.ones_like(ids))),
                             config).tokens[0])
    same = 0
    while same < NEW and got[same] == want[same]:
        same += 1
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", type=Path, nargs="+")
    ap.add_argument("--formats", default="fp32,fp16,int8,int4")
    args = ap.parse_args()
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")
    print("| model | format | convert s | .bin KB | max logit error / scale | greedy tokens equal (of 16) |")
    print("|---|---|---|---|---|---|")
    for folder in args.folders:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        ids = np.random.default_rng(0).integers(3, model.config.vocab_size, (1, 32)).astype(np.int64)
        with torch.no_grad():
            want = model.generate(torch.from_numpy(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                                  max_new_tokens=NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
        want = want[0, ids.shape[1]:].tolist()
        for weight_format in args.formats.split(","):
            with tempfile.TemporaryDirectory() as scratch:
                out = Path(scratch) / "out"
                start = time.perf_counter()
                convert(folder, out, weight_format=weight_format)
                seconds = time.perf_counter() - start
                size = (out / "openvino_model.bin").stat().st_size / 1024
                print(f"| {folder.name} | {weight_format} | {seconds:.1f} | {size:.0f} | "
                      f"{logits_error(out, model, ids):.1e} | {agreement(out, want, ids)} |", flush=True)


if __name__ == "__main__":
    main()
