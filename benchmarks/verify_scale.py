"""Verification at real scale: the default (proven) `moe-fusion fuse`, and `moe-fusion check`, on MoE layers at
real models' shapes, against what OpenVINO itself takes to read and save the same model.

Builds per-expert loop layers (the optimum-intel 1.x export form; every expert's weights distinct, f16 behind
a Convert marked `decompression` as `--weight-format fp16` exports are, or NNCF-style asymmetric int4 with
group 128) at Qwen3-30B-A3B's shape (H 2048, I 768, 128 experts, top-8) and Mixtral-8x7B's (H 4096, I 14336,
8 experts, top-2), and a chain of several Qwen3 layers (memory must be bounded by one layer, not the model).
Each command runs in a subprocess; its peak RssAnon is summed over it and its worker processes.

    python benchmarks/verify_scale.py [--models qwen3-f16,qwen3-int4,mixtral-f16,mixtral-int4,qwen3-f16-x4]
                                      [--dir /tmp/moe-verify] [--no-check]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import measure

from models import bench_models
from moe_fusion.compressed import mark_decompression

MODELS = ("qwen3-f16", "qwen3-int4", "mixtral-f16", "mixtral-int4", "qwen3-f16-x4")
GB = 1e9


def _marked(model: ov.Model) -> ov.Model:
    """f16 weights' Converts marked `decompression`, as exporters write them (unmarked, the CPU plugin folds
    them into f32 copies)."""
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Convert":
            continue
        source = node.input_value(0)
        if source.get_element_type() == ov.Type.f16 and source.get_node().get_type_name() == "Constant":
            mark_decompression(node)
    return model


def build(name: str, folder: Path) -> Path:
    """The model `name` (shape-weights[-xLAYERS]) as an IR in `folder`, built once."""
    xml = folder / f"{name}.xml"
    if xml.exists():
        return xml
    shape, weight_type, *rest = name.split("-")
    layers = int(rest[0][1:]) if rest else 1
    hidden = ops.parameter([-1, -1, bench_models.SHAPES[shape].hidden], np.float32, name="hidden_states")
    x, keep = hidden.output(0), []
    for layer in range(layers):
        weights = bench_models.layer_weights(bench_models.SHAPES[shape], weight_type, seed=layer, distinct=True)
        block = _marked(bench_models.loop_layer(weights))
        keep.append((block, weights))
        (param,) = block.get_parameters()
        for target in list(param.output(0).get_target_inputs()):
            target.replace_source_output(x)
        x = ops.add(x, block.get_results()[0].input_value(0)).output(0)  # residual, as in a decoder
    ov.save_model(ov.Model([x], [hidden], name), xml, compress_to_fp16=False)
    return xml


def read_save_seconds(xml: Path, out: Path, repeats: int = 3) -> float:
    """Median wall time of OpenVINO's own read_model + save_model of the model (in a fresh process each)."""
    code = (
        "import sys, openvino as ov; m = ov.Core().read_model(sys.argv[1]); "
        "ov.save_model(m, sys.argv[2], compress_to_fp16=False)"
    )
    times = [measure([sys.executable, "-c", code, str(xml), str(out)])[0] for _ in range(repeats)]
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-verify"))
    parser.add_argument("--no-check", action="store_true", help="skip `moe-fusion check`")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-c", "from moe_fusion.cli import main; main()"]
    rows = []
    for name in args.models.split(","):
        start = time.perf_counter()
        xml = build(name, args.dir)
        size = xml.with_suffix(".bin").stat().st_size
        print(f"{name}: {size / GB:.2f} GB .bin (built in {time.perf_counter() - start:.0f} s)", flush=True)
        baseline = read_save_seconds(xml, args.dir / "resaved.xml")
        fused = args.dir / f"{name}-fused.xml"
        seconds, anon, _rss, code = measure([*cli, "fuse", str(xml), "-o", str(fused), "--force"], check=False)
        rows.append((name, "fuse (proven)", size, baseline, seconds, anon, code))
        if not args.no_check and code == 0:
            seconds, anon, _rss, code = measure([*cli, "check", str(xml), str(fused)], check=False)
            rows.append((name, "check", size, baseline, seconds, anon, code))
        for f in (args.dir / "resaved.xml", args.dir / "resaved.bin"):
            f.unlink(missing_ok=True)

    print(f"\nCPU: {_cpu()}")
    print("| model | command | .bin GB | OV read+save s | wall s | / (read+save) | peak RssAnon GB | / .bin | exit |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, command, size, baseline, seconds, anon, code in rows:
        print(
            f"| {name} | {command} | {size / GB:.2f} | {baseline:.2f} | {seconds:.1f} | {seconds / baseline:.1f}x "
            f"| {anon / GB:.2f} | {anon / size:.2f}x | {code} |"
        )


def _cpu() -> str:
    flags, model = "", ""
    with open("/proc/cpuinfo") as info:
        for line in info:
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line
    amx = "AMX" if "amx_tile" in flags else "no AMX"
    bf16 = "avx512_bf16" if "avx512_bf16" in flags else "no avx512_bf16"
    return f"{model}, {os.cpu_count()} cores, {amx}, {bf16}"


if __name__ == "__main__":
    main()
