#!/usr/bin/env python
"""Peak memory and time of `moe-fusion convert` at a real layer shape.

    python models/export_scale_hf.py /tmp/scale-hf                      # 2 layers at Qwen3-30B-A3B's MoE dims
    flock /tmp/moe-mem.lock python benchmarks/convert_scale.py /tmp/scale-hf [--weight-format fp32] [--out DIR]

Runs `moe-fusion convert` in a child process and samples every 0.1 s the RSS, RssAnon and Pss of it and of
all its descendants (the conversion proof's process, the fuse proofs' workers), summed (benchmarks/memory.py
`usage`). Prints the stages' times from the report, the peaks per stage, and the peaks relative to the model's
bf16 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.memory import usage  # noqa: E402


def bf16_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("hf", type=Path)
    ap.add_argument("--weight-format", default="fp32")
    ap.add_argument("--lower", default="auto")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="convert-scale-")) / "out"
    command = [sys.executable, "-c", "from moe_fusion.cli import main; main()", "convert", str(args.hf), "-o",
               str(out), "--weight-format", args.weight_format, "--lower", args.lower, "--force"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_rss = peak_anon = peak_pss = 0
    stages: dict[str, list[int]] = {}  # progress message -> peak RSS, RssAnon, Pss until the next one
    stage, lines = "start", []
    os.set_blocking(child.stderr.fileno(), False)
    while child.poll() is None:
        now = usage(child.pid)
        rss, anon, pss = now["VmRSS"], now["RssAnon"], now["Pss"]
        peak_rss, peak_anon, peak_pss = max(peak_rss, rss), max(peak_anon, anon), max(peak_pss, pss)
        seen = stages.setdefault(stage, [0, 0, 0])
        seen[:] = max(seen[0], rss), max(seen[1], anon), max(seen[2], pss)
        for line in iter(child.stderr.readline, ""):
            lines.append(line)
            stage = line.strip()[:60]
        time.sleep(0.1)
    wall = time.perf_counter() - start
    stdout, rest = child.communicate()
    stderr = "".join(lines) + rest
    for name, (rss, anon, pss) in stages.items():
        print(f"  {name:60} peak RSS {rss / 1e9:6.2f} GB, RssAnon {anon / 1e9:6.2f} GB, Pss {pss / 1e9:6.2f} GB")
    if child.returncode:
        sys.exit(f"convert failed ({child.returncode}): {stderr.strip().splitlines()[-1]}")
    report = json.loads((out / "moe_fusion_report.json").read_text())
    model = bf16_bytes(args.hf)
    print(stdout.strip().splitlines()[-1])
    print(f"load average: {Path('/proc/loadavg').read_text().strip()}")
    print(f"wall {wall:.1f} s; stages {report['conversion']['seconds']}")
    print(f"model bf16 {model / 1e9:.2f} GB; peak RSS {peak_rss / 1e9:.2f} GB = {peak_rss / model:.2f}x; "
          f"peak RssAnon {peak_anon / 1e9:.2f} GB = {peak_anon / model:.2f}x; "
          f"peak Pss {peak_pss / 1e9:.2f} GB = {peak_pss / model:.2f}x")
    print(f"per billion parameters: {wall / (model / 2e9):.1f} s, peak RSS {peak_rss / (model / 2):.2f} GB")
    print(f"output .bin {(out / 'openvino_model.bin').stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
