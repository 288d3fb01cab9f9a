"""Assertions for users' test suites: `assert_equivalent(original, fused)` fails with the one-line reason."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openvino as ov

from moe_fusion.check import CheckReport, check


def assert_equivalent(original: ov.Model | str | Path, fused: ov.Model | str | Path, **kwargs: Any) -> CheckReport:
    """`moe_fusion.check(original, fused, **kwargs)`; raise AssertionError with the reason if not equivalent.

    Returns the report when equivalent (e.g. to log `report.summary()` or assert on `report.top1`).
    Inputs that cannot be compared (unreadable models, different inputs) raise `moe_fusion.io.InputError`.
    """
    report = check(original, fused, **kwargs)
    if not report.equivalent:
        raise AssertionError(f"{report.fused} is not equivalent to {report.original}: {report.reason}")
    return report
