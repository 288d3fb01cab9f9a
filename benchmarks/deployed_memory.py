"""Runtime memory of a deployed (saved, then read) model per lowered form: what a user's process holds.

    python benchmarks/deployed_memory.py [--layer qwen3|mixtral] [--weights f16|int4]
                                         [--forms native,cpu,per-expert,...] [--precision bf16,f32]

Each form is saved as IR (weights as stored: f16 behind marked Converts, or u4), then read, compiled and run
(a prefill of 128 tokens and 8 decode steps) in a fresh process per form and precision, so nothing of one
form's run lingers in another's numbers. The child reports its peak RssAnon (sampled every 2 ms: anonymous
memory is what the plugin allocated, the file-backed pages of the read IR are not counted in it, as the kernel
may drop them), peak RSS (VmHWM), and compile time. The parent prints them next to the stored weight bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _status() -> dict[str, int]:
    values = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


def child(path: str, precision: str, hidden: int) -> None:
    """Read, compile and run one saved form; print its memory and compile time as one JSON line."""
    import numpy as np
    import openvino as ov

    peak = {"anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak["anon"] = max(peak["anon"], _status()["RssAnon"])
            time.sleep(0.002)

    watcher = threading.Thread(target=sample, daemon=True)
    watcher.start()
    core = ov.Core()
    start = time.perf_counter()
    model = core.read_model(path)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": precision})
    compile_s = time.perf_counter() - start
    del model
    request = compiled.create_infer_request()
    rng = np.random.default_rng(0)
    start = time.perf_counter()
    request.infer({0: rng.standard_normal((1, 128, hidden), dtype=np.float32)})
    prefill_s = time.perf_counter() - start
    for _ in range(8):
        request.infer({0: rng.standard_normal((1, 1, hidden), dtype=np.float32)})
    after = _status()
    done.set()
    watcher.join()
    print(json.dumps({"compile_s": compile_s, "peak_anon": max(peak["anon"], after["RssAnon"]),
                      "hwm": after["VmHWM"], "anon_end": after["RssAnon"], "file_end": after["RssFile"],
                      "first_prefill_s": prefill_s}))


def save_forms(layer: str, weights_type: str, forms: list[str], out: Path) -> tuple[dict[str, Path], int, int]:
    import openvino as ov

    from benchmarks.lowering import _fuse_in_place, as_exported
    from models.bench_models import SHAPES, layer_weights, loop_layer, tiled_layer
    from moe_fusion.lower import HYBRID, CpuFacts, lower

    shape = SHAPES[layer]
    weights = layer_weights(shape, weights_type, distinct=True)  # save_model stores equal constants once
    stored = shape.experts * weights.expert_bytes()
    paths = {}
    loop = as_exported(loop_layer, weights)
    if "loop" in forms:
        paths["loop"] = out / "loop.xml"
        ov.save_model(loop, paths["loop"], compress_to_fp16=False)
    if "native" in forms:
        paths["native"] = out / "native.xml"
        ov.save_model(as_exported(tiled_layer, weights), paths["native"], compress_to_fp16=False)
    del weights
    fused = _fuse_in_place(loop)
    for form in forms:
        if form in ("loop", "native"):
            continue
        model = fused.clone()
        if form.startswith(HYBRID + "-"):  # hybrid lowered for a CPU of that inference precision
            lower(model, HYBRID, cpu=CpuFacts(amx=False, precision=form.split("-")[1]))
        else:
            lower(model, form)
        paths[form] = out / f"{form}.xml"
        ov.save_model(model, paths[form], compress_to_fp16=False)
        del model
    return paths, stored, shape.hidden


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", default="qwen3")
    parser.add_argument("--weights", default="f16")
    parser.add_argument("--forms", default="native,loop,cpu,per-expert,hybrid-bf16,hybrid-f32",
                        help="loop, native, any lowering target; hybrid-bf16/hybrid-f32: hybrid lowered for a "
                             "CPU of that inference precision")
    parser.add_argument("--precision", default="bf16,f32")
    parser.add_argument("--keep", help="save the IRs in this directory (kept) instead of a temporary one")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]))
        return
    forms = args.forms.split(",")
    with tempfile.TemporaryDirectory(prefix="moe-deployed-") as tmp:
        out = Path(args.keep or tmp)
        out.mkdir(parents=True, exist_ok=True)
        paths, stored, hidden = save_forms(args.layer, args.weights, forms, out)
        print(f"{args.layer} {args.weights}: stored expert weights {stored / 1e9:.2f} GB; load "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        print(f"{'form':<14} {'precision':<9} {'compile s':>9} {'peak RssAnon GB':>15} {'x stored':>8} "
              f"{'VmHWM GB':>8} {'x native':>8}")
        native: dict[str, float] = {}
        for precision in args.precision.split(","):
            for form in forms:
                result = subprocess.run([sys.executable, __file__, "--child", str(paths[form]), precision,
                                         str(hidden)], capture_output=True, text=True, check=False)
                if result.returncode:
                    print(f"{form:<14} {precision:<9} failed: {result.stderr.strip().splitlines()[-1:]}")
                    continue
                r = json.loads(result.stdout.strip().splitlines()[-1])
                if form == "native":
                    native[precision] = r["peak_anon"]
                ratio = f"{r['peak_anon'] / native[precision]:>7.2f}x" if precision in native else " " * 8
                print(f"{form:<14} {precision:<9} {r['compile_s']:>9.2f} {r['peak_anon'] / 1e9:>15.2f} "
                      f"{r['peak_anon'] / stored:>7.2f}x {r['hwm'] / 1e9:>8.2f} {ratio}", flush=True)


if __name__ == "__main__":
    main()
