"""Wall time and peak memory of `moe-fusion check` at real layer shapes, per mode.

Builds one per-expert-loop MoE layer per shape with `models/bench_models.py` (every weight distinct, as a
trained layer's): Qwen3-30B-A3B (H 2048, I 768, 128 experts, top-8) f16 and int4, Mixtral-8x7B (H 4096,
I 14336, 8 experts, top-2) f16, and a 3-layer Qwen3 f16 model (layers chained with residual adds, as
`benchmarks/memory.py` builds it) to show whether memory follows the model or one layer. Each is fused
(`moe-fusion fuse --no-verify`: building the fused side is not what is measured) and lowered
(`moe-fusion lower`, target cpu). Then `moe-fusion check ORIGINAL FUSED --mode M` runs in a subprocess for
each fused form and mode, sampled every 20 ms: peak RssAnon summed over the process and its children (check
runs each side in a child), wall time, and the ratio of that peak to the original's .bin.

    python benchmarks/check_scale.py [--dir /tmp/moe-check-scale] [--models qwen3-f16,qwen3-int4,...]
                                     [--modes whole,layers] [--forms fused,lowered] [--tokens 1,16,64]
                                     [--before CHECKOUT]

`--before` also runs the `check` of another checkout of moe-fusion (e.g. the commit before these modes:
both models compiled side by side) on the same files, as the baseline.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import openvino as ov

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from models import bench_models  # noqa: E402

MODELS = ("qwen3-f16", "qwen3-int4", "mixtral-f16", "qwen3-f16-3layers")
GB = 1e9


def build(folder: Path, name: str) -> Path:
    xml = folder / f"{name}.xml"
    if xml.exists():
        return xml
    start = time.perf_counter()
    if name.endswith("layers"):
        import memory  # benchmarks/memory.py: Qwen3 loop layers chained with residual adds

        layers = int(name.split("-")[-1].removesuffix("layers"))
        built = memory.build(folder, layers)
        built.rename(xml)
        built.with_suffix(".bin").rename(xml.with_suffix(".bin"))
    else:
        shape, weight_type = name.split("-")
        weights = bench_models.layer_weights(bench_models.SHAPES[shape], weight_type, distinct=True)
        ov.save_model(bench_models.loop_layer(weights), xml, compress_to_fp16=False)
    print(f"built {xml.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return xml


def cli(*args: str, checkout: Path = ROOT) -> list[str]:
    code = f"import sys; sys.path.insert(0, {str(checkout)!r}); from moe_fusion.cli import main; main()"
    return [sys.executable, "-c", code, *args]


def fused_forms(xml: Path) -> dict[str, Path]:
    forms = {"fused": xml.with_name(xml.stem + "-fused.xml"), "lowered": xml.with_name(xml.stem + "-lowered.xml")}
    if not forms["fused"].exists():
        subprocess.run(cli("fuse", str(xml), "-o", str(forms["fused"]), "--no-verify", "--force"), check=True,
                       stdout=subprocess.DEVNULL)
    if not forms["lowered"].exists():
        subprocess.run(cli("lower", str(forms["fused"]), "-o", str(forms["lowered"]), "--force"), check=True,
                       stdout=subprocess.DEVNULL)
    return forms


def _tree(pid: int) -> list[int]:
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        found.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as children:
                    stack.extend(int(c) for c in children.read().split())
        except (FileNotFoundError, ProcessLookupError):
            continue
    return found


def _anon(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def measure(command: list[str]) -> tuple[float, int, int, str]:
    """(seconds, peak RssAnon of the process tree, exit code, last stderr line), sampled every 20 ms."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]

    def sample() -> None:
        while process.poll() is None:
            peak[0] = max(peak[0], sum(_anon(p) for p in _tree(process.pid)))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, err = process.communicate()
    sampler.join()
    line = (out.strip() or err.strip()).splitlines()[-1:] or [""]
    return time.perf_counter() - start, peak[0], process.returncode, line[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, default=Path("/tmp/moe-check-scale"))
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--modes", default="whole,layers")
    parser.add_argument("--forms", default="fused,lowered")
    parser.add_argument("--tokens", default="1,16,64")
    parser.add_argument("--before", type=Path, help="a checkout of moe-fusion whose check is the baseline")
    args = parser.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    print("CPU: Intel Xeon Ice Lake, 2 cores, AVX-512, no bf16, no AMX; check runs f32 (INFERENCE_PRECISION_HINT)")
    print(f"load: {os.getloadavg()[0]:.2f}; check --tokens {args.tokens} (stateless layer models: one run each)")
    header = ("model", "orig .bin", "fused form", "check", "wall s", "peak RssAnon", "x .bin", "verdict")
    print(" | ".join(header))
    for name in args.models.split(","):
        xml = build(args.dir, name)
        size = xml.with_suffix(".bin").stat().st_size
        forms = fused_forms(xml)
        runs = [(form, mode, ROOT) for form in args.forms.split(",") for mode in args.modes.split(",")]
        if args.before:
            runs += [(form, "before", args.before) for form in args.forms.split(",")]
        for form, mode, checkout in runs:
            extra = [] if mode == "before" else ["--mode", mode]
            command = cli("check", str(xml), str(forms[form]), "--tokens", args.tokens, *extra, checkout=checkout)
            seconds, anon, code, line = measure(command)
            verdict = {0: "equivalent", 1: "NOT equivalent", 2: "bad input"}.get(code, f"exit {code}")
            if code not in (0,):
                verdict += f": {line[:100]}"
            print(f"{name} | {size / GB:.2f} GB | {form} | {mode} | {seconds:.1f} | {anon / GB:.2f} GB | "
                  f"{anon / size:.2f} | {verdict}", flush=True)


if __name__ == "__main__":
    main()
