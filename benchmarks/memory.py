"""Peak memory of `moe-fusion fuse` on a model with several GB of f16 expert weights.

Builds LAYERS per-expert-loop MoE layers at Qwen3-30B-A3B's shape (H 2048, I 768, 128 experts, top-8; f16
weights behind a decompression Convert, 1.2 GB per layer, every expert distinct) chained with residual
adds, saves the IR, then runs `moe-fusion fuse` on it in a subprocess while sampling its /proc status:
peak RssAnon (anonymous memory: what fusing itself allocates, summed with the proof's worker processes) and
peak RSS (which also counts the
memory-mapped input and the file-backed stacked weights, both evictable page cache).

    python benchmarks/memory.py [--layers 7] [--dir /tmp/moe-memory] [--verify]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from models import bench_models


def _random_f16(path: Path, shape: tuple[int, ...], fan_in: int, rng: np.random.Generator) -> np.ndarray:
    """A file-backed f16 array of distinct random values, filled an expert at a time (little RAM)."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=shape)
    for e in range(shape[0]):
        array[e] = rng.standard_normal(shape[1:], dtype=np.float32) / np.sqrt(fan_in)
    return array


def build(folder: Path, layers: int) -> Path:
    shape = bench_models.SHAPES["qwen3"]
    e, h, i = shape.experts, shape.hidden, shape.intermediate
    rng = np.random.default_rng(0)
    # constants share the memory-mapped arrays instead of copying them into RAM
    bench_models._const = lambda array: ops.constant(np.ascontiguousarray(array), shared_memory=True).output(0)
    hidden = ops.parameter([-1, -1, h], np.float32, name="hidden_states")
    x, keep = hidden.output(0), []
    for layer in range(layers):
        weights = bench_models.LayerWeights(
            shape,
            "f16",
            _random_f16(folder / f"gate{layer}.npy", (e, i, h), h, rng),
            _random_f16(folder / f"up{layer}.npy", (e, i, h), h, rng),
            _random_f16(folder / f"down{layer}.npy", (e, h, i), i, rng),
            (rng.standard_normal((e, h), dtype=np.float32) * 0.5 / np.sqrt(h)).astype(np.float32),
        )
        block = bench_models.loop_layer(weights)
        keep.append((block, weights))
        (param,) = block.get_parameters()
        for target in list(param.output(0).get_target_inputs()):
            target.replace_source_output(x)
        x = ops.add(x, block.get_results()[0].input_value(0)).output(0)
    xml = folder / f"qwen3-loop-{layers}l.xml"
    ov.save_model(ov.Model([x], [hidden], "memory-bench"), xml, compress_to_fp16=False)
    for f in folder.glob("*.npy"):
        f.unlink()
    return xml


def tree(pid: int) -> list[int]:
    """`pid` and its descendants (the proof's and check's worker processes)."""
    found, stack = [], [pid]
    while stack:
        process = stack.pop()
        found.append(process)
        try:
            for task in os.listdir(f"/proc/{process}/task"):
                with open(f"/proc/{process}/task/{task}/children") as children:
                    stack.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def usage(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and Pss (bytes) of `pid` and its descendants, summed. RSS counts a file page once per
    process that maps it (workers reading the parent's weight files); Pss shares it out, so its sum is what
    the processes hold together."""
    total = {"VmRSS": 0, "RssAnon": 0, "Pss": 0}
    for process in tree(pid):
        try:
            for name in ("status", "smaps_rollup"):
                with open(f"/proc/{process}/{name}") as lines:
                    for line in lines:
                        key, _, rest = line.partition(":")
                        if key in total:
                            total[key] += int(rest.split()[0]) * 1024
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


@dataclass
class Measured:
    seconds: float
    anon: int  # peak RssAnon, summed over the process and its descendants
    rss: int  # peak RSS, the same way
    code: int
    last_line: str  # of stdout (else stderr)


def measure(command: list[str], check: bool = True) -> Measured:
    """Run `command`, sampling its process tree's /proc status every 20 ms."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = {"RssAnon": 0, "VmRSS": 0}

    def sample() -> None:
        while process.poll() is None:
            for key, value in usage(process.pid).items():
                if key in peak:
                    peak[key] = max(peak[key], value)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = process.communicate()
    sampler.join()
    if process.returncode and check:
        raise SystemExit(f"{' '.join(command)} exited with {process.returncode}: {err.strip()[-300:]}")
    line = (out.strip() or err.strip()).splitlines()[-1:] or [""]
    return Measured(time.perf_counter() - start, peak["RssAnon"], peak["VmRSS"], process.returncode, line[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-memory"))
    parser.add_argument("--verify", action="store_true", help="also measure with the per-block proof")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    xml = args.dir / f"qwen3-loop-{args.layers}l.xml"
    if not xml.exists():
        start = time.perf_counter()
        xml = build(args.dir, args.layers)
        print(f"built {xml} in {time.perf_counter() - start:.0f} s")
    gb = 1e9
    print(f"input .bin {xml.with_suffix('.bin').stat().st_size / gb:.2f} GB ({args.layers} layers x 128 experts, f16)")
    runs = [("--no-verify", ["--no-verify"])] + ([("verify", [])] if args.verify else [])
    for label, extra in runs:
        out = args.dir / f"fused-{label.strip('-')}.xml"
        cli = [sys.executable, "-c", "from moe_fusion.cli import main; main()"]
        command = [*cli, "fuse", str(xml), "-o", str(out), "--force", *extra]
        run = measure(command)
        seconds, anon, rss = run.seconds, run.anon, run.rss
        size = out.with_suffix(".bin").stat().st_size / gb
        print(
            f"fuse {label}: {seconds:.1f} s, peak RssAnon {anon / gb:.2f} GB, peak RSS {rss / gb:.2f} GB, "
            f"fused .bin {size:.2f} GB"
        )
    os.sync()


if __name__ == "__main__":
    main()
