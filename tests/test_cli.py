"""The `moe-fusion` command as users run it: outputs, reports, exit codes, one-line errors, safe writes."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from click.testing import CliRunner

import moe_fusion
from moe_fusion.cli import main

FIXTURE = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "gen1-qwen3moe"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_fuse_folder_writes_a_usable_folder_and_report(tmp_path):
    before = digest(FIXTURE)
    code, out, err = run("fuse", FIXTURE, "-o", tmp_path / "fused", "--report", tmp_path / "r.json")
    assert code == 0, err
    assert "2 blocks fused, 0 skipped" in out and "per_expert_loop" in out
    assert {p.name for p in (tmp_path / "fused").iterdir()} == {p.name for p in FIXTURE.iterdir()}
    model = moe_fusion.read_model(tmp_path / "fused" / "openvino_model.xml")
    assert sum(n.get_type_name() == "FusedExperts" for n in model.get_ordered_ops()) == 2
    report = json.loads((tmp_path / "r.json").read_text())
    row = report["blocks"][0]
    assert {
        k: row[k] for k in ("family", "expert_type", "num_experts", "top_k", "hidden", "intermediate", "status")
    } == {
        "family": "per_expert_loop",
        "expert_type": "gemm3_swiglu",
        "num_experts": 8,
        "top_k": 2,
        "hidden": 64,
        "intermediate": 40,
        "status": "fused",
    }
    assert set(row) >= {"name", "router", "shared_expert", "reason"}
    assert digest(FIXTURE) == before  # the input is never modified
    # weights stay f32: the fused .bin holds no f16-compressed copy of the f32 weights
    assert (tmp_path / "fused" / "openvino_model.bin").stat().st_size <= 1.02 * (
        FIXTURE / "openvino_model.bin"
    ).stat().st_size


def test_fuse_xml_to_xml_creating_folders(tmp_path):
    out = tmp_path / "new" / "dir" / "m.xml"
    code, _out, err = run("fuse", FIXTURE / "openvino_model.xml", "-o", out, "--no-verify")
    assert code == 0, err
    assert out.is_file() and out.with_suffix(".bin").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_unwritable_output_path(tmp_path):
    (tmp_path / "a_file").write_text("not a folder")  # works as root too, unlike permission bits
    code, _out, err = run("fuse", FIXTURE, "-o", tmp_path / "a_file" / "out")
    assert code == 2 and "not writable" in err and err.count("\n") == 1


def test_inspect_lists_blocks_and_writes_nothing(tmp_path):
    code, out, _ = run("inspect", FIXTURE, "--json")
    assert code == 0
    blocks = json.loads(out)["blocks"]
    assert [b["status"] for b in blocks] == ["fusable", "fusable"]


def model_without_moe(path: Path) -> Path:
    x = ops.parameter([-1, 4], np.float32, name="x")
    ov.save_model(ov.Model([ops.relu(x)], [x]), path)
    return path


def test_model_without_moe_is_a_no_op_that_says_so(tmp_path):
    code, out, _ = run("fuse", model_without_moe(tmp_path / "plain.xml"), "-o", tmp_path / "out.xml")
    assert code == 0 and "no MoE blocks found" in out


BAD_INPUTS = {
    "missing path": (lambda t: t / "nope.xml", "no such file"),
    "folder without a model": (lambda t: (t / "empty").mkdir() or t / "empty", "folder holds no"),
    "xml without bin": (
        lambda t: model_without_moe(t / "a.xml").with_suffix(".bin").unlink() or t / "a.xml",
        "weights file a.bin is missing",
    ),
    "garbage xml": (
        lambda t: (t / "g.xml").write_text("<net><oops") and (t / "g.bin").write_bytes(b"\x00") and t / "g.xml",
        "cannot read model",
    ),
    "garbage onnx": (lambda t: (t / "g.onnx").write_bytes(b"\x00garbage") and t / "g.onnx", "cannot read model"),
    "not a model file": (lambda t: (t / "notes.txt").write_text("hi") and t / "notes.txt", "expected an IR .xml"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_and_exit_2(case, tmp_path):
    make, message = BAD_INPUTS[case]
    code, _out, err = run("fuse", make(tmp_path), "-o", tmp_path / "out.xml")
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "out.xml").exists()


def test_existing_output_needs_force_and_input_needs_in_place(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "in")
    (tmp_path / "out.xml").write_text("keep me")
    code, _, err = run("fuse", tmp_path / "in", "-o", tmp_path / "out.xml")
    assert code == 2 and "--force" in err and (tmp_path / "out.xml").read_text() == "keep me"
    code, _, err = run("fuse", tmp_path / "in", "-o", tmp_path / "in")
    assert code == 2 and "--in-place" in err
    code, _, err = run("fuse", tmp_path / "in", "-o", tmp_path / "in", "--in-place", "--no-verify")
    assert code == 0, err
    fused = moe_fusion.read_model(tmp_path / "in" / "openvino_model.xml")
    assert any(n.get_type_name() == "FusedExperts" for n in fused.get_ordered_ops())


def test_user_patterns_folder_is_loaded(tmp_path):
    (tmp_path / "mine.py").write_text(
        "from moe_fusion.block import Decline\nFAMILY = 'mine'\n"
        "def find(model):\n"
        "    for n in model.get_ordered_ops():\n"
        "        if n.get_type_name() == 'TopK':\n"
        "            yield Decline('my family looked at it', n, router=n)\n"
    )
    code, out, err = run("inspect", FIXTURE, "--patterns", tmp_path, "--json")
    assert code == 0, err
    families = {b["family"] for b in json.loads(out)["blocks"]}
    assert families == {"per_expert_loop"}  # the block fused by a built-in hides the user's near miss
    (tmp_path / "broken.py").write_text("raise ImportError('nope')\n")
    code, _, err = run("inspect", FIXTURE, "--patterns", tmp_path)
    assert code == 2 and "cannot load pattern module" in err
