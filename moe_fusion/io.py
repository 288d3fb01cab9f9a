"""Reading models with FusedExperts registered."""

from __future__ import annotations

import functools
from pathlib import Path

import openvino as ov

from moe_fusion.op import register


@functools.cache
def core() -> ov.Core:
    """A process-wide `ov.Core` that knows FusedExperts. For your own core: `moe_fusion.register(core)`."""
    return register(ov.Core())


def read_model(path: str | Path) -> ov.Model:
    """`ov.Core.read_model` with FusedExperts registered (IR .xml or .onnx)."""
    return core().read_model(str(path))
