"""moe-fusion: find, fuse, verify and lower Mixture-of-Experts layers in OpenVINO models."""

from moe_fusion.check import CheckReport, check
from moe_fusion.fuse import FuseMoE, fuse
from moe_fusion.io import core, read_model
from moe_fusion.op import FusedExperts, FusedExpertsError, register
from moe_fusion.reference import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU

__version__ = "0.1.0"

__all__ = [
    "GEMM2_BIAS_SWIGLU_CLAMP",
    "GEMM3_SWIGLU",
    "CheckReport",
    "FuseMoE",
    "FusedExperts",
    "FusedExpertsError",
    "__version__",
    "check",
    "core",
    "fuse",
    "read_model",
    "register",
]
