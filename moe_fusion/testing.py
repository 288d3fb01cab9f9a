"""For test suites: `assert_equivalent(original, fused)` fails with the one-line reason; `generate_logits`
runs a greedy prefill and decode (this project's LLM tests compare lowered and original models with it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import openvino as ov

from moe_fusion.checking import CheckReport, check
from moe_fusion.graph import output_name
from moe_fusion.inputs import LLM_INPUTS, llm_feed
from moe_fusion.runtime import Runner, run_config


def assert_equivalent(original: ov.Model | str | Path, fused: ov.Model | str | Path, **kwargs: Any) -> CheckReport:
    """`moe_fusion.check(original, fused, **kwargs)`; raise AssertionError with the reason if not equivalent.

    Returns the report when equivalent (e.g. to log `report.summary()` or assert on `report.top1`).
    Inputs that cannot be compared (unreadable models, different inputs) raise `moe_fusion.io.InputError`.
    """
    report = check(original, fused, **kwargs)
    if not report.equivalent:
        raise AssertionError(f"{report.fused} is not equivalent to {report.original}: {report.reason}")
    return report


def generate_logits(
    model: ov.Model, vocab: int, prompt: int = 12, steps: int = 3, seed: int = 0, device: str = "CPU"
) -> list[np.ndarray]:
    """Logits of a random prompt's prefill and of `steps` greedy decode steps, f32 on `device`."""
    runner = Runner(model, device, run_config(device))
    runner.request.reset_state()
    params = {output_name(p.output(0)): p for p in model.get_parameters()}
    unknown = sorted(set(params) - set(LLM_INPUTS))
    if unknown:
        raise ValueError(f"unexpected model input {unknown[0]}")
    ids = np.random.default_rng(seed).integers(0, vocab, (1, prompt))
    past, outs = 0, []
    logits_at = runner.names.index("logits")
    for _ in range(steps + 1):
        logits = runner.run({n: llm_feed(n, p, ids, past) for n, p in params.items()})[logits_at]
        outs.append(logits)
        past += ids.shape[1]
        ids = logits[:, -1:].argmax(-1).astype(np.int64)
    return outs

