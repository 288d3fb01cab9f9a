"""moe_fusion/mapped.py: the proof's weights fed from their files, and the one graph change made for it."""

import numpy as np
import openvino as ov
import openvino.opset14 as ops
from conftest import compile_f32

from moe_fusion import mapped


def _gathered_model(stored: ov.Type) -> ov.Model:
    rng = np.random.default_rng(0)
    weights = rng.standard_normal((16, 64, 256)).astype(np.float32)  # 1 MB as f16: above MAPPED_MIN_BYTES
    if stored == ov.Type.bf16:  # truncated to bf16 bits
        tensor = ov.Tensor(ov.Type.bf16, ov.Shape(list(weights.shape)))
        tensor.data.view(np.uint16)[...] = (weights.view(np.uint32) >> 16).astype(np.uint16)
        constant = ov.op.Constant(tensor)
    else:
        constant = ops.constant(weights.astype(np.float16))
    ids = ops.parameter([-1], ov.Type.i64, name="ids")
    widened = ops.convert(constant, ov.Type.f32)
    return ov.Model([ops.gather(widened, ids, ops.constant(np.int64(0)))], [ids])


def test_16_bit_experts_are_gathered_before_they_are_widened_with_the_same_values():
    for stored in (ov.Type.f16, ov.Type.bf16):
        model = _gathered_model(stored)
        ids = np.array([3, 15, 0, 3], np.int64)
        before = compile_f32(model)([ids])[0]
        mapped._gather_stored(model)
        kinds = [op.get_type_name() for op in model.get_ordered_ops()]
        assert kinds.index("Gather") < kinds.index("Convert"), kinds  # only the routed experts are widened
        np.testing.assert_array_equal(compile_f32(model)([ids])[0], before)  # exact: the cast is per element
