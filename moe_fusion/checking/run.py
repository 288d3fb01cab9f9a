"""`check(original, fused)`: whole-model equivalence, run side by side and compared output by output.

`check` feeds both models the same inputs, generated from the original's own Parameters (moe_fusion.inputs).
A stateful model (KV cache in ReadValue/Assign) runs a prefill of each token count and then `steps` greedy
decode steps, its state reset between runs; decode feeds the argmax of the ORIGINAL's logits to both
models so they stay on one path. A stateless model runs once per token count. Every output is compared
at every step (checking.report: moe_fusion.compare's NaN/Inf policy, tolerances by weight type).
Top-1 agreement of logits is reported but is not part of the verdict: differences inside the tolerance
may flip near-ties.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path

import openvino as ov

from moe_fusion import broken, host
from moe_fusion.checking.jobs import FUSED_EXPERTS_MODES, Job, Side, prepare
from moe_fusion.checking.layers import compare_layers, run_layers
from moe_fusion.checking.report import DEFAULT_TOLERANCES, PRECISION_RTOL, CheckReport
from moe_fusion.checking.whole import compare_whole, run_whole
from moe_fusion.facts import is_stateful, stored_bytes, vocab_size, weight_type
from moe_fusion.graph import output_name
from moe_fusion.io import InputError, first_line, load
from moe_fusion.isolate import WorkerCrash, run_isolated
from moe_fusion.lower import RT_INFO
from moe_fusion.runtime import run_config

MODES = ("whole", "layers")


# Peak memory of whole mode per byte of the original's stored weights (its larger side compiled alone),
# measured on this project's real-shape layers (benchmarks/verify_scale.py): f16 2.0-2.1x (int4 1.6x);
# a lowered f16 model's GatherMatmul (cpu target) reaches 4.1x, which this estimate does not foresee.
WHOLE_MODE_BYTES = 2.0


def _as_model(model: ov.Model | str | Path, role: str) -> tuple[ov.Model, str]:
    if isinstance(model, ov.Model):
        try:
            model.clone().validate_nodes_and_infer_types()
        except (RuntimeError, ValueError) as error:
            raise InputError(f"{role} model is invalid: {first_line(error)}") from None
        return model, model.get_friendly_name()
    return load(model), str(model)


def run_job(job: Job) -> Side:
    """Compile and run one side (what `check` runs in a child process per side)."""
    model, lower_it = prepare(job)
    side = Side(names=[output_name(o) for o in model.outputs], lowered=lower_it)
    run = run_layers if job.mode == "layers" else run_whole
    return run(job, model, lower_it, side)


def _run(job: Job, isolate: bool) -> Side:
    if not isolate:
        return run_job(job)
    try:
        return run_isolated(run_job, job)
    except WorkerCrash as error:
        return Side(error=f"crashed the OpenVINO runtime: the process running it was {error}")


def check(
    original: ov.Model | str | Path,
    fused: ov.Model | str | Path,
    *,
    tokens: Iterable[int] = (1, 16, 64),
    steps: int = 3,
    seed: int = 0,
    atol: float | None = None,
    rtol: float | None = None,
    device: str = "CPU",
    precision: str = "f32",
    mode: str = "whole",
    fused_experts: str = "auto",
    isolate: bool = False,
    progress: bool = False,
) -> CheckReport:
    """Compare `fused` with `original` (paths as `moe-fusion fuse` accepts them, or ov.Model objects).

    `mode`: "whole" runs each whole model, one after the other (the original first, recording its outputs
    and the greedy tokens both follow); "layers" runs both segment by segment, one MoE layer compiled at
    a time, every segment on the original's real values at its inputs (docs/checking.md: what each proves).
    `fused_experts`: "run" the FusedExperts op as it is, "lower" a copy to native per-expert ops first,
    or "auto": lower FusedExperts with integer-compressed weights (the Python op dequantises them to
    f32) and, in layers mode, all of them (OpenVINO does not free compiled models holding a Python op).
    `isolate`: run each side in a child process (paths only), so a crash of the OpenVINO runtime
    becomes a verdict instead of killing the caller; `progress`: say on stderr what runs.

    Raises `InputError` (a ValueError) for inputs that cannot be compared: unreadable or invalid models,
    models that differ in their inputs, an original that does not run. A fused model that fails to run,
    or whose outputs differ in count, shape or value, gives a report with `equivalent=False`.
    """
    start = time.perf_counter()
    tokens = [int(t) for t in tokens]
    if not tokens or min(tokens) < 1:
        raise InputError(f"token counts must be >= 1, got {tokens}")
    if steps < 0:
        raise InputError(f"steps must be >= 0, got {steps}")
    if precision not in PRECISION_RTOL:
        raise InputError(f"precision {precision!r} is not one of {', '.join(PRECISION_RTOL)}")
    if mode not in MODES:
        raise InputError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if fused_experts not in FUSED_EXPERTS_MODES:
        raise InputError(f"fused_experts {fused_experts!r} is not one of {', '.join(FUSED_EXPERTS_MODES)}")
    model_a, label_a = _as_model(original, "original")
    found = broken.findings(model_a)
    if found:  # its outputs are wrong whatever it is compared with: equivalence to it proves nothing
        raise InputError(f"{label_a} is a {broken.summary(found)}")
    model_b, label_b = _as_model(fused, "fused")
    wtype = weight_type(model_a)
    if wtype in ("f32", "f16") and _decode_weights(model_b) == "bf16":
        wtype = "bf16"  # a hybrid lowering for bf16 inference stores its decode weights rounded to bf16
    default_atol, default_rtol = DEFAULT_TOLERANCES[wtype]
    atol = default_atol if atol is None else float(atol)
    rtol = max(default_rtol, PRECISION_RTOL[precision]) if rtol is None else float(rtol)
    stateful = is_stateful(model_a)
    vocab = vocab_size(model_a)
    report = CheckReport(label_a, label_b, True, "", wtype, atol, rtol, device, precision, stateful, vocab, mode=mode)

    params_a = {output_name(p.output(0)) for p in model_a.get_parameters()}
    params_b = {output_name(p.output(0)) for p in model_b.get_parameters()}
    if params_a != params_b:
        raise InputError(f"the models take different inputs: {sorted(params_a)} vs {sorted(params_b)}")
    if len(model_a.outputs) != len(model_b.outputs):
        return _fail(report, f"fused model has {len(model_b.outputs)} outputs, original {len(model_a.outputs)}", start)
    if "input_ids" in params_a and vocab is None:
        raise InputError("cannot tell the vocabulary size: no embedding table behind input_ids and no logits width")
    if mode == "whole":
        needed, available = WHOLE_MODE_BYTES * stored_bytes(model_a), host.available_memory()
        if needed > available:
            raise InputError(f"checking the whole models needs about {needed / 1e9:.1f} GB of memory, "
                             f"{available / 1e9:.1f} GB are available: use --mode layers (one layer at a time)")
    isolate = isolate and not isinstance(original, ov.Model) and not isinstance(fused, ov.Model)
    sources = [m if isinstance(m, ov.Model) else str(m) for m in (original, fused)]
    del model_a, model_b  # each side reads its own copy (memory-mapped weights: cheap)
    job = Job(sources[0], "original", mode, device, run_config(device, precision), fused_experts, tokens, steps,
               seed, vocab, progress=progress)
    want = _run(job, isolate)
    if want.error:
        raise InputError(f"original model {want.error}")
    job.source, job.role, job.given, job.anchors = sources[1], "fused", want.steps, want.anchors
    if mode == "layers":
        job.cuts = {name: values for _, names, all_values in want.outputs for name, values in zip(names, all_values,
                                                                                               strict=True)}
    got = _run(job, isolate)
    report.fused_experts = "lowered per-expert" if got.lowered else "run as is"
    report.segments = want.segments
    if got.error:
        return _fail(report, f"fused model {got.error}", start)
    if mode == "whole":
        compare_whole(report, want, got)
    else:
        compare_layers(report, want, got)
    report.seconds = time.perf_counter() - start
    return report


def _fail(report: CheckReport, reason: str, start: float) -> CheckReport:
    report.equivalent, report.reason = False, reason
    report.seconds = time.perf_counter() - start
    return report


def _decode_weights(model: ov.Model) -> str:
    """The precision a `hybrid` lowering stored its decode weights in (moe_fusion.lower's rt_info), or ''."""
    path = [RT_INFO, "lowering", "decode_weights"]
    return model.get_rt_info(path).astype(str) if model.has_rt_info(path) else ""
