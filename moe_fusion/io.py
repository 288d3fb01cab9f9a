"""Reading models of every kind users have (IR .xml, .onnx, optimum-intel folders) and writing them safely."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import openvino as ov

from moe_fusion.op import register

MODEL_FILE = "openvino_model.xml"


class InputError(ValueError):
    """A path that is not a readable model, or an output that must not be written."""


@functools.cache
def core() -> ov.Core:
    """A process-wide `ov.Core` that knows FusedExperts. For your own core: `moe_fusion.register(core)`."""
    return register(ov.Core())


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


def load(path: str | Path) -> ov.Model:
    """Read INPUT (file or folder) with a one-line error for anything unreadable."""
    file = model_file(path)
    try:
        model = read_model(file)
    except RuntimeError as error:
        raise InputError(f"{file}: cannot read model: {first_line(error)}") from None
    if not model.get_results():
        raise InputError(f"{file}: the model has no outputs")
    return model


def check_output(source: str | Path, target: str | Path, *, force: bool = False, in_place: bool = False) -> None:
    """Refuse to overwrite the input (unless in_place) or an existing output (unless force)."""
    source, target = Path(source).resolve(), Path(target).resolve()
    if source == target or (source.is_dir() and model_file(source).resolve() == target):
        if not in_place:
            raise InputError(f"{target}: output is the input; pass --in-place to overwrite it")
    elif target.exists() and not force:
        raise InputError(f"{target}: already exists; pass --force to overwrite it")
    existing = target.parent
    while not existing.exists():  # missing folders are created on save
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise InputError(f"{existing}: output folder is not writable")


def save(model: ov.Model, source: str | Path, target: str | Path) -> Path:
    """Write `model` to `target` atomically: a temporary beside it, then renamed into place.

    A folder SOURCE gives a folder TARGET with the fused openvino_model.xml/.bin and a copy of every other
    file, so it stays usable as the original was. Weights are written as they are (no f16 compression).
    """
    source, target = Path(source), Path(target)
    folder = source.is_dir()
    target.resolve().parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.resolve().parent))
    try:
        if folder:
            for item in source.iterdir():
                if item.name not in (MODEL_FILE, "openvino_model.bin"):
                    (shutil.copytree if item.is_dir() else shutil.copy2)(item, staging / item.name)
            ov.save_model(model, staging / MODEL_FILE, compress_to_fp16=False)
            if target.exists():
                shutil.rmtree(target) if target.is_dir() else target.unlink()
            staging.rename(target)
        else:
            xml = staging / (target.stem + ".xml")
            ov.save_model(model, xml, compress_to_fp16=False)
            os.replace(xml.with_suffix(".bin"), target.with_suffix(".bin"))
            os.replace(xml, target.with_suffix(".xml"))
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target
