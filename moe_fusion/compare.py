"""The one comparison of an original's output with its replacement's: the proof, `check` and the fuzzer's
oracle all judge with `compare`, so a verdict means the same thing everywhere.

Policy for NaN and ±Inf (docs/checking.md, "Non-finite values"):
  - Non-finite values must match position by position, exactly: NaN where the original has NaN, the
    same-signed Inf where it has Inf. Any other pairing (NaN vs a number, a number vs Inf, +Inf vs -Inf,
    Inf vs NaN) is a failure whatever the tolerance.
  - Finite values (finite on both sides) are compared with `atol + rtol * scale`, the scale being the
    largest finite magnitude of the ORIGINAL: element-wise relative error is meaningless where values
    cross zero, and a non-finite element must not make every finite difference look small (an Inf in the
    scale would pass anything) nor make a zero scale of an all-NaN output fail on rounding.
Why exact parity rather than "skip non-finite": the original is the specification. A fused model that
returns finite numbers where the original returns NaN hides a broken layer downstream (issue 18: a
declined layer emitting NaN rows, the fused next layer turning them into -0.215); one that returns NaN
where the original is finite is simply wrong. Both must stop a rewrite. NaN == NaN and Inf == Inf count
as equal because the original computes them too (PhiMoE's sparsemixer gives NaN on an all-zero row):
declining such a block would refuse a rewrite that changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Comparison:
    """How far `got` is from `want`: the verdict and the evidence for it."""

    ok: bool
    max_abs: float  # largest |got - want|; inf where non-finite values differ, 0 where they match
    scale: float  # largest finite |want|
    limit: float  # atol + rtol * scale
    worst: tuple[int, ...]  # index of the worst element (a non-finite mismatch first), () if empty
    want: float  # the original's value there
    got: float  # the replacement's value there
    nonfinite_mismatches: int  # elements whose NaN/Inf pattern differs
    cosine: float  # over elements finite on both sides (1.0 when both are all zero or empty)
    shape_error: str = ""  # "" when the shapes agree

    @property
    def max_rel(self) -> float:
        """max_abs relative to the original's finite scale."""
        if self.scale > 0:
            return self.max_abs / self.scale
        return 0.0 if self.max_abs == 0 else float("inf")

    def describe(self, original: str = "original", replacement: str = "fused") -> str:
        """One clause saying why the comparison failed ('' when it passed)."""
        if self.ok:
            return ""
        if self.shape_error:
            return self.shape_error
        where = ",".join(map(str, self.worst))
        values = f"{original} {self.want:.6g}, {replacement} {self.got:.6g}"
        if self.nonfinite_mismatches:
            return (f"non-finite values differ at {self.nonfinite_mismatches} element(s), first at [{where}]: "
                    f"{values} (NaN/Inf must match exactly)")
        return f"max |diff| {self.max_abs:.3g} > {self.limit:.3g} (scale {self.scale:.3g}) at [{where}]: {values}"


def compare(
    want: np.ndarray, got: np.ndarray, *, rtol: float, atol: float = 0.0, same_size: bool = False
) -> Comparison:
    """Compare the replacement's `got` with the original's `want` under the module's NaN/Inf policy.

    `same_size`: accept any shapes holding the same number of values (compared in flat order), e.g. a
    proof's [T, H] rows against a [1, T, H] output; otherwise the shapes must be equal."""
    want, got = np.asarray(want), np.asarray(got)
    mismatch = got.size != want.size if same_size else got.shape != want.shape
    if mismatch:
        reason = (f"{got.size} values instead of {want.size}" if same_size
                  else f"shape {list(got.shape)} instead of {list(want.shape)}")
        return Comparison(False, float("inf"), 0.0, 0.0, (), 0.0, 0.0, 0, 0.0, reason)
    w = want.astype(np.float64).reshape(want.shape)
    g = got.astype(np.float64).reshape(want.shape)
    finite_w, finite_g = np.isfinite(w), np.isfinite(g)
    both = finite_w & finite_g
    # non-finite on either side: equal only as NaN/NaN or the same infinity
    matched = (np.isnan(w) & np.isnan(g)) | (~finite_w & (w == g))
    bad = ~both & ~matched
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(both, np.abs(g - w), 0.0)
    diff = np.where(bad, np.inf, diff)
    scale = float(np.abs(w[finite_w]).max()) if finite_w.any() else 0.0
    limit = atol + rtol * scale
    worst = tuple(int(i) for i in np.unravel_index(int(np.argmax(diff)), diff.shape)) if diff.size else ()
    max_abs = float(diff[worst]) if diff.size else 0.0
    wf, gf = w[both], g[both]
    norms = float(np.linalg.norm(wf) * np.linalg.norm(gf))
    cosine = float(wf @ gf / norms) if norms > 0 else float(np.array_equal(wf, gf))
    count = int(bad.sum())
    ok = count == 0 and max_abs <= limit
    values = (float(w[worst]), float(g[worst])) if diff.size else (0.0, 0.0)
    return Comparison(ok, max_abs, scale, limit, worst, *values, count, cosine)
