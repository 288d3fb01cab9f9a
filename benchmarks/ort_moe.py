"""ONNX Runtime's fused CPU MoE kernels as a peer in benchmarks/lowering.py: one MoE layer at a real shape.

f16 layers run as `com.microsoft.MoE` on f32 weights (its CPU kernel takes f32 only, and SwiGLU only with fc1
interleaved `[E, 2I, H]`: gate and up rows alternating); int4 layers run as `com.microsoft.QMoE` with the
same 4-bit codes, group-128 f16 scales and 4-bit zero points the OpenVINO forms read (block-wise asymmetric,
fp32 activations: accuracy_level 0). The router (MatMul on the hidden states) is an ordinary ONNX MatMul; the
kernel applies softmax, top-k and, for Mixtral, renormalisation. Weights go to an external-data file (the
protobuf 2 GB limit), which ORT reads at session creation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper
from onnx.external_data_helper import set_external_data

from models.bench_models import INT4_GROUP, LayerWeights

_FLOAT = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
          np.dtype(np.uint8): TensorProto.UINT8, np.dtype(np.int64): TensorProto.INT64}


def _interleaved(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """fc1 `[E, 2I, ...]` with gate rows at even and up rows at odd positions (swiglu_fusion=1)."""
    fused = np.empty((gate.shape[0], 2 * gate.shape[1], *gate.shape[2:]), gate.dtype)
    fused[:, 0::2], fused[:, 1::2] = gate, up
    return fused


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """Values 0..15 packed two per byte along the last axis, the first in the low nibble."""
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def _int4(weights: LayerWeights, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(packed codes [E, out, in/2], scales [E, out, in/128] f16, packed zero points [E, out, in/256]; None for
    int4-sym: QMoE's 4-bit weights without zero points are code - 8, the codes bench_models stores)."""
    codes = getattr(weights, name)  # [E, out, groups, 128]
    scale, zero = weights.scales[name]  # [E, out, groups, 1]
    e, out, groups, _ = codes.shape
    if zero is None:
        return _nibbles(codes.reshape(e, out, -1)), np.ascontiguousarray(scale[..., 0]), None
    zeros = zero[..., 0]
    if groups % 2:
        zeros = np.concatenate([zeros, np.zeros((e, out, 1), np.uint8)], -1)
    return _nibbles(codes.reshape(e, out, -1)), np.ascontiguousarray(scale[..., 0]), _nibbles(zeros)


class _PerExpert:
    """A stacked tensor written one expert at a time (Mixtral's f32 weights are 5.6 GB)."""

    def __init__(self, make, experts: int) -> None:
        self.make, self.experts = make, experts

    def parts(self):
        return (self.make(i) for i in range(self.experts))


def ort_moe_model(weights: LayerWeights, folder: Path) -> Path:
    """Write the layer as an ONNX model (weights as external data) into `folder`; returns the .onnx path."""
    s = weights.shape
    e, h = s.experts, s.hidden
    folder.mkdir(parents=True, exist_ok=True)
    attrs = {"activation_type": "swiglu", "k": s.top_k, "normalize_routing_weights": int(s.normalize),
             "swiglu_fusion": 1, "activation_alpha": 1.0, "activation_beta": 0.0, "swiglu_limit": float("inf")}
    if weights.weight_type == "f16":
        op = "MoE"
        tensors = {"fc1": _PerExpert(lambda i: _interleaved(weights.gate[i:i + 1].astype(np.float32),
                                                            weights.up[i:i + 1].astype(np.float32)), e),
                   "fc2": _PerExpert(lambda i: weights.down[i:i + 1].astype(np.float32), e)}
        inputs = ["x2", "logits", "fc1", "", "fc2"]
    else:
        op = "QMoE"
        attrs.update(expert_weight_bits=4, block_size=INT4_GROUP, accuracy_level=0)
        (g, gs, gz), (u, us, uz), (d, ds, dz) = (_int4(weights, n) for n in ("gate", "up", "down"))
        tensors = {"fc1": _interleaved(g, u), "fc1_scales": _interleaved(gs, us), "fc2": d, "fc2_scales": ds}
        zero_points = ["", ""]
        if gz is not None:
            tensors.update(fc1_zp=_interleaved(gz, uz), fc2_zp=dz)
            zero_points = ["fc1_zp", "fc2_zp"]
        inputs = ["x2", "logits", "fc1", "fc1_scales", "", "fc2", "fc2_scales", "", "", "", "", *zero_points]
        if not s.normalize:  # QMoE on CPU (1.32) renormalises the top-k weights whatever the attribute says;
            inputs += ["", "probs"]  # explicit routing weights (softmax over all experts) keep them as they are
    data = folder / "weights.bin"
    initializers = []
    with open(data, "wb") as out:
        for name, value in tensors.items():
            parts = value.parts() if isinstance(value, _PerExpert) else [value]
            offset, dims, dtype = out.tell(), None, None
            for part in parts:
                part = np.ascontiguousarray(part)
                dims = [dims[0] + part.shape[0], *part.shape[1:]] if dims else list(part.shape)
                dtype = part.dtype
                part.tofile(out)
            tensor = TensorProto(name=name, data_type=_FLOAT[dtype], dims=dims, raw_data=b"")
            set_external_data(tensor, location=data.name, offset=offset, length=out.tell() - offset)
            tensor.data_location = TensorProto.EXTERNAL
            initializers.append(tensor)
    router = np.ascontiguousarray(weights.router.T, np.float32)
    initializers += [helper.make_tensor("router", TensorProto.FLOAT, router.shape, router.tobytes(), raw=True),
                     helper.make_tensor("flat", TensorProto.INT64, [2], [-1, h]),
                     helper.make_tensor("back", TensorProto.INT64, [3], [1, -1, h])]
    nodes = [helper.make_node("Reshape", ["x", "flat"], ["x2"]),
             helper.make_node("MatMul", ["x2", "router"], ["logits"]),
             helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
             helper.make_node(op, inputs, ["y2"], domain="com.microsoft", **attrs),
             helper.make_node("Reshape", ["y2", "back"], ["y"])]
    graph = helper.make_graph(nodes, f"{s.name}-ort-{op}",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", h])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "T", h])], initializers)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    path = folder / f"{op.lower()}.onnx"
    path.write_bytes(model.SerializeToString())  # onnx.save would rewrite the external data
    return path


class OrtForm:
    """An ORT session with the interface benchmarks/lowering.py's Timed needs (infer on one input)."""

    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def infer(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {"x": x})[0]
