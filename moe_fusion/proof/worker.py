"""The proof's worker side: each side of a proof (the cut-out block, its replacement) runs in a worker
process of its own (moe_fusion.isolate: a crash of OpenVINO declines the block, not the caller), on the
weights as stored: large constants are inputs fed with the bytes of the file they live in
(moe_fusion.mapped), never an f32 copy of all experts."""

from __future__ import annotations

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion import isolate, mapped
from moe_fusion.lower import lower
from moe_fusion.runtime import F32, core


def run_cut(xml: str, weights: list[mapped.FileBytes], feeds: str, target: str | None, modes: tuple) -> list:
    """In a worker process: read the cut-out model, lower it to `target` (the replacement), feed it its
    mapped weights, compile it f32 on CPU and run each feed list; returns every run's outputs.

    `modes`, tried in order until one runs: the weights as Parameters of a dynamic shape ("dynamic": the
    plugin holds no copy of them), of their static shape ("static"), or as Constants over the mapped bytes
    ("constant": the plugin's compressed kernels, which refuse weights that are not constants). `feeds`: an
    .npz file of the runs' inputs (a file: both workers load it at once, instead of the caller writing MBs
    down each one's pipe while it starts)."""
    with np.load(feeds) as stored:
        runs = [[stored[f"{r}_{i}"] for i in range(int(stored[f"{r}_count"]))] for r in range(int(stored["runs"]))]
    errors = []
    for mode in modes:
        try:
            return _run_mode(xml, weights, runs, target, mode)
        except RuntimeError as error:
            errors.append(error)
    raise errors[0]


def _run_mode(xml: str, weights: list[mapped.FileBytes], runs: list, target: str | None, mode: str) -> list:
    model = core().read_model(xml)
    feeds = {p.get_friendly_name(): weights[int(p.get_friendly_name()[len(mapped.WEIGHT_PREFIX) :])]
             for p in model.get_parameters() if p.get_friendly_name().startswith(mapped.WEIGHT_PREFIX)}
    mappings = []  # alive as long as the Tensors over them
    if mode == "constant":
        for param in [p for p in model.get_parameters() if p.get_friendly_name() in feeds]:
            tensor, mapping = feeds.pop(param.get_friendly_name()).tensor()
            mappings.append(mapping)
            param.output(0).replace(ops.constant(tensor, shared_memory=True).output(0))
            model.remove_parameter(param)
    if target:
        lower(model, target)
        _per_expert_parameters(model, feeds)
    if mode == "dynamic":
        mapped.relax(model)
    params = model.get_parameters()
    request = core().compile_model(model, "CPU", F32).create_infer_request()
    data = [i for i, p in enumerate(params) if p.get_friendly_name() not in feeds]
    for i, param in enumerate(params):
        if param.get_friendly_name() in feeds:
            tensor, mapping = feeds[param.get_friendly_name()].tensor()
            mappings.append(mapping)
            request.set_input_tensor(i, tensor)
    results = []
    for inputs in runs:
        for i, array in zip(data, inputs, strict=True):
            request.set_input_tensor(i, ov.Tensor(np.ascontiguousarray(array)))
        request.infer()
        results.append([np.array(request.get_output_tensor(o).data) for o in range(len(request.model_outputs))])
    return results


def _per_expert_parameters(model: ov.Model, feeds: dict[str, mapped.FileBytes]) -> None:
    """`Gather(stacked weight, e, axis 0)` (how the per-expert lowering reads a non-constant weight) becomes
    a Parameter of its own fed with expert e's bytes: each expert's weight is then read where it is used,
    not gathered up front into a copy of every expert."""
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Gather":
            continue
        source, index, axis = (v.get_node() for v in node.input_values())
        name = source.get_friendly_name()
        if name not in feeds or index.get_type_name() != "Constant" or axis.get_type_name() != "Constant":
            continue
        whole, expert = feeds[name], int(index.get_data().reshape(-1)[0]) if index.get_data().size == 1 else -1
        count = whole.shape[0]
        if int(axis.get_data().reshape(-1)[0]) != 0 or not 0 <= expert < count or whole.nbytes % count:
            continue
        step = whole.nbytes // count
        part = mapped.FileBytes(whole.path, whole.offset + expert * step, whole.element_type, whole.shape[1:], step)
        param = ops.parameter(list(part.shape), node.get_output_element_type(0))
        param.set_friendly_name(f"{name}_expert{expert}")
        node.output(0).replace(param.output(0))
        model.add_parameters([param])
        feeds[param.get_friendly_name()] = part
    for param in model.get_parameters():
        if param.get_friendly_name() in feeds and not param.output(0).get_target_inputs():
            model.remove_parameter(param)
            del feeds[param.get_friendly_name()]


# The proof's two sides run in their own processes, at the same time (one compiles while the other runs).
WORKERS = (isolate.Worker(), isolate.Worker())


def start_workers() -> None:
    """Start the proof's worker processes ahead of the first proof (each takes ~0.5 s to import OpenVINO)."""
    for worker in WORKERS:
        worker.start()


# The replacement runs as FusedExperts lowered to native ops that read the same stored weights as the
# original (FusedExperts itself, a Python op, would need every expert in f32); that each lowering computes
# FusedExperts is tested on its own (tests/test_lower.py, tests/test_op_contract.py). Float weights: one GEMM
# per expert, each expert's weight a Parameter converted where it is used. Integer-compressed weights: the
# plugin's compressed kernels on Constants over the mapped bytes (decompressing them op by op instead keeps
# every expert's f32 copy alive at once: 3.1 GB for a 0.73 GB int4 Mixtral layer, 1.0 GB this way).
# (target, modes of the original side, modes of the replacement side)
PLAIN = ("per-expert", ("dynamic", "static", "constant"), ("dynamic", "static", "constant"))


COMPRESSED = ("cpu", ("constant", "dynamic", "static"), ("constant", "dynamic", "static"))


# The original side of an integer-compressed block with many small experts runs its own decompression ops
# (Convert, Subtract, Multiply) on Parameters over the mapped bytes instead (moe_fusion.proof.protocol
# chooses): as Constants, the plugin's compressed FullyConnected repacks every expert's weights at its first
# run with rows (+0.6 GB of anonymous memory for a 0.31 GB int4 Qwen3-30B-A3B layer of 128 experts; that
# worker peaks at 0.27 GB op by op), while op by op it holds a few f32 expert matrices at a time (measured:
# about F32_MATRICES_HELD of them; 1.4 GB for Mixtral-8x7B's 8 large experts, which stay Constants). The
# values are the same f32 ops either way ((u4 - zero point) * f16 scale is even exact in f32).
COMPRESSED_ORIGINAL_OP_BY_OP = ("dynamic", "static", "constant")
F32_MATRICES_HELD = 6
