"""`check --mode whole`: each whole model compiled and run, the original first (recording its outputs and
the greedy tokens both follow), then the fused model on the same steps; every output compared."""

from __future__ import annotations

import numpy as np
import openvino as ov

from moe_fusion.checking.jobs import Job, Side, Step, given_runs, lowered, runs_python_op, say
from moe_fusion.checking.report import CheckReport, compare_output
from moe_fusion.facts import is_stateful
from moe_fusion.graph import output_name
from moe_fusion.inputs import step_feeds
from moe_fusion.io import first_line
from moe_fusion.runtime import Runner


def run_whole(job: Job, model: ov.Model, lower_it: bool, side: Side) -> Side:
    """The whole model, compiled afresh per prompt length: a prefill and greedy decode steps each."""
    if lower_it:
        lowered(model)
    params = {output_name(p.output(0)): p for p in model.get_parameters()}
    stateful, llm = is_stateful(model), "input_ids" in params
    logits_at = next((i for i, n in enumerate(side.names) if n == "logits"), None)
    rng = np.random.default_rng(job.seed)
    runs = given_runs(job.given) if job.given is not None else [[None] * (job.steps + 1 if stateful else 1)
                                                                 for _ in job.tokens]
    # Compiled afresh per prompt length: the plugin's per-shape weight packings do not pile up. Not with
    # FusedExperts run as is: OpenVINO never frees a compiled model holding a Python op (measured: each
    # compile of the Qwen3-30B-A3B layer keeps its 2.4 GB of f32 weights), so it is compiled once.
    once = runs_python_op(model)
    runner = None
    for count, run in zip(job.tokens, runs, strict=True):
        say(job, f"compiling for prefill {count}")
        if runner is None or not once:
            runner = None
            try:
                runner = Runner(model, job.device, job.config)
            except RuntimeError as error:
                side.error = f"does not compile on {job.device}: {first_line(error)}"
                return side
        runner.request.reset_state()
        ids = rng.integers(0, job.vocab, (1, count)) if llm and job.given is None else None
        past = 0
        for i, given in enumerate(run):
            if given is None:
                label = (f"prefill {count}" + (f" + decode {i}" if i else "")) if stateful else f"{count} tokens"
                given = Step(label, count, i == 0, step_feeds(params, llm, ids, past, count if i == 0 else 1, rng))
            try:
                outputs = runner.run(given.feeds)
            except (RuntimeError, ValueError) as error:
                side.error = f"fails at {given.label}: {first_line(error)}"
                return side
            side.steps.append(given)
            side.outputs.append(outputs)
            if not llm or job.given is not None:
                continue
            past += ids.shape[1]
            if logits_at is None:
                ids = rng.integers(0, job.vocab, (1, 1))
            else:  # greedy on the ORIGINAL's logits: both models follow the same path
                logits = outputs[logits_at]
                ids = logits.reshape(1, -1, logits.shape[-1])[:, -1:].argmax(-1).astype(np.int64)
    return side



def compare_whole(report: CheckReport, want: Side, got: Side) -> None:
    for step, outs_a, outs_b in zip(want.steps, want.outputs, got.outputs, strict=True):
        for i, name in enumerate(want.names):
            report.add(compare_output(name, step.label, step.tokens, outs_a[i], outs_b[i], report.atol, report.rtol,
                                  name == "logits"))

