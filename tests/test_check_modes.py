"""`check`'s modes: whole (each model alone, one after the other) and layers (segment by segment at the MoE
blocks), FusedExperts run as is or lowered per expert, and each side in a child process.

Tolerances are check's defaults (f32 weights: 1e-4 of each output's scale; int4: 1e-3): fused fixtures differ
from their originals by ~1e-7 of the scale, the injected faults (tests/test_faults.py) by far more.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from test_faults import inject, scale_routing, swap_experts, zero_expert

import moe_fusion
from moe_fusion import host
from moe_fusion.checking import check
from moe_fusion.checking.segments import Segments, anchors
from moe_fusion.cli import main
from moe_fusion.fusing import fuse
from moe_fusion.io import InputError, load, save
from moe_fusion.isolate import WorkerCrash, run_isolated
from moe_fusion.lower import PER_EXPERT, lower

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
FAST = {"tokens": (1, 16), "steps": 1}
PAIRS: dict[str, tuple] = {}


def pair(name: str):
    if name not in PAIRS:
        original = load(FIXTURES / name)
        fused = original.clone()
        assert fuse(fused, verify=False).fused
        PAIRS[name] = (original, fused)
    return PAIRS[name]


def lowered(model, target=PER_EXPERT):
    copy = model.clone()
    lower(copy, target)
    return copy


@pytest.mark.parametrize("mode", ["whole", "layers"])
@pytest.mark.parametrize("fixture", ["gen1-mixtral", "gen2-qwen3moe-norm", "gen1-gptoss", "convert-olmoe-block"])
def test_fused_and_lowered_fixtures_are_equivalent(fixture, mode):
    original, fused = pair(fixture)
    for candidate in (fused, lowered(fused, "cpu")):
        report = check(original, candidate, mode=mode, **FAST)
        assert report.equivalent and report.max_rel < 1e-5, report.summary()
        assert report.mode == mode
    if fixture != "convert-olmoe-block":
        assert report.top1 == 1.0
        steps = {o.step for o in report.outputs if o.output == "logits"}
        assert {s.split(",")[0] for s in steps} == {"prefill 1", "prefill 1 + decode 1", "prefill 16",
                                                   "prefill 16 + decode 1"}


FAULTS = {"two experts swapped": swap_experts, "one expert zeroed": zero_expert, "routing scaled": scale_routing}


@pytest.mark.parametrize("mode", ["whole", "layers"])
@pytest.mark.parametrize("fault", FAULTS)
def test_faults_are_not_equivalent(fault, mode):
    original, fused = pair("gen1-mixtral")
    report = check(original, inject(fused, FAULTS[fault]), mode=mode, **FAST)
    assert not report.equivalent, report.summary()
    if mode == "layers":  # the first MoE block's fault shows in the segment that holds it, not only at the logits
        assert ", segment 1: max |diff|" in report.reason, report.reason
    else:
        assert report.reason.startswith("output 'logits' at prefill"), report.reason


def test_layers_compile_one_moe_layer_at_a_time():
    """Each segment holds at most one MoE block's experts: what bounds the layers mode's memory."""
    original, fused = pair("gen1-qwen3moe")
    names = anchors(original)
    assert len(names) == 2
    expert_weights = {}
    for label, model in (("original", original), ("fused", fused)):
        cut = Segments(model, names)
        assert cut.count == 3
        per_segment = []
        for segment in cut:
            ops = segment.model.get_ordered_ops()
            layers = {n.get_friendly_name().split(".mlp")[0] for n in ops
                      if n.get_type_name() == "Constant" and ".experts." in n.get_friendly_name()}
            per_segment.append(len(layers))
            if label == "fused":
                assert sum(n.get_type_name() == "FusedExperts" for n in ops) <= 1
        expert_weights[label] = per_segment
    assert expert_weights["original"] == [0, 1, 1]
    assert len(original.get_ordered_ops()) == len(load(FIXTURES / "gen1-qwen3moe").get_ordered_ops())  # untouched


def test_int4_fused_experts_are_lowered_by_default():
    original, fused = pair("gen1-mixtral-int4-g32-asym")
    auto = check(original, fused, **FAST)
    assert auto.equivalent and auto.fused_experts == "lowered per-expert", auto.summary()
    run = check(original, fused, fused_experts="run", **FAST)
    assert run.equivalent and run.fused_experts == "run as is", run.summary()
    f32 = pair("gen1-mixtral")
    assert check(*f32, **FAST).fused_experts == "run as is"
    bad = check(original, inject(fused, scale_routing), mode="layers", **FAST)
    assert not bad.equivalent and "segment 1" in bad.reason


def test_models_that_do_not_cut_alike_are_bad_input():
    original, _ = pair("gen1-mixtral")
    with pytest.raises(InputError, match="compare the whole models"):
        check(original, load(FIXTURES / "gen1-qwen3moe"), mode="layers", **FAST)


def test_cli_modes_in_child_processes(tmp_path):
    _original, fused = pair("gen1-mixtral")
    save(fused, FIXTURES / "gen1-mixtral", tmp_path / "fused")
    save(inject(fused, swap_experts), FIXTURES / "gen1-mixtral", tmp_path / "bad")
    fast = ("--tokens", "4", "--steps", "1")
    for mode in ("whole", "layers"):
        ok = CliRunner().invoke(main, ["check", str(FIXTURES / "gen1-mixtral"), str(tmp_path / "fused"), "--mode",
                                       mode, *fast])
        assert ok.exit_code == 0 and ok.stdout.startswith("equivalent ("), ok.output
        bad = CliRunner().invoke(main, ["check", str(FIXTURES / "gen1-mixtral"), str(tmp_path / "bad"), "--mode",
                                        mode, *fast])
        assert bad.exit_code == 1 and bad.stderr.count("\n") == 1, bad.output
        assert bad.stderr.startswith("moe-fusion: NOT equivalent: output ")
    wrong = CliRunner().invoke(main, ["check", str(FIXTURES / "gen1-mixtral"), str(tmp_path / "fused"), "--mode", "x"])
    assert wrong.exit_code == 2


def _answer(x):
    return np.full(3, x)


def _fails(message):
    raise InputError(message)


def test_run_isolated_returns_raises_and_survives_a_crash():
    assert run_isolated(_answer, 7).tolist() == [7, 7, 7]
    with pytest.raises(InputError, match="bad model"):
        run_isolated(_fails, "bad model")
    with pytest.raises(WorkerCrash, match="killed by SIGABRT") as caught:
        run_isolated(os.abort)  # a native abort in the child, as a crashing runtime does
    assert caught.value.signal == "SIGABRT"
    assert moe_fusion.check is check


def test_pytest_plugin_mode_option(tmp_path):
    _original, fused = pair("gen1-mixtral")
    save(fused, FIXTURES / "gen1-mixtral", tmp_path / "fused")
    (tmp_path / "test_user.py").write_text(
        "import pytest\n\n"
        f"@pytest.mark.moe_equivalent({str(FIXTURES / 'gen1-mixtral')!r}, {str(tmp_path / 'fused')!r})\n"
        "def test_marker(moe_report):\n"
        "    assert moe_report.mode == 'layers' and moe_report.segments == 3\n"
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "--moe-steps", "1", "--moe-tokens", "3", "--moe-mode", "layers",
         "test_user.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert "1 passed" in result.stdout, result.stdout + result.stderr


def test_layers_refuses_to_run_fused_experts_as_is():
    """OpenVINO keeps every compiled model holding a Python op: segment after segment, their f32 weights
    would add up to the model's. Layers mode lowers FusedExperts (auto) or refuses to run them as is."""
    original, fused = pair("gen1-mixtral")
    assert check(original, fused, mode="layers", **FAST).fused_experts == "lowered per-expert"
    with pytest.raises(InputError, match="cannot run FusedExperts as it is"):
        check(original, fused, mode="layers", fused_experts="run", **FAST)


def test_whole_mode_that_would_not_fit_points_to_layers(monkeypatch):
    original, fused = pair("gen1-mixtral")
    monkeypatch.setattr(host, "available_memory", lambda: 1000)  # the host fact every memory check reads
    with pytest.raises(InputError, match=r"needs about .* GB of memory, 0.0 GB are available: use --mode layers"):
        check(original, fused, **FAST)
    assert check(original, fused, mode="layers", **FAST).equivalent  # layers needs no such room
