"""One side of `check` (the original or the fused model) as a job that can run in a child process: what
it runs (Job), the steps it feeds (Step), what comes back (Side), and preparing its model."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import openvino as ov

from moe_fusion.compressed import mark_decompression
from moe_fusion.graph import constant_behind
from moe_fusion.io import load
from moe_fusion.lower import PER_EXPERT, fused_experts_nodes, lower

# How the fused side runs its FusedExperts: `check`'s fused_experts= and the CLI's --fused-experts.
FUSED_EXPERTS_MODES = ("auto", "run", "lower")


@dataclass
class Step:
    label: str  # "prefill 16 + decode 1", "16 tokens"
    tokens: int  # the prompt length of its run
    reset: bool  # first step of a run: state reset (and, in whole mode, a fresh compile)
    feeds: dict[str, np.ndarray]


@dataclass
class Job:
    """One side's work, picklable so it can run in a child process (`moe_fusion.isolate`)."""

    source: ov.Model | str  # a path (read in the child) or a model (in-process only)
    role: str  # "original" or "fused"
    mode: str
    device: str
    config: dict
    fused_experts: str
    tokens: list[int]
    steps: int
    seed: int
    vocab: int | None
    given: list[Step] | None = None  # fused side: the original's steps
    cuts: dict[str, list[np.ndarray]] | None = None  # layers, fused side: the original's values per step
    anchors: list[str] | None = None  # layers, fused side: the original's MoE block anchors
    progress: bool = False


@dataclass
class Side:
    steps: list[Step] = field(default_factory=list)
    # whole: outputs[i] = the model's outputs at step i; layers: (segment, names, [per step arrays])
    outputs: list = field(default_factory=list)
    names: list[str] = field(default_factory=list)
    error: str = ""  # "does not compile on CPU: ...", "fails at prefill 16: ..."
    segments: int = 0
    anchors: list[str] = field(default_factory=list)
    lowered: bool = False


def compressed_experts(model: ov.Model) -> bool:
    """Does a FusedExperts read integer-compressed weights (which running the Python op dequantises to f32)?"""
    for node in model.get_ordered_ops():
        if node.get_type_name() != "FusedExperts":
            continue
        for value in node.input_values()[3:]:
            if value.get_node().get_type_name() == "Transpose":
                value = value.get_node().input_value(0)
            const = constant_behind(value)
            if const is not None and const.get_element_type().is_integral():
                return True
    return False


def keep_weights_stored(model: ov.Model) -> None:
    """Mark every Convert of an f16/bf16 Constant as OpenVINO's weight decompression: the CPU plugin then
    keeps the weights as stored inside its MatMul kernels instead of folding an f32 copy at compile time.
    The values are the same (f16/bf16 -> f32 is exact); exporters mark their own Converts this way."""
    for node in model.get_ordered_ops():
        if (
            node.get_type_name() == "Convert"
            and node.input_value(0).get_node().get_type_name() == "Constant"
            and node.get_input_element_type(0) in (ov.Type.f16, ov.Type.bf16)
            and "decompression_0" not in node.get_rt_info()
        ):
            mark_decompression(node)


def prepare(job: Job) -> tuple[ov.Model, bool]:
    """The side's model as it will be compiled (a copy: the caller's model is never changed), and whether
    its FusedExperts are to be lowered."""
    model = load(job.source) if not isinstance(job.source, ov.Model) else job.source.clone()
    keep_weights_stored(model)
    # auto: lower where running the op costs more than lowering it: int8/int4 weights (the op reads them
    # dequantised to f32, ~8x their bytes), and segment by segment (see layers.run_layers).
    auto = job.mode == "layers" or compressed_experts(model)
    lower_it = job.role == "fused" and (job.fused_experts == "lower" or (job.fused_experts == "auto" and auto))
    return model, lower_it


def lowered(model: ov.Model) -> ov.Model:
    if fused_experts_nodes(model):
        lower(model, PER_EXPERT)
    return model


def say(job: Job, text: str) -> None:
    if job.progress:
        print(f"moe-fusion: {job.role}: {text}", file=sys.stderr, flush=True)


def runs_python_op(model: ov.Model) -> bool:
    return bool(fused_experts_nodes(model))


def given_runs(steps: list[Step]) -> list[list[Step]]:
    runs: list[list[Step]] = []
    for step in steps:
        if step.reset or not runs:
            runs.append([])
        runs[-1].append(step)
    return runs

