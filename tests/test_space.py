"""Disk space: `fuse` refuses up front, in one line saying what it needs and what is free, when the disks
lack room for the stacked weights (TMPDIR) and the output; a disk that fills up anyway is named as such
("no space left on device"), never as OpenVINO's "iostream error" or a SIGBUS. The free-space host fact is
replaced (moe_fusion.host.disk_free): filling a real disk in a test is neither safe nor fast."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path

import openvino as ov
import pytest
from click.testing import CliRunner

from moe_fusion import host, scratch
from moe_fusion.cli import main
from moe_fusion.io import model_bytes

MIXTRAL = Path(__file__).resolve().parent.parent / "models" / "fixtures" / "gen1-mixtral"


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_fuse_refuses_up_front_when_scratch_and_output_do_not_fit(tmp_path, monkeypatch):
    weights, output = model_bytes(MIXTRAL)
    monkeypatch.setattr(host, "disk_free", lambda _path: output)  # room for the output, not for both
    monkeypatch.setattr(host, "same_disk", lambda _a, _b: True)
    loaded = []
    monkeypatch.setattr(ov.Core, "read_model", lambda *a, **k: loaded.append(a) or pytest.fail("work started"))
    code, stdout, stderr = run("fuse", MIXTRAL, "-o", tmp_path / "out")
    assert code == 2 and stdout == "" and not loaded
    (line,) = stderr.splitlines()  # one line: what is needed, what is free
    assert line.startswith("moe-fusion: not enough disk space: fusing needs about ")
    assert f"{output / 1e6:.3g} MB of output" in line and f"up to {weights / 1e6:.3g} MB of stacked expert" in line
    assert f"{output / 1e6:.3g} MB are free" in line and "set TMPDIR to another disk" in line
    assert not (tmp_path / "out").exists()


def test_scratch_on_another_disk_is_counted_there(tmp_path, monkeypatch):
    weights, _output = model_bytes(MIXTRAL)
    tmp = Path(tempfile.gettempdir())
    monkeypatch.setattr(host, "same_disk", lambda _a, _b: False)
    monkeypatch.setattr(host, "disk_free", lambda path: weights - 1 if Path(path) == tmp else 1 << 50)
    code, _, stderr = run("fuse", MIXTRAL, "-o", tmp_path.parent / "elsewhere-out")
    assert code == 2 and "fusing needs up to" in stderr and "set TMPDIR to a disk with room" in stderr, stderr


def test_a_full_disk_while_saving_says_so(tmp_path, monkeypatch):
    """The preflight passed, then the disk filled (another writer): OpenVINO's "iostream error" is named."""
    full = []

    def save_model(model, path, compress_to_fp16=True):
        Path(path).write_bytes(b"\x00" * 1024)
        full.append(True)
        raise RuntimeError("Exception from src/core/src/pass/serialize.cpp:1:\nbasic_ios::clear: iostream error")

    monkeypatch.setattr(ov, "save_model", save_model)
    monkeypatch.setattr(host, "disk_free", lambda _path: 0 if full else 1 << 50)
    code, _, stderr = run("fuse", MIXTRAL, "-o", tmp_path / "out", "--no-verify")
    assert code == 2 and "cannot write the output: no space left on device" in stderr, stderr
    assert list(tmp_path.iterdir()) == []  # no partial output


def test_a_full_scratch_disk_is_an_error_not_a_crash(tmp_path, monkeypatch):
    """Stacked weights live in mapped scratch files; on a full disk a sparse file's mapping would die of
    SIGBUS at the first write, so their blocks are reserved first and the shortage is one line."""

    def full(_fd, _offset, _length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(scratch, "SCRATCH_FILE_MIN_BYTES", 1024)  # fixture-sized stacks take the file path
    monkeypatch.setattr(os, "posix_fallocate", full)
    code, _, stderr = run("fuse", MIXTRAL, "-o", tmp_path / "out", "--no-verify")
    assert code == 2, stderr
    assert "no space left on device: stacking expert weights needs" in stderr and "set TMPDIR" in stderr, stderr
    assert not (tmp_path / "out").exists()
