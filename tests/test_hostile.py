"""Hostile inputs and safe output (issue 8, items 3 and 4), through the command as users run it.

Every hostile input ends in one line on stderr and exit 2, or in a clean decline in the report and exit 0
with the reason on stdout; never a traceback; the input is byte for byte what it was. A few run in a real
subprocess, where an uncaught exception would print its traceback. Output is written to a temporary beside
the target and renamed: an interrupted or failed run leaves neither a partial file nor the temporary.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops
import pytest
from click.testing import CliRunner

import moe_fusion
from moe_fusion import catalogue, io
from moe_fusion.candidates import candidates
from moe_fusion.cli import main
from moe_fusion.fusing import fuse
from moe_fusion.proof import prove
from moe_fusion.rewrite import build

FIXTURES = Path(__file__).resolve().parent.parent / "models" / "fixtures"
MIXTRAL = FIXTURES / "gen1-mixtral"  # per-expert loop
TILED = FIXTURES / "gen2-mixtral"  # tiled
EXPERT0_DOWN = "__module.model.layers.0.block_sparse_moe.experts.0.w2/aten::linear/MatMul"


def run(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def run_process(*args) -> tuple[int, str, str]:
    """In a fresh interpreter: an exception escaping the CLI would print its real traceback here."""
    command = [sys.executable, "-c", "from moe_fusion.cli import main; main()", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return done.returncode, done.stdout, done.stderr


def digest(path: Path) -> dict[str, str]:
    """Hashes of a model file (and its .bin) or of every file under a folder."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path, path.with_suffix(".bin")]
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.startswith(".")]


def fused_ops(path: Path) -> int:
    model = moe_fusion.read_model(path)
    return sum(n.get_type_name() == "FusedExperts" for n in model.get_ordered_ops())


def save(model: ov.Model, path: Path) -> Path:
    ov.save_model(model, path, compress_to_fp16=False)
    return path


def nodes(model: ov.Model, kind: str) -> list[ov.Node]:
    return [n for n in model.get_ordered_ops() if n.get_type_name() == kind]


# ---- hostile model builders: each writes into tmp and returns the INPUT path ------------------------------


def plain_model(path: Path) -> Path:
    x = ops.parameter([-1, 4], np.float32, name="x")
    return save(ov.Model([ops.relu(x)], [x]), path)


def model_without_ops(path: Path) -> Path:
    x = ops.parameter([-1, 4], np.float32, name="x")
    return save(ov.Model([ops.result(x)], [x]), path)


def empty_ir(path: Path) -> Path:
    path.write_text('<?xml version="1.0"?>\n<net name="empty" version="11"><layers/><edges/></net>\n')
    path.with_suffix(".bin").write_bytes(b"")
    return path


def truncated_bin(tmp: Path) -> Path:
    shutil.copytree(MIXTRAL, tmp / "in")
    weights = tmp / "in" / "openvino_model.bin"
    os.truncate(weights, weights.stat().st_size // 2)
    return tmp / "in"


def unknown_op(tmp: Path) -> Path:
    shutil.copytree(MIXTRAL, tmp / "in")
    xml = tmp / "in" / "openvino_model.xml"
    xml.write_text(xml.read_text().replace('type="Swish"', 'type="FooBarOp"', 1))
    return tmp / "in"


def garbage_xml(tmp: Path) -> Path:
    (tmp / "g.bin").write_bytes(b"\x00" * 16)
    (tmp / "g.xml").write_text("<net><layers><oops")
    return tmp / "g.xml"


def garbage_onnx(tmp: Path) -> Path:
    (tmp / "g.onnx").write_bytes(b"\x08\x07garbage, not a protobuf\xff\xfe")
    return tmp / "g.onnx"


def xml_without_bin(tmp: Path) -> Path:
    plain_model(tmp / "a.xml").with_suffix(".bin").unlink()
    return tmp / "a.xml"


def nan_weights(tmp: Path) -> Path:
    """One element of expert 0's down projection is NaN (layer 0)."""
    model = moe_fusion.read_model(MIXTRAL / "openvino_model.xml")
    (matmul,) = [n for n in nodes(model, "MatMul") if n.get_friendly_name() == EXPERT0_DOWN]
    data = np.array(matmul.input_value(1).get_node().get_data())
    data[5, 7] = np.nan
    matmul.input(1).replace_source_output(ops.constant(data).output(0))
    return save(model, tmp / "nan.xml")


def dynamic_rank(tmp: Path) -> Path:
    """input_ids of dynamic rank: the hidden states every block reads have a dynamic rank too."""
    model = moe_fusion.read_model(MIXTRAL / "openvino_model.xml")
    model.input("input_ids").get_node().set_partial_shape(ov.PartialShape.dynamic())
    model.validate_nodes_and_infer_types()
    return save(model, tmp / "dynrank.xml")


def shared_router(tmp: Path) -> Path:
    """Layer 1's experts rewired to layer 0's router (as in test_near_misses, here through the CLI)."""
    model = moe_fusion.read_model(TILED / "openvino_model.xml")
    first, second = candidates(model, catalogue.load())[0]
    second.topk_indices.replace(first.topk_indices)
    second.routing_weights.replace(first.routing_weights)
    model.validate_nodes_and_infer_types()
    return save(model, tmp / "shared.xml")


def k_exceeds_e(tmp: Path) -> Path:
    """Every router picks 9 of its 8 experts."""
    model = moe_fusion.read_model(MIXTRAL / "openvino_model.xml")
    for topk in nodes(model, "TopK"):
        topk.input(1).replace_source_output(ops.constant(np.int64(9)).output(0))
    model.validate_nodes_and_infer_types()
    return save(model, tmp / "k9.xml")


def dynamic_k(tmp: Path) -> Path:
    """The routers' k is a model input: the [T, K] selection has no static K."""
    model = moe_fusion.read_model(TILED / "openvino_model.xml")
    k = ops.parameter([], np.int64, name="k")
    for topk in nodes(model, "TopK"):
        topk.input(1).replace_source_output(k.output(0))
    model.add_parameters([k])
    model.validate_nodes_and_infer_types()
    return save(model, tmp / "kdyn.xml")


def existing_output(tmp: Path) -> Path:
    (tmp / "out.xml").write_text("keep me")
    return MIXTRAL


def copied(tmp: Path) -> Path:
    shutil.copytree(MIXTRAL, tmp / "in")
    return tmp / "in"


def beside(tmp: Path) -> Path:
    shutil.copytree(MIXTRAL, tmp / "models" / "in")
    return tmp / "models" / "in"


Case = tuple[Callable[[Path], Path], list, int, str, str]
OUT = "{out}"
# name: (make input, command and options ({out}: tmp/out.xml), exit code, text expected, how to run)
CASES: dict[str, Case] = {
    "missing path": (lambda t: t / "nope.xml", ["fuse", "{in}", "-o", OUT], 2, "no such file or folder", "process"),
    "folder without a model": (
        lambda t: (t / "empty").mkdir() or t / "empty", ["fuse", "{in}", "-o", OUT], 2, "folder holds no", "runner"
    ),
    "XML without its .bin": (xml_without_bin, ["inspect", "{in}"], 2, "weights file a.bin is missing", "runner"),
    "truncated .bin": (truncated_bin, ["fuse", "{in}", "-o", OUT], 2, "Incorrect weights in bin file", "process"),
    "garbage XML": (garbage_xml, ["inspect", "{in}"], 2, "cannot read model", "runner"),
    "XML with an unknown op type": (
        unknown_op, ["fuse", "{in}", "-o", OUT], 2, "operation with type: FooBarOp", "process"
    ),
    "garbage ONNX": (garbage_onnx, ["inspect", "{in}"], 2, "cannot read model", "process"),
    "not a model file": (
        lambda t: (t / "notes.txt").write_text("hi") and t / "notes.txt", ["inspect", "{in}"], 2, "expected an IR",
        "runner",
    ),
    "empty model (no outputs)": (lambda t: empty_ir(t / "e.xml"), ["fuse", "{in}", "-o", OUT], 2, "has no outputs",
                                 "runner"),
    "model without ops": (
        lambda t: model_without_ops(t / "m.xml"), ["fuse", "{in}", "-o", OUT], 0, "no MoE blocks found", "runner"
    ),
    "model without MoE (fuse)": (
        lambda t: plain_model(t / "m.xml"), ["fuse", "{in}", "-o", OUT], 0, "wrote it unchanged", "runner"
    ),
    "model without MoE (inspect --explain)": (
        lambda t: plain_model(t / "m.xml"), ["inspect", "--explain", "{in}"], 0, "no MoE blocks found", "runner"
    ),
    "unwritable output path": (
        lambda t: (t / "a_file").write_text("x") and MIXTRAL,
        ["fuse", "{in}", "-o", "{tmp}/a_file/out"], 2, "output folder is not writable", "runner",
    ),
    "existing output without --force": (
        existing_output, ["fuse", "{in}", "-o", OUT], 2, "already exists; pass --force", "runner"
    ),
    "output equal to input without --in-place": (
        copied, ["fuse", "{in}", "-o", "{in}"], 2, "output is the input; pass --in-place", "runner"
    ),
    "output inside the input folder": (
        copied, ["fuse", "{in}", "-o", "{in}/fused"], 2, "inside the input folder", "runner"
    ),
    "output replacing a folder holding the input": (
        beside, ["fuse", "{in}", "-o", "{tmp}/models", "--force"], 2, "holding the input", "runner"
    ),
    "missing --patterns folder": (
        lambda t: MIXTRAL, ["inspect", "{in}", "--patterns", "{tmp}/nope"], 2, "does not exist", "runner"
    ),
    "check against a garbage model": (
        garbage_xml, ["check", str(MIXTRAL), "{in}"], 2, "cannot read model", "process"
    ),
    "NaN weights": (nan_weights, ["fuse", "{in}", "-o", OUT], 0, "2 blocks fused, 0 skipped", "runner"),
    "hidden states of dynamic rank": (
        dynamic_rank, ["fuse", "{in}", "-o", OUT, "--no-verify"], 0, "skipped: hidden states have a dynamic rank",
        "runner",
    ),
    "two MoE blocks sharing one router": (
        shared_router, ["fuse", "{in}", "-o", OUT], 0, "its router drives 2 expert blocks", "runner"
    ),
    "K > E": (k_exceeds_e, ["fuse", "{in}", "-o", OUT, "--no-verify"], 0, "top-k 9 exceeds the 8 experts", "runner"),
    "non-constant k": (dynamic_k, ["inspect", "{in}"], 0, "top-k is not a constant", "process"),
}


@pytest.mark.parametrize("case", CASES)
def test_hostile_input(case, tmp_path):
    make, args, code, text, how = CASES[case]
    source = make(tmp_path)
    before = digest(source) if source.exists() else {}
    out = tmp_path / "out.xml"
    fill = {"{in}": str(source), OUT: str(out), "{tmp}": str(tmp_path)}
    argv = [a for a in args]
    for key, value in fill.items():
        argv = [a.replace(key, value) for a in argv]
    existed = out.exists()
    got, stdout, stderr = (run_process if how == "process" else run)(*argv)
    assert got == code, (stdout, stderr)
    assert "Traceback" not in stderr and "Traceback" not in stdout
    if code == 2:
        assert stderr.startswith("moe-fusion: ") and stderr.count("\n") == 1, stderr
        assert text in stderr
        assert out.exists() == existed  # nothing written
    else:
        assert text in stdout and stderr == ""
    if before:
        assert digest(source) == before  # the input is untouched
    assert not leftovers(tmp_path)
    assert not (source.is_dir() and (source / "fused").exists())


def test_declines_write_the_model_unchanged(tmp_path):
    """Declined blocks stay as they were: the written model has no FusedExperts and the same op count."""
    for make, extra in ((dynamic_rank, ["--no-verify"]), (shared_router, []), (k_exceeds_e, ["--no-verify"])):
        source = make(tmp_path)
        out = tmp_path / f"{source.stem}-out.xml"
        code, stdout, stderr = run("fuse", source, "-o", out, *extra)
        assert code == 0 and "0 blocks fused, 2 skipped" in stdout, stderr
        assert fused_ops(out) == 0
        assert len(moe_fusion.read_model(out).get_ops()) == len(moe_fusion.read_model(source).get_ops())


# ---- NaN weights: the proof calls NaN equal only where the original is NaN too ----------------------


def test_nan_weight_fuses_with_nan_in_the_same_places(tmp_path):
    """An expert's NaN weight: the original gives NaN for exactly the tokens routed to that expert, and so
    does FusedExperts; the proof compared all 8 experts, and the whole model checks equal."""
    source = nan_weights(tmp_path)
    model = moe_fusion.read_model(source)
    report = fuse(model)
    assert [b.status for b in report.blocks] == ["fused", "fused"], report.table()
    assert report.blocks[0].experts_covered == 8
    code, stdout, stderr = run("fuse", source, "-o", tmp_path / "out.xml")
    assert code == 0, stderr
    code, stdout, stderr = run("check", source, tmp_path / "out.xml", "--tokens", "16", "--steps", "1")
    assert code == 0 and "equivalent" in stdout, stderr


@pytest.mark.parametrize("side", ["original", "replacement"])
def test_proof_refuses_nan_on_one_side(side):
    model = moe_fusion.read_model(MIXTRAL / "openvino_model.xml")
    block = next(b for b in candidates(model, catalogue.load())[0] if "layers.0" in b.name)
    slot = block.expert_ids.index(0)
    if side == "replacement":  # the stacked weights get a NaN the graph does not have
        weight = np.array(block.weights["w_down"].parts[slot])
        weight[7, 5] = np.nan  # [in, out]: the graph's [out, in] element (5, 7)
        block.weights["w_down"].parts[slot] = weight
    fused, replacement = build(block)
    if side == "original":  # the graph gets a NaN the stacked weights do not have
        (matmul,) = [n for n in nodes(model, "MatMul") if n.get_friendly_name() == EXPERT0_DOWN]
        data = np.array(matmul.input_value(1).get_node().get_data())
        data[5, 7] = np.nan
        matmul.input(1).replace_source_output(ops.constant(data).output(0))
    proof = prove(block, fused, replacement)
    assert not proof.ok and "outputs differ" in proof.reason and "non-finite values differ" in proof.reason


# ---- safe output ---------------------------------------------------------------------------------------


def partial_then(error: BaseException):
    """An ov.save_model that writes half a model, then fails with `error`."""

    def save_model(model, path, compress_to_fp16=True):
        Path(path).write_text('<?xml version="1.0"?>\n<net name="half"')
        Path(path).with_suffix(".bin").write_bytes(b"\x00" * 1024)
        raise error

    return save_model


@pytest.mark.parametrize("target", ["file", "folder"])
def test_interrupted_save_leaves_no_partial_output(target, tmp_path, monkeypatch):
    monkeypatch.setattr(ov, "save_model", partial_then(KeyboardInterrupt()))
    out = tmp_path / ("out.xml" if target == "file" else "out")
    source = MIXTRAL / "openvino_model.xml" if target == "file" else MIXTRAL
    before = digest(source)
    code, _, stderr = run("fuse", source, "-o", out, "--no-verify")
    assert code == 1 and "Aborted!" in stderr and "Traceback" not in stderr  # click's answer to Ctrl-C
    assert list(tmp_path.iterdir()) == []  # no out.xml, no out.bin, no staging folder
    assert digest(source) == before


def test_interrupted_save_keeps_the_old_output(tmp_path, monkeypatch):
    """--force over an existing output, interrupted: the old output is still there, whole."""
    code, _, stderr = run("fuse", MIXTRAL, "-o", tmp_path / "out", "--no-verify")
    assert code == 0, stderr
    old = digest(tmp_path / "out")
    monkeypatch.setattr(ov, "save_model", partial_then(KeyboardInterrupt()))
    code, _, _ = run("fuse", TILED, "-o", tmp_path / "out", "--no-verify", "--force")
    assert code == 1
    assert digest(tmp_path / "out") == old and not leftovers(tmp_path)


def test_failed_write_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(ov, "save_model", partial_then(RuntimeError("Exception from src/x.cpp:1:\nNo space left")))
    code, _, stderr = run("fuse", MIXTRAL, "-o", tmp_path / "out", "--no-verify")
    assert code == 2 and stderr.count("\n") == 1 and "cannot write the output: No space left" in stderr
    assert list(tmp_path.iterdir()) == []


def test_ctrl_c_during_the_renames_waits_until_both_files_are_in_place(tmp_path, monkeypatch):
    """SIGINT between moving the new .bin and the new .xml into place: both land, then KeyboardInterrupt.
    Without the deferral the old .xml would be left beside the new .bin."""
    real_replace, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if len(calls) == 2:  # the new .bin is about to move in
            signal.raise_signal(signal.SIGINT)
        real_replace(src, dst)

    shutil.copytree(MIXTRAL, tmp_path / "old")  # an existing output, overwritten (--force)
    out = tmp_path / "old" / "openvino_model.xml"
    model = io.load(MIXTRAL)
    fuse(model, verify=False)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        io.save(model, MIXTRAL / "openvino_model.xml", out)
    monkeypatch.undo()
    assert calls == ["openvino_model.bin", "openvino_model.bin", "openvino_model.xml", "openvino_model.xml"]
    assert fused_ops(out) == 2  # the new .xml with the new .bin: it reads
    assert not leftovers(tmp_path / "old")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_in_place_on_a_model_file(tmp_path):
    shutil.copy(MIXTRAL / "openvino_model.xml", tmp_path / "m.xml")
    shutil.copy(MIXTRAL / "openvino_model.bin", tmp_path / "m.bin")
    code, _, stderr = run("fuse", tmp_path / "m.xml", "-o", tmp_path / "m.xml", "--in-place", "--no-verify")
    assert code == 0, stderr
    assert fused_ops(tmp_path / "m.xml") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]
