"""Fusing, with the weight format applied so that the experts stay compressed.

- A 16-bit checkpoint traces with its weights 16-bit (storage.py): `Convert(Constant bf16|f16)`. fp32 turns them
  into f32 constants; fp16 stores bf16 ones as f16 (a constant beyond f16's range stays bf16, said in the
  notes); int8/int4 leave them to NNCF, which reads them through their Convert.
- fp32: fuse as traced.
- fp16: every weight matrix stored as f16 + decompression Convert (vectors such as RoPE's frequencies stay
  f32: `to_fp16`), then fuse: the per-block proof runs on the f16 weights, and the fused experts keep them
  compressed.
- int8 / int4 (NNCF, data-free, as `optimum-cli export openvino --weight-format int8|int4` does by default:
  int8 asymmetric per channel; int4 asymmetric, group 128, ratio 1, embeddings and lm_head int8; int4-sym as
  `--weight-format int4 --sym`: no zero points, decodes faster on CPUs without AMX, docs/lowering.md): NNCF
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

import numpy as np
import openvino as ov
import openvino.opset13 as ops

from moe_fusion.compressed import mark_decompression
from moe_fusion.reference import bf16_to_f32

INT4_GROUP = 128
MIN_GROUP = 16
COMPRESSED = {ov.Type.u8: "int8", ov.Type.i8: "int8", ov.Type.u4: "int4", ov.Type.i4: "int4"}
NNCF_FORMATS = ("int8", "int4", "int4-sym")


F16_MAX = 65504.0
BLOCK = 1 << 22  # elements converted at a time: the f32 transient of a re-stored constant stays ~16 MB


def to_fp16(model: ov.Model) -> list[str]:
    """Weights stored f16: the checkpoint's 16-bit ones re-stored (`restore`), f32 matrices (an f32 checkpoint)
    compressed behind a decompression Convert. Vectors stay f32: RoPE's inverse frequencies, norms, biases.
    (OpenVINO's compress_model_transformation also rounds those: at Qwen3-30B-A3B's shape that alone put the
    logits 2e-3 of their scale off, against 7e-6 for the f16 weights.)"""
    notes = restore(model, ov.Type.f16)
    kept = 0
    for const in model.get_ops():
        if const.get_type_name() != "Constant" or const.get_element_type() != ov.Type.f32 \
                or sum(d > 1 for d in const.get_output_shape(0)) < 2:  # a matrix, not a [1, 1, 64] table
            continue
        tensor = _restored(const, ov.Type.f16)
        if tensor is None:
            kept += 1
            continue
        stored = ov.op.Constant(tensor)
        stored.set_friendly_name(const.get_friendly_name())
        widened = mark_decompression(ops.convert(stored, ov.Type.f32))
        const.output(0).replace(widened.output(0))
    model.validate_nodes_and_infer_types()
    if kept:
        notes.append(f"fp16: {kept} f32 matrices hold values beyond f16's range; kept f32")
    return notes


def restore(model: ov.Model, target: ov.Type) -> list[str]:
    """Re-store the 16-bit weights the trace kept (`Convert(Constant bf16|f16)`) as `target`: f32 (the Convert
    folded away) or f16 (bf16 values rounded to f16, behind the same Convert). Returns notes."""
    kept = 0
    for convert in model.get_ops():
        if convert.get_type_name() != "Convert" or convert.get_output_element_type(0) != ov.Type.f32:
            continue
        const = convert.input_value(0).get_node()
        if const.get_type_name() != "Constant" or const.get_element_type() not in (ov.Type.bf16, ov.Type.f16) \
                or const.get_element_type() == target:
            continue
        tensor = _restored(const, target)
        if tensor is None:
            kept += 1
            continue
        stored = ov.op.Constant(tensor)
        stored.set_friendly_name(const.get_friendly_name())
        if target == ov.Type.f32:
            convert.output(0).replace(stored.output(0))
        else:
            convert.input(0).replace_source_output(stored.output(0))
    model.validate_nodes_and_infer_types()
    return [f"fp16: {kept} bf16 weights hold values beyond f16's range; kept bf16"] if kept else []


def _restored(const: ov.Node, target: ov.Type) -> ov.Tensor | None:
    """`const`'s values as a `target` tensor, converted a block at a time (no whole f32 copy); None when f16
    cannot hold them."""
    bf16 = const.get_element_type() == ov.Type.bf16
    data = const.get_data().reshape(-1)  # bf16 (shown as float16 bits) / f16 / f32
    tensor = ov.Tensor(target, const.get_output_shape(0))
    out = tensor.data.reshape(-1)
    for start in range(0, data.size, BLOCK):
        chunk = data[start : start + BLOCK]
        values = bf16_to_f32(chunk) if bf16 else chunk.astype(np.float32)
        if target == ov.Type.f16 and np.abs(values[np.isfinite(values)]).max(initial=0.0) > F16_MAX:
            return None
        out[start : start + BLOCK] = values
    return tensor


def nncf_compress(model: ov.Model, weight_format: str) -> ov.Model:
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters

    if weight_format == "int8":
        return nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    advanced = AdvancedCompressionParameters(group_size_fallback_mode=nncf.GroupSizeFallbackMode.ADJUST,
                                             min_adjusted_group_size=MIN_GROUP)
    mode = nncf.CompressWeightsMode.INT4_SYM if weight_format == "int4-sym" else nncf.CompressWeightsMode.INT4_ASYM
    return nncf.compress_weights(model, mode=mode, group_size=INT4_GROUP, ratio=1.0, advanced_parameters=advanced)


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
        notes += to_fp16(model)
        notes.append("fp16: every weight matrix stored as f16 (decompressed at run time); vectors stay f32")
    elif weight_format == "fp32":
        restore(model, ov.Type.f32)
    if weight_format not in NNCF_FORMATS:
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
    if weight_format.startswith("int4") and kinds.get("int8"):
        notes.append(f"{weight_format}: {kinds['int8']} stacked expert weights have input channels no int4 group of "
                     f"{MIN_GROUP}..{INT4_GROUP} divides; NNCF stored them int8 (its backup mode)")
    uncompressed = sum(n for k, n in kinds.items() if k not in ("int4", "int8"))
    if uncompressed:
        notes.append(f"{weight_format}: {uncompressed} stacked expert weights were left uncompressed by NNCF")
    return report, notes
