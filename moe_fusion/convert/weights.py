"""Fusing, with the weight format applied so that the experts stay compressed.

- fp32: fuse as traced.
- fp16: every f32 constant stored as f16 + Convert (what `ov.save_model(compress_to_fp16=True)` does), then
  fuse: the proof runs on the compressed weights, and the fused experts keep them compressed.
"""

from __future__ import annotations

from collections.abc import Callable

import openvino as ov


def to_fp16(model: ov.Model) -> None:
    from openvino._offline_transformations import compress_model_transformation

    compress_model_transformation(model)


def fuse_and_compress(model: ov.Model, weight_format: str, fuse: Callable) -> tuple[object, list[str]]:
    """Fuse every MoE block of `model` in place with its weights in `weight_format`; (fuse report, notes)."""
    notes: list[str] = []
    if weight_format == "fp16":
        to_fp16(model)
        notes.append("fp16: every f32 weight stored as f16 (decompressed to f32 at run time)")
    report = fuse(model)
    return report, notes
