"""Verification at real scale: the default (proven) `moe-fusion fuse`, and `moe-fusion check` in each mode, on
MoE layers at real models' shapes, against what OpenVINO itself takes to read and save the same model.

Builds per-expert loop layers (the optimum-intel 1.x export form; every expert's weights distinct, f16 behind
a Convert marked `decompression` as `--weight-format fp16` exports are, or NNCF-style asymmetric int4 with
group 128) at Qwen3-30B-A3B's shape (H 2048, I 768, 128 experts, top-8) and Mixtral-8x7B's (H 4096, I 14336,
8 experts, top-2), and a chain of several Qwen3 layers (memory must be bounded by one layer, not the model).
`fuse` runs with its proof, as users run it; then `check ORIGINAL FUSED --mode M` for the fused model and its
lowered form. Each command runs in a subprocess; its peak RssAnon is summed over it and its worker processes.

    python benchmarks/verify_scale.py [--models qwen3-f16,qwen3-int4,mixtral-f16,mixtral-int4,qwen3-f16-x4]
                                      [--modes whole,layers] [--forms fused,lowered] [--tokens 1,16,64]
                                      [--dir /tmp/moe-verify] [--before CHECKOUT]

`--before` also runs another checkout's `fuse` and `check` (e.g. the commit before this work) on the same
files, as the baseline.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from memory import Measured, measure  # noqa: E402

from models import bench_models  # noqa: E402
from moe_fusion.compressed import mark_decompression  # noqa: E402

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
    times = [measure([sys.executable, "-c", code, str(xml), str(out)]).seconds for _ in range(repeats)]
    for f in (out, out.with_suffix(".bin")):
        f.unlink(missing_ok=True)
    return statistics.median(times)


def cli(*args: str, checkout: Path = ROOT) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(checkout)!r}); from moe_fusion.cli import main; main()"
    return [sys.executable, "-c", code, *args]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default="whole,layers", help="check modes; empty: no check")
    parser.add_argument("--forms", default="fused,lowered", help="what check compares the original with")
    parser.add_argument("--tokens", default="1,16,64")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-verify"))
    parser.add_argument("--before", type=Path, help="a checkout of moe-fusion whose fuse and check are the baseline")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    checkouts = [("", ROOT), *([(" (before)", args.before)] if args.before else [])]
    print(f"CPU: {_cpu()}; load {os.getloadavg()[0]:.2f}")
    print("| model | .bin GB | command | OV read+save s | wall s | / (read+save) | peak RssAnon GB | / .bin | result |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        xml = build(name, args.dir)
        size = xml.with_suffix(".bin").stat().st_size
        baseline = read_save_seconds(xml, args.dir / "resaved.xml")
        row = functools.partial(_row, name, size, baseline)

        forms = {"fused": args.dir / f"{name}-fused.xml", "lowered": args.dir / f"{name}-lowered.xml"}
        for label, checkout in checkouts:
            run = measure(cli("fuse", str(xml), "-o", str(forms["fused"]), "--force", checkout=checkout), check=False)
            row(f"fuse (proven){label}", run)
        if "lowered" in args.forms:
            measure(cli("lower", str(forms["fused"]), "-o", str(forms["lowered"]), "--force"))
        for form in [f for f in args.forms.split(",") if f and forms[f].exists()]:
            for mode in [m for m in args.modes.split(",") if m]:
                command = cli("check", str(xml), str(forms[form]), "--tokens", args.tokens, "--mode", mode)
                row(f"check {form} --mode {mode}", measure(command, check=False))
            if args.before:
                command = cli("check", str(xml), str(forms[form]), "--tokens", args.tokens, checkout=args.before)
                row(f"check {form} (before)", measure(command, check=False))


def _row(name: str, size: int, baseline: float, command: str, run: Measured) -> None:
    result = {0: "ok"}.get(run.code, f"exit {run.code}: {run.last_line[:90]}")
    print(f"| {name} | {size / GB:.2f} | {command} | {baseline:.2f} | {run.seconds:.1f} | "
          f"{run.seconds / baseline:.1f}x | {run.anon / GB:.2f} | {run.anon / size:.2f}x | {result} |", flush=True)


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
