"""Fusing at scale: Qwen3-30B-A3B's layout (128 experts, top-8, per-expert loop) at tiny hidden size, with
12, 24 and 48 layers, exported by optimum-intel 1.x (the gen1 venv, see models/README.md). 48 layers give
~284k ops and 6,144 NonZero. For each size: OpenVINO's own read and save time, `fuse --no-verify` (read +
fuse + save, in process), `fuse` with the per-block proofs, and compile time of the fused model.

    python benchmarks/scale.py [--layers 12 24 48] [--dir /tmp/moe-scale] [--gen1-python PATH]
                               [--compile-original]   # OpenVINO needs ~6 min to compile the 48-layer original
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

import openvino as ov

import moe_fusion
from moe_fusion.io import load, save

ROOT = Path(__file__).resolve().parent.parent
EXPORT = """
import sys
sys.path.insert(0, {models!r})
import export_hf as E
config = lambda: E.C.Qwen3MoeConfig(**{{**E.BASE, "num_hidden_layers": {layers}}}, num_experts_per_tok=8,
    head_dim=16, intermediate_size=E.DENSE, moe_intermediate_size=E.I, num_experts=128, decoder_sparse_step=1,
    mlp_only_layers=[], norm_topk_prob=False)
print(E.export("qwen3moe-{layers}l-128e", E.Spec(("gen1",), config), {out!r}))
"""


def export(layers: int, folder: Path, python: str) -> Path:
    target = folder / f"gen1-qwen3moe-{layers}l-128e"
    if not (target / "openvino_model.xml").exists():
        start = time.perf_counter()
        script = EXPORT.format(models=str(ROOT / "models"), layers=layers, out=str(folder))
        subprocess.run([python, "-c", script], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print(f"exported {target.name} in {time.perf_counter() - start:.0f} s")
    return target


def timed(action, *args) -> tuple[float, object]:
    start = time.perf_counter()
    result = action(*args)
    return time.perf_counter() - start, result


def fuse_job(folder: Path, target: Path, verify: bool) -> tuple[object, float]:
    """What `moe-fusion fuse` does: read, fuse, save; timed."""
    start = time.perf_counter()
    model = load(folder)
    report = moe_fusion.fuse(model, verify=verify)
    save(model, folder, target)
    return report, time.perf_counter() - start


def measure(layers: int, folder: Path, tmp: Path, compile_original: bool) -> str:
    core = moe_fusion.core()
    xml = folder / "openvino_model.xml"
    read_s, model = timed(ov.Core().read_model, xml)
    ops = len(model.get_ordered_ops())
    nonzero = sum(n.get_type_name() == "NonZero" for n in model.get_ordered_ops())
    save_s, _ = timed(ov.save_model, model, tmp / "copy.xml", False)
    del model
    report, fuse_s = fuse_job(folder, tmp / "fast", verify=False)
    verified, verify_s = fuse_job(folder, tmp / "verified", verify=True)
    assert len(report.fused) == layers and len(verified.fused) == layers, report.table()
    fused = core.read_model(tmp / "fast" / "openvino_model.xml")
    compile_s, _ = timed(core.compile_model, fused, "CPU")
    original_compile = f"{timed(core.compile_model, xml, 'CPU')[0]:.0f}" if compile_original else "-"
    return (
        f"| {layers} | {ops} | {nonzero} | {read_s:.1f} | {save_s:.1f} | {fuse_s:.1f} | "
        f"{fuse_s / (read_s + save_s):.2f} | {verify_s:.1f} | {len(fused.get_ordered_ops())} | {compile_s:.1f} | "
        f"{original_compile} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-scale"))
    parser.add_argument("--gen1-python", default="/work/venvs/gen1/bin/python")
    parser.add_argument("--compile-original", action="store_true")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        folder = export(layers, args.dir, args.gen1_python)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            rows.append(measure(layers, folder, Path(tmp), args.compile_original))
        print(rows[-1], flush=True)
    print("| layers | ops | NonZero | OV read s | OV save s | fuse --no-verify s (read+fuse+save) | / (OV read+save) "
          "| fuse with proofs s | fused ops | fused compile s | original compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
