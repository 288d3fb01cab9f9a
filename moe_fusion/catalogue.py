"""Loading the pattern catalogue: every `*.py` in the built-in folder and in user folders is a family.

A family module defines `FAMILY` (its name) and `find(model)`, yielding `MoEBlock`s and `Decline`s.
Built-ins ship inside the wheel as `moe_fusion/_patterns`; in a source checkout they are `patterns/`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

_PACKAGE = Path(__file__).resolve().parent


def builtin_dir() -> Path:
    installed = _PACKAGE / "_patterns"
    return installed if installed.is_dir() else _PACKAGE.parent / "patterns"


class CatalogueError(ValueError):
    """A patterns folder or module that cannot be used."""


def load(extra_dirs: Iterable[str | Path] = ()) -> list[ModuleType]:
    """The families, built-ins first, each folder's modules in name order."""
    families = []
    for folder in [builtin_dir(), *map(Path, extra_dirs)]:
        if not folder.is_dir():
            raise CatalogueError(f"patterns folder {folder} does not exist")
        for path in sorted(folder.glob("*.py")):
            if path.name.startswith("_"):
                continue
            families.append(_load_module(path))
    return families


_LOADED: dict[tuple[Path, int], ModuleType] = {}


def _load_module(path: Path) -> ModuleType:
    """Each module once per version of its file: families build their patterns once (OpenVINO's WrapType
    keeps memory per construction, ~47 MB per catalogue rebuild)."""
    key = (path.resolve(), path.stat().st_mtime_ns)
    if key not in _LOADED:
        _LOADED[key] = _exec_module(path)
    return _LOADED[key]


def _exec_module(path: Path) -> ModuleType:
    name = f"moe_fusion_patterns.{path.parent.name}.{path.stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as error:  # a user's module may fail in any way: report it as one line
        raise CatalogueError(f"cannot load pattern module {path}: {type(error).__name__}: {error}") from None
    if not hasattr(module, "find") or not hasattr(module, "FAMILY"):
        raise CatalogueError(f"pattern module {path} must define FAMILY and find(model)")
    return module
