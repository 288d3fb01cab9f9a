"""Reading models of every kind users have (IR .xml, .onnx, optimum-intel folders) and writing them safely."""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import openvino as ov
from openvino.frontend import FrontEndManager

from moe_fusion import host
from moe_fusion.host import NoSpaceError, gigabytes
from moe_fusion.runtime import core

MODEL_FILE = "openvino_model.xml"


class InputError(ValueError):
    """A path that is not a readable model, or an output that must not be written."""


def read_model(path: str | Path) -> ov.Model:
    """`ov.Core.read_model` with FusedExperts registered (IR .xml or .onnx)."""
    return core().read_model(str(path))


def model_file(path: str | Path) -> Path:
    """The model file behind INPUT: the file itself, or a folder's openvino_model.xml."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or folder")
    if path.is_dir():
        candidates = [path / MODEL_FILE, *sorted(path.glob("*.xml")), *sorted(path.glob("*.onnx"))]
        found = [c for c in candidates if c.is_file()]
        if not found:
            raise InputError(f"{path}: folder holds no {MODEL_FILE}, .xml or .onnx model")
        return found[0]
    if path.suffix not in (".xml", ".onnx"):
        raise InputError(f"{path}: expected an IR .xml, an .onnx file or an optimum-intel export folder")
    if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
        raise InputError(f"{path}: the weights file {path.with_suffix('.bin').name} is missing")
    return path


def first_line(error: BaseException) -> str:
    """The useful line of an OpenVINO error: a FusedExperts message if any, else the last line before the
    Python frames ("At:") that an error raised inside a Python op carries."""
    text = str(error).split("\nAt:\n")[0]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("Exception from")]
    useful = [ln for ln in lines if "FusedExperts" in ln] or lines[-1:]
    return useful[0] if useful else type(error).__name__


@functools.cache
def _frontends() -> FrontEndManager:
    return FrontEndManager()


def load(path: str | Path) -> ov.Model:
    """Read INPUT (file or folder) with a one-line error for anything unreadable."""
    file = model_file(path)
    # read_model tries every frontend on a file its own one rejects, and TensorFlow's logs to stderr: refuse first
    framework = {".xml": "ir", ".onnx": "onnx"}[file.suffix]
    if not _frontends().load_by_framework(framework).supported(str(file)):
        kind = "an OpenVINO IR" if framework == "ir" else "an ONNX model"
        raise InputError(f"{file}: cannot read model: not {kind} its frontend can parse")
    try:
        model = read_model(file)
    except RuntimeError as error:
        raise InputError(f"{file}: cannot read model: {first_line(error)}") from None
    if not model.get_results():
        raise InputError(f"{file}: the model has no outputs")
    return model


def check_output(source: str | Path, target: str | Path, *, force: bool = False, in_place: bool = False) -> None:
    """Refuse to overwrite the input (unless in_place) or an existing output (unless force), to write into a
    folder INPUT or over a folder holding it, and to write where the folder is not writable."""
    source, target = Path(source).resolve(), Path(target).resolve()
    if source == target or (source.is_dir() and model_file(source).resolve() == target):
        if not in_place:
            raise InputError(f"{target}: output is the input; pass --in-place to overwrite it")
    elif source.is_dir() and source in target.parents:
        raise InputError(f"{target}: output lies inside the input folder {source}; choose a path outside it")
    elif target in source.parents:
        raise InputError(f"{target}: output would replace a folder holding the input {source}")
    elif target.exists() and not force:
        raise InputError(f"{target}: already exists; pass --force to overwrite it")
    existing = target.parent
    while not existing.exists():  # missing folders are created on save
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(f"{existing}: output folder is not writable")


def model_bytes(source: str | Path) -> tuple[int, int]:
    """(bytes of the model's weights file, bytes an output copy of SOURCE takes): for a folder, every file
    in it; for an IR its .xml and .bin; for ONNX the file and any external data beside it."""
    source = Path(source)
    path = model_file(source)
    weights = path.with_suffix(".bin") if path.suffix == ".xml" else path
    if source.is_dir():
        files = [f for f in source.rglob("*") if f.is_file()]
    elif path.suffix == ".xml":
        files = [path, weights]
    else:
        files = [f for f in path.parent.iterdir() if f.is_file() and (f == path or f.suffix in ("", ".data"))]
    return weights.stat().st_size, sum(f.stat().st_size for f in files)


def check_space(source: str | Path, target: str | Path, *, scratch: bool = True) -> None:
    """Refuse, before any work, when the disks lack room for the output beside TARGET (its size: it is
    written before an old one goes) and, with `scratch`, the stacked expert weights in TMPDIR (at most the
    input's weights); summed when the two share a disk. Raises NoSpaceError: what is needed, what is free."""
    weights, output = model_bytes(source)
    place, tmp = Path(target).absolute().parent, Path(tempfile.gettempdir())
    stacked = f"up to {gigabytes(weights)} of stacked expert weights in TMPDIR ({tmp})"
    if scratch and host.same_disk(place, tmp):
        needed, free = output + weights, host.disk_free(place)
        if needed > free:
            raise NoSpaceError(f"not enough disk space: fusing needs about {gigabytes(needed)} on the disk of {place} "
                               f"({stacked} + {gigabytes(output)} of output), {gigabytes(free)} are free; free "
                               "space or set TMPDIR to another disk")
        return
    free = host.disk_free(place)
    if output > free:
        raise NoSpaceError(f"not enough disk space: the output needs about {gigabytes(output)} in {place}, "
                           f"{gigabytes(free)} are free")
    free = host.disk_free(tmp)
    if scratch and weights > free:
        raise NoSpaceError(f"not enough disk space: fusing needs {stacked}, {gigabytes(free)} are free there; "
                           "set TMPDIR to a disk with room")


def no_space(error: BaseException, place: str | Path) -> bool:
    """Whether a failed write failed for a full disk: ENOSPC, or OpenVINO's bare "iostream error" (how
    ov.save_model reports it) with under 1% or 256 MB left where it wrote."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if "iostream error" not in str(error):
        return False
    total = shutil.disk_usage(Path(place)).total
    return host.disk_free(place) < max(256 << 20, total // 100)


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block is done (renames that must happen together), then act."""
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.getsignal(s) for s in handled}
    if threading.current_thread() is not threading.main_thread() or None in previous.values():
        yield  # only the main thread may set handlers; None: a handler Python did not install
        return
    received: list[int] = []
    for s in handled:
        signal.signal(s, lambda number, _frame: received.append(number))
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            signal.raise_signal(received[0])


def save(model: ov.Model, source: str | Path, target: str | Path) -> Path:
    """Write `model` to `target` atomically: a temporary beside it, then renamed into place.

    A folder SOURCE gives a folder TARGET with the fused openvino_model.xml/.bin and a copy of every other
    file, so it stays usable as the original was. Weights are written as they are (no f16 compression).
    An error or interrupt before the renames leaves no trace; the renames themselves (old output moved
    aside, new one moved in) finish before Ctrl-C or SIGTERM act.
    """
    source, target = Path(source), Path(target).resolve()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as error:
        raise InputError(f"{target}: cannot write the output: {error.strerror or error}") from None
    try:
        try:
            if source.is_dir():
                written = staging / "new"
                written.mkdir()
                for item in source.iterdir():
                    if item.name not in (MODEL_FILE, "openvino_model.bin"):
                        (shutil.copytree if item.is_dir() else shutil.copy2)(item, written / item.name)
                ov.save_model(model, written / MODEL_FILE, compress_to_fp16=False)
                moves = [(written, target)]
            else:
                xml = staging / (target.stem + ".xml")
                ov.save_model(model, xml, compress_to_fp16=False)
                moves = [(xml.with_suffix(".bin"), target.with_suffix(".bin")), (xml, target.with_suffix(".xml"))]
        except (OSError, RuntimeError) as error:
            if no_space(error, staging):
                raise NoSpaceError(f"{target}: cannot write the output: no space left on device "
                                   f"({gigabytes(host.disk_free(staging))} free there)") from None
            raise InputError(f"{target}: cannot write the output: {first_line(error)}") from None
        with _signals_deferred():
            old = staging / "old"
            old.mkdir()
            for new, place in moves:  # the old output aside (kept until the end), the new one in
                if place.exists() or place.is_symlink():
                    os.replace(place, old / place.name)
                os.replace(new, place)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
