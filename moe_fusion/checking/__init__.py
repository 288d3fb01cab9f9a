"""Whole-model equivalence (`moe_fusion.check`, `moe-fusion check`): the original and the fused model run
side by side, whole (whole.py) or one MoE layer at a time (layers.py, segments.py), and every output is
compared (report.py); run.py holds `check` itself, jobs.py one side's work."""

from moe_fusion.checking.jobs import FUSED_EXPERTS_MODES
from moe_fusion.checking.report import DEFAULT_TOLERANCES, PRECISION_RTOL, CheckReport, OutputCheck
from moe_fusion.checking.run import MODES, WHOLE_MODE_BYTES, check

__all__ = [
    "DEFAULT_TOLERANCES",
    "FUSED_EXPERTS_MODES",
    "MODES",
    "PRECISION_RTOL",
    "WHOLE_MODE_BYTES",
    "CheckReport",
    "OutputCheck",
    "check",
]
