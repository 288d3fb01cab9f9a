"""`moe-fusion check` / `moe_fusion.check` / `assert_equivalent` / the pytest plugin, as users run them.

Tolerances are check's defaults (f32 weights: 1e-4 of each output's scale, atol 1e-6; see
docs/checking.md): fused fixtures differ from their originals by ~1e-7 of the logits' scale.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from click.testing import CliRunner
from test_fixtures import FUSES
from test_gptoss import GPTOSS
from test_onnx import FUSES as ONNX_FUSES

import moe_fusion
from moe_fusion.checking import DEFAULT_TOLERANCES, check
from moe_fusion.cli import main
from moe_fusion.facts import is_stateful, vocab_size, weight_type
from moe_fusion.fusing import fuse
from moe_fusion.io import InputError, load, save
from moe_fusion.runtime import Runner, run_config
from moe_fusion.testing import assert_equivalent

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
MIXTRAL = FIXTURES / "gen1-mixtral"
ALL_PAIRS = sorted({*FUSES, *GPTOSS, *ONNX_FUSES})


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def fused_mixtral(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fused") / "mixtral"
    model = load(MIXTRAL)
    assert fuse(model).fused
    return save(model, MIXTRAL, out)


@pytest.mark.parametrize("fixture", ALL_PAIRS)
def test_every_fused_fixture_passes(fixture, tmp_path):
    source = FIXTURES / fixture
    model = load(source)
    report = fuse(model)
    assert report.fused and not report.skipped, report.table()
    save(model, source, tmp_path / "fused")
    fast = ("--steps", "1", "--tokens", "1,16", "--json", tmp_path / "r.json", "--in-process")
    code, out, err = run("check", source, tmp_path / "fused", *fast)
    assert code == 0, err
    assert out.startswith("equivalent (")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["equivalent"] and data["max_rel"] <= 1e-4
    if fixture != "convert-olmoe-block":  # LLMs: logits compared, greedy tokens agree everywhere
        assert data["top1"] == 1.0
        steps = {o["step"] for o in data["outputs"] if o["output"] == "logits"}
        expected = {"prefill 1", "prefill 1 + decode 1", "prefill 16", "prefill 16 + decode 1"}
        assert steps == (expected if data["stateful"] else {"1 tokens", "16 tokens"})


def test_llm_inputs_are_read_from_the_model():
    model = load(MIXTRAL)
    config = json.loads((MIXTRAL / "config.json").read_text())
    assert vocab_size(model) == config["vocab_size"]  # from the embedding table behind input_ids
    assert is_stateful(model) and weight_type(model) == "f32"
    block = load(FIXTURES / "convert-olmoe-block")
    assert vocab_size(block) is None and not is_stateful(block)


def test_identical_models_agree_exactly_and_report_every_step():
    model = load(MIXTRAL)
    report = check(model, model.clone(), tokens=(2, 5), steps=2)
    assert report.equivalent and report.max_abs == 0.0 and report.top1 == 1.0
    assert [o.step for o in report.outputs] == [
        "prefill 2", "prefill 2 + decode 1", "prefill 2 + decode 2",
        "prefill 5", "prefill 5 + decode 1", "prefill 5 + decode 2",
    ]  # fmt: skip
    assert [o.shape for o in report.outputs][:2] == [[1, 2, 256], [1, 1, 256]]
    assert all(o.cosine == pytest.approx(1.0) for o in report.outputs)


def test_f32_runs_keep_the_kv_cache_f32():
    """check's f32 configuration compiles a stateful model with an f32 KV cache. Without asking, the CPU plugin
    keeps it u8 or f16 (f16 here, u8 for deploy-glm4moe) even with INFERENCE_PRECISION_HINT=f32: a 1e-8
    summation-order difference upstream of a layer's K/V then rounds a cached value to the next step of that
    format, and the first decode step differs by 1e-4 of the logits' scale (a fused fuzz mutant called
    WRONG: test_fuzz.py)."""
    runner = Runner(load(MIXTRAL), "CPU", run_config("CPU"))
    for name in ("KV_CACHE_PRECISION", "KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION"):
        assert runner.compiled.get_property(name) == ov.Type.f32, name


def test_a_check_at_bf16_keeps_the_kv_cache_bf16():
    """`check --precision bf16` compares at bf16: the cache is bf16 too, not the plugin's u8/f16 default."""
    runner = Runner(load(MIXTRAL), "CPU", run_config("CPU", "bf16"))
    assert runner.compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    for name in ("KEY_CACHE_PRECISION", "VALUE_CACHE_PRECISION"):
        assert runner.compiled.get_property(name) == ov.Type.bf16, name


def test_f16_weights_get_f16_tolerances_and_still_pass(tmp_path):
    """f16-compressed weights (behind decompression Converts) fuse and check with the f16 defaults."""
    ov.save_model(load(MIXTRAL), tmp_path / "f16.xml", compress_to_fp16=True)
    original = moe_fusion.read_model(tmp_path / "f16.xml")
    assert weight_type(original) == "f16"
    fused = original.clone()
    assert fuse(fused).fused
    report = check(original, fused, tokens=(16,), steps=1)
    assert (report.atol, report.rtol) == DEFAULT_TOLERANCES["f16"]
    assert report.equivalent and report.max_rel < 1e-5, report.summary()


def test_different_models_exit_1_with_one_line(fused_mixtral):
    code, _out, err = run("check", FIXTURES / "gen2-mixtral", fused_mixtral, "--steps", "0", "--tokens", "4")
    assert code == 1
    assert err.count("\n") == 1 and err.startswith("moe-fusion: NOT equivalent: output 'logits' at prefill 4: ")


def test_json_report_and_verbose_table(fused_mixtral, tmp_path):
    fast = ("--steps", "1", "--tokens", "3", "-v", "--json", tmp_path / "r.json")
    code, out, err = run("check", MIXTRAL, fused_mixtral, *fast)
    assert code == 0, err
    assert "prefill 3 + decode 1" in out and "cosine" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert set(data) >= {"equivalent", "reason", "weight_type", "atol", "rtol", "outputs", "max_abs", "top1", "vocab"}
    assert set(data["outputs"][0]) >= {"output", "step", "max_abs", "max_rel", "cosine", "top1", "worst", "ok"}


BAD = {
    "missing fused": (lambda f: [MIXTRAL, "nope/"], "no such file"),
    "bad tokens": (lambda f: [MIXTRAL, f, "--tokens", "1,x"], "--tokens"),
    "zero tokens": (lambda f: [MIXTRAL, f, "--tokens", "0"], "token counts must be >= 1"),
    "bad precision": (lambda f: [MIXTRAL, f, "--precision", "int3"], "precision"),
    "different inputs": (lambda f: [FIXTURES / "convert-olmoe-block", f], "different inputs"),
    "bad device": (lambda f: [MIXTRAL, f, "--device", "NOPE"], "does not compile on NOPE"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_exit_2_one_line(case, fused_mixtral):
    args, message = BAD[case]
    code, _out, err = run("check", *args(fused_mixtral))
    assert code == 2, err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_fused_model_that_fails_to_run_is_not_equivalent():
    x = ops.parameter([-1, 4], np.float32, name="x")
    original = ov.Model([ops.relu(x)], [x])
    y = ops.parameter([-1, 4], np.float32, name="x")
    broken = ov.Model([ops.relu(ops.reshape(y, [-1, 3], False))], [y])  # fails on T*4 not divisible by 3
    report = check(original, broken, tokens=(1,))
    assert not report.equivalent and report.reason.startswith("fused model fails at 1 tokens")
    z = ops.parameter([-1, 4], np.float32, name="z")
    with pytest.raises(InputError, match="different inputs"):
        check(original, ov.Model([ops.relu(z)], [z]))


def test_assert_equivalent(fused_mixtral):
    report = assert_equivalent(MIXTRAL, fused_mixtral, tokens=(4,), steps=1)
    assert report.equivalent and moe_fusion.check is check
    with pytest.raises(AssertionError, match=r"is not equivalent to .*output 'logits' at prefill 4"):
        assert_equivalent(FIXTURES / "gen2-mixtral", fused_mixtral, tokens=(4,), steps=0)


def test_pytest_plugin_as_a_user_writes_it(fused_mixtral, tmp_path):
    """A user's test file, run by pytest in a subprocess: the plugin is found through its entry point."""
    (tmp_path / "test_user.py").write_text(
        textwrap.dedent(
            f"""
            import pytest

            ORIGINAL, FUSED, OTHER = {str(MIXTRAL)!r}, {str(fused_mixtral)!r}, {str(FIXTURES / "gen2-mixtral")!r}

            def test_fixture(moe_equivalence):
                report = moe_equivalence(ORIGINAL, FUSED)
                assert report.top1 == 1.0

            @pytest.mark.moe_equivalent(ORIGINAL, FUSED)
            def test_marker(moe_report):
                assert moe_report.equivalent

            @pytest.mark.moe_equivalent(OTHER, FUSED)
            def test_marker_catches_a_wrong_pair():
                pass

            def test_fixture_catches_a_wrong_pair(moe_equivalence):
                moe_equivalence(OTHER, FUSED, steps=0)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rf", "--moe-steps", "1", "--moe-tokens", "3", "test_user.py"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    out = result.stdout
    assert "2 failed, 2 passed" in out, out + result.stderr
    assert "FAILED test_user.py::test_marker_catches_a_wrong_pair" in out
    assert "FAILED test_user.py::test_fixture_catches_a_wrong_pair" in out
    assert "is not equivalent to" in out and "output 'logits' at prefill 3" in out
