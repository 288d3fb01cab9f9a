"""What `check` reports: per output and step an OutputCheck judged by moe_fusion.compare (NaN/Inf exactly
where the original has them; finite values within `atol + rtol * max|finite original|`), and the
CheckReport that collects them. Default tolerances depend on the original's weight type."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from moe_fusion.compare import compare

# weight type -> (atol, rtol), rtol relative to the output's largest magnitude. Both models run the same
# weights in f32 on CPU, so differences come from summation order (FusedExperts sums each expert's GEMM
# and the top-k slots in a different order than the unfused graph) and grow with depth and width:
#   f32: measured ~1e-7..1e-6 of the logits' scale on the committed fixtures; 1e-4 leaves 100x room for
#        real depths (~60 layers) and hidden sizes (~8k), while a wrong expert, weight, lane or routing
#        weight moves logits by > 1e-2 of their scale.
#   f16/bf16: weights decompress exactly to f32 on both sides, but such models are real trained models
#        whose activations have outliers of 1e2..1e3 that amplify reordering error through the norms.
#   int8/int4: both sides dequantise the same constants; with the CPU plugin's dynamic activation
#        quantisation off (F32 below) they differ by summation order only, measured 2.5e-7..3.9e-7 on the
#        14 compressed fixtures. 1e-3 as for f16 (left on, that quantisation alone moves outputs ~1e-2).
DEFAULT_TOLERANCES: dict[str, tuple[float, float]] = {
    "f32": (1e-6, 1e-4),
    "f16": (1e-5, 1e-3),
    "bf16": (1e-5, 2e-3),
    "int8": (1e-5, 1e-3),
    "int4": (1e-5, 1e-3),
}


# Inference precision -> the least rtol that makes sense: an f16/bf16 run rounds every activation.
PRECISION_RTOL = {"f32": 0.0, "f16": 1e-2, "bf16": 5e-2}


@dataclass
class OutputCheck:
    """One output at one step: how far the fused model is from the original."""

    output: str
    step: str  # "prefill 16", "prefill 16 + decode 2" (stateful) or "16 tokens" (stateless)
    tokens: int
    shape: list[int]
    max_abs: float
    max_rel: float  # max_abs / max|original|
    cosine: float
    top1: float | None  # logits only: share of positions whose argmax agrees
    worst: list[int]  # index of the largest difference
    worst_values: tuple[float, float]  # (original, fused) there
    ok: bool
    reason: str = ""


@dataclass
class CheckReport:
    original: str
    fused: str
    equivalent: bool
    reason: str  # one line: why not (output, step, worst element), or "" when equivalent
    weight_type: str
    atol: float
    rtol: float
    device: str
    precision: str
    stateful: bool
    vocab: int | None
    outputs: list[OutputCheck] = field(default_factory=list)
    seconds: float = 0.0
    mode: str = "whole"
    fused_experts: str = ""  # "run as is" or "lowered per-expert" (the fused side's FusedExperts)
    segments: int = 0  # layers mode: how many segments each side was cut into

    def __bool__(self) -> bool:
        return self.equivalent

    def add(self, row: OutputCheck) -> None:
        """Record one comparison; the first that fails gives the report's verdict and reason."""
        self.outputs.append(row)
        if not row.ok and self.equivalent:
            self.equivalent, self.reason = False, row.reason

    @property
    def max_abs(self) -> float:
        return max((o.max_abs for o in self.outputs), default=0.0)

    @property
    def max_rel(self) -> float:
        return max((o.max_rel for o in self.outputs), default=0.0)

    @property
    def top1(self) -> float | None:
        values = [o.top1 for o in self.outputs if o.top1 is not None]
        return min(values) if values else None

    def to_json(self) -> str:
        data = asdict(self)
        data.update(max_abs=self.max_abs, max_rel=self.max_rel, top1=self.top1)
        return json.dumps(data, indent=2, default=float)

    def summary(self) -> str:
        head = "equivalent" if self.equivalent else f"NOT equivalent: {self.reason}"
        top1 = "" if self.top1 is None else f", top-1 agreement {self.top1:.4f}"
        return (
            f"{head} ({len(self.outputs)} output checks, max |diff| {self.max_abs:.3g}, "
            f"max rel {self.max_rel:.3g}{top1}; atol {self.atol:g}, rtol {self.rtol:g}, "
            f"{self.weight_type} weights, {self.device} {self.precision})"
        )

    def table(self) -> str:
        rows = [("output", "step", "shape", "max|diff|", "rel", "cosine", "top-1", "status")]
        for o in self.outputs:
            rows.append(
                (
                    o.output,
                    o.step,
                    "x".join(map(str, o.shape)),
                    f"{o.max_abs:.3g}",
                    f"{o.max_rel:.3g}",
                    f"{o.cosine:.8f}",
                    "-" if o.top1 is None else f"{o.top1:.4f}",
                    "ok" if o.ok else f"FAIL: {o.reason}",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        lines = ("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1] for r in rows)
        return "\n".join(lines)


def compare_output(
    name: str, step: str, tokens: int, want: np.ndarray, got: np.ndarray, atol: float, rtol: float, logits: bool
) -> OutputCheck:
    """One output at one step, judged by moe_fusion.compare (NaN/Inf must match the original's exactly)."""
    shape = list(want.shape)
    result = compare(want, got, rtol=rtol, atol=atol)
    if result.shape_error:
        return OutputCheck(name, step, tokens, shape, float("inf"), float("inf"), 0.0, None, [], (0.0, 0.0), False,
                           result.shape_error)
    top1 = None
    if logits and want.ndim >= 1 and want.shape[-1] > 1 and want.size:
        top1 = float((want.argmax(-1) == got.argmax(-1)).mean())
    reason = ""
    if not result.ok and result.nonfinite_mismatches:
        reason = f"output '{name}' at {step}: {result.describe()}"
    elif not result.ok:
        where = ",".join(map(str, result.worst))
        reason = (
            f"output '{name}' at {step}: max |diff| {result.max_abs:.3g} > {result.limit:.3g} (atol {atol:g} + rtol "
            f"{rtol:g} x scale {result.scale:.3g}) at [{where}]: original {result.want:.6g}, fused {result.got:.6g}"
        )
    return OutputCheck(name, step, tokens, shape, result.max_abs, result.max_rel, result.cosine, top1,
                       list(result.worst), (result.want, result.got), result.ok, reason)

