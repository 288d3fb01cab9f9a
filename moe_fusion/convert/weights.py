"""Fusing, with the weight format applied so that the experts stay compressed.

- fp32: fuse as traced.
- fp16: every f32 constant stored as f16 + Convert (what `ov.save_model(compress_to_fp16=True)` does), then
  fuse: the per-block proof runs on the f16 weights, and the fused experts keep them compressed.
- int8 / int4 (NNCF, data-free, as `optimum-cli export openvino --weight-format int8|int4` does by default:
  int8 asymmetric per channel; int4 asymmetric, group 128, ratio 1, embeddings and lm_head int8): NNCF
  compresses MatMul weights, but not the traced `batched_mm` form's stacked weights, which reach their
  MatMuls through a per-token Gather. So: fuse (proven at f32) -> lower to the `tiled` form (the
  `[E, out, in]` weights feed batched MatMuls, as in optimum-intel's exports) -> NNCF -> fuse again (proven on
  the compressed weights: the `tiled` family keeps int8/int4 constants, scales and zero points as they are).
  A block that does not fuse keeps its experts uncompressed; the notes say so. A weight whose channels have
  no int4 group size (NNCF's adjusted group, at least 16) falls back to int8 (NNCF's backup mode).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import openvino as ov

INT4_GROUP = 128
MIN_GROUP = 16
COMPRESSED = {ov.Type.u8: "int8", ov.Type.i8: "int8", ov.Type.u4: "int4", ov.Type.i4: "int4"}


def to_fp16(model: ov.Model) -> None:
    from openvino._offline_transformations import compress_model_transformation

    compress_model_transformation(model)


def nncf_compress(model: ov.Model, weight_format: str) -> ov.Model:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    if weight_format == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    advanced = AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST,
                                             min_adjusted_group_size=MIN_GROUP)
    return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=INT4_GROUP, ratio=1.0,
                                 advanced_parameters=advanced)


def expert_weights(model: ov.Model) -> Counter:
    """How the FusedExperts' weights are stored (int4, int8, f16, f32), counted per stacked weight: the
    constant at the start of each weight input's decompression chain."""
    kinds: Counter = Counter()
    for op in model.get_ops():
        if op.get_type_name() != "FusedExperts":
            continue
        for port in range(3, op.get_input_size()):
            value = op.input_value(port)
            while value.get_node().get_type_name() in ("Convert", "Reshape", "Multiply", "Subtract", "Transpose"):
                value = value.get_node().input_value(0)
            node = value.get_node()
            if node.get_type_name() == "Constant" and len(node.get_output_shape(0)) >= 3:
                kind = node.get_output_element_type(0)
                kinds[COMPRESSED.get(kind, kind.get_type_name())] += 1
    return kinds


def fuse_and_compress(model: ov.Model, weight_format: str, fuse: Callable) -> tuple[object, list[str]]:
    """Fuse every MoE block of `model` in place with its weights in `weight_format`; (fuse report, notes)."""
    notes: list[str] = []
    if weight_format == "fp16":
        to_fp16(model)
        notes.append("fp16: every f32 weight stored as f16 (decompressed at run time)")
    if weight_format not in ("int8", "int4"):
        report = fuse(model)
        kinds = expert_weights(model)
        notes.append(f"{weight_format}: the fused experts' stacked weights are "
                     + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
        return report, notes
    from moe_fusion.lower import TILED, lower

    first = fuse(model)
    for block in first.skipped:
        notes.append(f"{block.name}: not fused ({block.reason}); its experts stay f32: NNCF does not compress "
                     "the Gather-fed stacked weights of the traced form")
    lower(model, TILED)  # batched MatMuls on [E, out, in] weights: what NNCF compresses
    compressed = nncf_compress(model, weight_format)
    if compressed is not model:  # NNCF edits OpenVINO models in place; keep the caller's object either way
        raise RuntimeError("NNCF returned a new model object; expected in-place compression")
    report = fuse(model)
    kinds = expert_weights(model)
    notes.append(f"{weight_format} (NNCF): the fused experts' stacked weights are "
                 + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))
    if weight_format == "int4" and kinds.get("int8"):
        notes.append(f"int4: {kinds['int8']} stacked expert weights have input channels no int4 group of "
                     f"{MIN_GROUP}..{INT4_GROUP} divides; NNCF stored them int8 (its backup mode)")
    uncompressed = sum(n for k, n in kinds.items() if k not in ("int4", "int8"))
    if uncompressed:
        notes.append(f"{weight_format}: {uncompressed} stacked expert weights were left uncompressed by NNCF")
    return report, notes
