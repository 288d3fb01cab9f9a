"""FusedExperts' numpy kernel at a real layer shape against a dense all-experts formulation.

    python benchmarks/kernel.py [--hidden 2048 --intermediate 768 --experts 128 --top-k 8 --runs 5]

Qwen3-30B-A3B's MoE layer by default (f32 weights, ~2.4 GB). Prints the median of --runs timings for
T=1 (decode) and T=128 (prefill), and the dense/sparse ratio, both measured in this run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_fusion.reference import expert_forward, fused_experts


def dense(x, routing_weights, topk_indices, weights):
    """Every expert on every token, weighted by the dense [T, E] routing matrix (zeros mostly)."""
    tokens, num_experts = x.shape[0], weights[0].shape[0]
    dense_weights = np.zeros((tokens, num_experts), np.float32)
    np.add.at(dense_weights, (np.arange(tokens)[:, None], topk_indices), routing_weights)
    out = np.zeros_like(x)
    for e in range(num_experts):
        out += dense_weights[:, e : e + 1] * expert_forward(x, [w[e] for w in weights], "gemm3_swiglu")
    return out


def median_ms(fn, runs: int) -> float:
    fn()  # warm-up: first touch of the weights' pages
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    h, i, e, k = args.hidden, args.intermediate, args.experts, args.top_k

    rng = np.random.default_rng(0)
    weights = [
        rng.standard_normal((e, h, i), dtype=np.float32) / float(np.sqrt(h)),
        rng.standard_normal((e, h, i), dtype=np.float32) / float(np.sqrt(h)),
        rng.standard_normal((e, i, h), dtype=np.float32) / float(np.sqrt(i)),
    ]
    gb = sum(w.nbytes for w in weights) / 1e9
    print(f"layer H={h} I={i} E={e} K={k}, f32 weights {gb:.2f} GB, median of {args.runs} runs")
    print(f"{'tokens':>6} {'sparse ms':>10} {'dense ms':>10} {'dense/sparse':>13}")
    for tokens in (1, 128):
        x = rng.standard_normal((tokens, h), dtype=np.float32)
        idx = np.argsort(rng.random((tokens, e)), axis=1)[:, :k]
        rw = rng.random((tokens, k)).astype(np.float32)
        rw /= rw.sum(1, keepdims=True)
        sparse_ms = median_ms(lambda: fused_experts(x, rw, idx, weights), args.runs)  # noqa: B023
        dense_ms = median_ms(lambda: dense(x, rw, idx, weights), args.runs)  # noqa: B023
        a, b = fused_experts(x, rw, idx, weights), dense(x, rw, idx, weights)
        assert np.allclose(a, b, rtol=1e-4, atol=1e-4 * np.abs(b).max()), "sparse and dense disagree"
        print(f"{tokens:>6} {sparse_ms:>10.1f} {dense_ms:>10.1f} {dense_ms / sparse_ms:>12.1f}x")


if __name__ == "__main__":
    main()
