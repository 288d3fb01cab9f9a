"""`check --mode layers`: both models run segment by segment, one MoE layer compiled at a time, every
segment on the original's real values at its inputs; every value a fused segment hands on is compared."""

from __future__ import annotations

import numpy as np
import openvino as ov

from moe_fusion.checking.jobs import Job, Side, Step, lowered, runs_python_op, say
from moe_fusion.checking.report import CheckReport, compare_output
from moe_fusion.checking.segments import Segments, anchors, output_key
from moe_fusion.facts import is_stateful
from moe_fusion.graph import output_name
from moe_fusion.inputs import step_feeds
from moe_fusion.io import InputError, first_line
from moe_fusion.runtime import Runner


def layer_steps(job: Job, model: ov.Model) -> list[Step]:
    """Every step's inputs, decided before anything runs (segment by segment, the logits that greedy
    decoding would follow are not known until the last segment): decode tokens are random."""
    params = {output_name(p.output(0)): p for p in model.get_parameters()}
    stateful, llm = is_stateful(model), "input_ids" in params
    rng = np.random.default_rng(job.seed)
    steps = []
    for count in job.tokens:
        past = 0
        for i in range(job.steps + 1 if stateful else 1):
            n = count if i == 0 else 1
            ids = rng.integers(0, job.vocab, (1, n)) if llm else None
            label = (f"prefill {count}" + (f" + decode {i}" if i else "")) if stateful else f"{count} tokens"
            steps.append(Step(label, count, i == 0, step_feeds(params, llm, ids, past, n, rng)))
            past += n
            if not llm:
                break
    return steps


def run_layers(job: Job, model: ov.Model, lower_it: bool, side: Side) -> Side:
    """Segment by segment (moe_fusion.checking.segments): each compiled alone and freed before the next. Every
    segment of both sides reads the ORIGINAL's values at its cuts, so each is compared on the same real
    inputs, and errors do not carry from one layer to the next."""
    if job.role == "fused" and not lower_it and runs_python_op(model):
        raise InputError("--mode layers cannot run FusedExperts as it is: OpenVINO never frees a compiled model "
                         "holding a Python op, so every segment's f32 weights would stay in memory; use "
                         "--fused-experts lower (or auto), or --mode whole")
    side.steps = job.given if job.given is not None else layer_steps(job, model)
    side.anchors = anchors(model) if job.anchors is None else job.anchors
    cuts = dict(job.cuts or {})  # key -> value at every step: the original's, as they are computed
    try:
        cut = Segments(model, side.anchors)
    except ValueError as error:
        raise InputError(f"{job.role} model: {error}; compare the whole models (--mode whole)") from None
    side.segments = cut.count
    for number, segment in enumerate(cut, start=1):
        say(job, f"segment {number}/{cut.count}")
        missing = [n for n in segment.inputs if n not in cuts and n not in side.steps[0].feeds]
        if missing:
            raise InputError(
                f"the models do not cut alike at their MoE blocks: the {job.role} model's segment {segment.index} "
                f"reads '{missing[0]}', which the original does not compute before it; compare the whole "
                "models (--mode whole)"
            )
        sub = lowered(segment.model) if lower_it else segment.model
        values: list[list[np.ndarray]] = [[] for _ in segment.outputs]
        for i, step in enumerate(side.steps):
            if step.reset:  # compiled afresh per prompt length, as in whole mode
                runner = None
                try:
                    runner = Runner(sub, job.device, job.config)
                except RuntimeError as error:
                    side.error = f"does not compile on {job.device} (segment {segment.index}): {first_line(error)}"
                    return side
            try:
                outputs = runner.run([cuts[n][i] if n in cuts else step.feeds[n] for n in segment.inputs])
            except (RuntimeError, ValueError) as error:
                side.error = f"fails at {step.label} (segment {segment.index}): {first_line(error)}"
                return side
            for slot, value in zip(values, outputs, strict=True):
                slot.append(value)
        side.outputs.append((segment.index, segment.outputs, values))
        del runner, sub, segment
        if job.given is None:  # the original's values feed the later segments of both sides
            cuts.update(zip(side.outputs[-1][1], values, strict=True))
    return side


def compare_layers(report: CheckReport, want: Side, got: Side) -> None:
    """Every value a fused segment hands on (cuts and model outputs) against the original's same value.
    Values only the original computes (e.g. shapes its unfused blocks read) are not needed by the fused
    model; model outputs must all be compared."""
    theirs = {index: dict(zip(names, values, strict=True)) for index, names, values in want.outputs}
    outputs = {output_key(i): name for i, name in enumerate(want.names)}  # the model's outputs, by position
    compared = set()
    for index, names, values in got.outputs:
        for name, per_step in zip(names, values, strict=True):
            if name not in theirs.get(index, {}):
                raise InputError(f"the models do not cut alike at their MoE blocks: the fused model's segment {index} "
                                 f"computes '{name}', the original's does not; compare the whole models (--mode whole)")
            compared.add(name)
            shown = outputs.get(name, name)
            for step, a, b in zip(want.steps, theirs[index][name], per_step, strict=True):
                label = f"{step.label}, segment {index}"
                report.add(compare_output(shown, label, step.tokens, a, b, report.atol, report.rtol, shown == "logits"))
    missing = [n for key, n in outputs.items() if key not in compared]
    if missing:
        raise InputError(f"the models do not cut alike at their MoE blocks: the fused model's output '{missing[0]}' "
                         "is not computed in the same segment; compare the whole models (--mode whole)")

