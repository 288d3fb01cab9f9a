"""moe_fusion/convert/weights.py's re-storing of weights for `--weight-format fp16` (no torch needed)."""

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion.convert.weights import to_fp16


def _model() -> ov.Model:
    rng = np.random.default_rng(0)
    x = ops.parameter([-1, 16], ov.Type.f32)
    matrix = ops.constant(rng.standard_normal((16, 8)).astype(np.float32))
    frequencies = ops.constant((1.0 / 10000 ** (np.arange(8) / 8)).astype(np.float32).reshape(1, 8))  # RoPE's
    huge = ops.constant(np.full((8, 8), 1e6, np.float32))  # beyond f16's range
    y = ops.matmul(ops.multiply(ops.matmul(x, matrix, False, False), frequencies), huge, False, False)
    return ov.Model([y], [x])


def test_fp16_stores_matrices_f16_and_keeps_tables_and_out_of_range_values_f32():
    model = _model()
    notes = to_fp16(model)
    stored = {tuple(op.get_output_shape(0)): op.get_element_type() for op in model.get_ops()
              if op.get_type_name() == "Constant" and op.get_output_shape(0)}
    assert stored[(16, 8)] == ov.Type.f16  # behind a decompression Convert
    assert stored[(1, 8)] == ov.Type.f32  # a frequency table rounded to f16 moved logits 2e-3 of their scale
    assert stored[(8, 8)] == ov.Type.f32
    assert notes == ["fp16: 1 f32 matrices hold values beyond f16's range; kept f32"]
