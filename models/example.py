"""Bundled example: build a small MoE layer as FusedExperts and as plain per-expert ops, save the fused
model as IR, read it back with moe_fusion and check both agree.

    python models/example.py [--out out/example]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere in the checkout

import moe_fusion
from models.synthetic import Router, fused_model, random_experts, unfused_model

F32 = {"INFERENCE_PRECISION_HINT": "f32"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("out/example"))
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    experts = random_experts(num_experts=8, hidden_size=64, intermediate_size=32, seed=0)
    router = Router(rng.standard_normal((64, 8)).astype(np.float32), top_k=2)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "fused_experts.xml"
    ov.save_model(fused_model(experts, router), path, compress_to_fp16=False)  # keep f32 weights exact
    fused = moe_fusion.read_model(path)
    unfused = unfused_model(experts, router)

    x = rng.standard_normal((16, 64)).astype(np.float32)
    got = moe_fusion.core().compile_model(fused, "CPU", F32)(x)[0]
    want = moe_fusion.core().compile_model(unfused, "CPU", F32)(x)[0]
    err = float(np.abs(got - want).max())
    ops = len(unfused.get_ordered_ops()), len(fused.get_ordered_ops())
    print(f"MoE layer: 8 experts, top-2, hidden 64, intermediate 32 -> {path}")
    print(f"ops: {ops[0]} unfused -> {ops[1]} with FusedExperts; max |difference| on 16 tokens: {err:.2e}")
    ok = err <= 1e-5 * max(1.0, float(np.abs(want).max()))
    print("equivalent" if ok else "NOT equivalent")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
