"""Fuse every committed fixture once: blocks fused/skipped, family, fuse time (verification included),
and the saved .bin size against the original's (no weight may be stored twice).

    python benchmarks/fuse_fixtures.py [--no-verify]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import moe_fusion
from moe_fusion.io import load, save

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-verify", action="store_true")
    args = parser.parse_args()
    print("| fixture | family | fused | skipped | fuse s | weights MB original | fused .bin / original |")
    print("|---|---|---|---|---|---|---|")
    for folder in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        model = load(folder)
        start = time.perf_counter()
        report = moe_fusion.fuse(model, verify=not args.no_verify)
        seconds = time.perf_counter() - start
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "fused"
            save(model, folder, out)
            fused_bin = sum(p.stat().st_size for p in out.rglob("*.bin"))
        # ONNX fixtures hold their weights inside model.onnx
        original_bin = sum(p.stat().st_size for p in folder.iterdir() if p.suffix in (".bin", ".onnx"))
        families = ",".join(sorted({b.family for b in report.blocks})) or "-"
        print(
            f"| {folder.name} | {families} | {len(report.fused)} | {len(report.skipped)} | {seconds:.2f} | "
            f"{original_bin / 1e6:.2f} | {fused_bin / max(original_bin, 1):.3f} |"
        )


if __name__ == "__main__":
    main()
