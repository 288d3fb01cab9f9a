"""llama.cpp as a peer in benchmarks/lowering.py: times a GGUF of the same layer with `llama-bench` in the
same run as the OpenVINO forms.

    python benchmarks/peer_llamacpp.py MODEL.gguf [--llama-bench PATH] [--prefill 128,512] [--runs 5]

The binary comes from `--llama-bench PATH` or the environment variable LLAMA_BENCH (none: not timed). The
GGUF files (BF16 and Q4_0 of a one-layer Qwen3-MoE or Mixtral whose experts are the ones lowering.py builds its
forms from) are written by models/export_gguf.py. One invocation runs

    llama-bench -m MODEL -t THREADS -p 128[,512] -n 16 -embd 1 -r R -o json

`-embd 1` makes every prompt token's output needed: without it llama.cpp computes the last layer (here the
only one) for the last prompt token alone, and prefill would skip the MoE for all other tokens. llama-bench
runs one untimed warm-up of each test, then R timed repetitions; per test the median of its samples_ns is
taken: prefill ms = the whole prompt, decode ms = one generated token (the tg-16 sample / 16; each token is
a random id, so routing changes every step). The peak RSS is the llama-bench process's VmHWM, polled every
20 ms from /proc (the peak of its resident memory: the mmap-ed GGUF pages it touched, any repacked copy (Q4_0
is repacked for AVX-512 by default) and the compute buffers).

What llama.cpp times is the whole one-layer model: token embedding, attention (with its KV cache), the MoE
(router + experts), norms and output; the OpenVINO forms are the MoE alone. models/export_gguf.py therefore
also writes a variant with one attention head (`-attn1`), whose attention weighs 2 MB instead of 38 MB
(Qwen3-30B-A3B's) or 84 MB (Mixtral-8x7B's).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

DECODE_TOKENS = 16


def llama_bench_path(arg: str | None) -> Path | None:
    """`--llama-bench` or $LLAMA_BENCH; None when neither is given. Raises when given but not executable."""
    value = arg or os.environ.get("LLAMA_BENCH")
    if not value:
        return None
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise SystemExit(f"llama-bench: {path} is not an executable file")
    return path


@dataclass
class PeerRun:
    """One llama-bench invocation: per test, the samples in ms, and the process's peak RSS."""

    prefill_ms: dict[int, list[float]]  # prompt tokens -> ms per prompt, one per repetition
    decode_ms: list[float]  # ms per generated token, one per repetition
    peak_rss_gb: float
    build: str
    wall_s: float


@dataclass
class Peer:
    """A GGUF timed by llama-bench, possibly over several invocations (rounds) in one benchmark run."""

    binary: Path
    model: Path
    prefills: list[int]
    threads: int
    runs: list[PeerRun] = field(default_factory=list)

    @property
    def label(self) -> str:
        kind = "Q4_0" if "q4_0" in self.model.name.lower() else "BF16" if "bf16" in self.model.name.lower() \
            else self.model.stem
        attention = "1-head attn" if "attn1" in self.model.name else "32-head attn"
        return f"llama.cpp {kind} ({attention})"

    def run(self, reps: int) -> PeerRun:
        result = run_llama_bench(self.binary, self.model, self.prefills, self.threads, reps)
        self.runs.append(result)
        return result

    def medians(self, since: int = 0) -> tuple[dict[int, float], float, float]:
        """(prefill ms per prompt length, decode ms per token, max peak RSS GB) over the samples of the
        invocations from `since` on."""
        runs = self.runs[since:]
        prefill = {t: statistics.median([s for r in runs for s in r.prefill_ms[t]]) for t in self.prefills}
        decode = statistics.median([s for r in runs for s in r.decode_ms])
        return prefill, decode, max(r.peak_rss_gb for r in runs)

    def stored_gb(self) -> float:
        return self.model.stat().st_size / 1e9


def _hwm_bytes(pid: int) -> int:
    """VmHWM of a running process (0 once it is gone). Not wait4's ru_maxrss: Linux carries the high-water
    mark of the forked copy of this (large) process across exec into the child's."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def run_llama_bench(binary: Path, model: Path, prefills: list[int], threads: int, reps: int) -> PeerRun:
    cmd = [str(binary), "-m", str(model), "-t", str(threads), "-p", ",".join(map(str, prefills)),
           "-n", str(DECODE_TOKENS), "-embd", "1", "-r", str(reps), "-o", "json"]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, _hwm_bytes(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        text, errors = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{errors[-2000:]}")
    tests = json.loads(text)
    prefill: dict[int, list[float]] = {}
    decode: list[float] = []
    for test in tests:
        samples = [ns / 1e6 for ns in test["samples_ns"]]
        if test["n_gen"] == 0:
            prefill[test["n_prompt"]] = samples
        else:
            decode = [s / test["n_gen"] for s in samples]
    build = f"b{tests[0]['build_number']} ({tests[0]['build_commit']})"
    return PeerRun(prefill, decode, peak / 1e9, build, wall)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, nargs="+")
    parser.add_argument("--llama-bench")
    parser.add_argument("--prefill", default="128")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    binary = llama_bench_path(args.llama_bench)
    if binary is None:
        raise SystemExit("llama.cpp: not timed (no --llama-bench)")
    for model in args.model:
        peer = Peer(binary, model, [int(t) for t in args.prefill.split(",")], args.threads)
        run = peer.run(args.runs)
        prefill, decode, rss = peer.medians()
        print(f"{peer.label} {run.build}: prefill {({t: round(v, 1) for t, v in prefill.items()})} ms, decode "
              f"{decode:.2f} ms/token, peak RSS {rss:.2f} GB, file {peer.stored_gb():.2f} GB")


if __name__ == "__main__":
    main()
