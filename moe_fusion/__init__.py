"""moe-fusion: find, fuse, verify and lower Mixture-of-Experts layers in OpenVINO models."""

# The functions `fuse` and `check` live in the modules `fusing` and `checking`: a package attribute can be
# a module or a function, not both, so no module here is named after a function it exports.
from moe_fusion.checking import CheckReport, check
from moe_fusion.fusing import FuseMoE, fuse
from moe_fusion.io import read_model
from moe_fusion.op import FusedExperts, FusedExpertsError, register
from moe_fusion.reference import GEMM2_BIAS_SWIGLU_CLAMP, GEMM3_SWIGLU
from moe_fusion.runtime import core

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
