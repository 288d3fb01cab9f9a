"""Weights handed to another process by where their bytes live, not by copy.

The proof runs each block in a worker process (`moe_fusion.isolate`). A real block's weights are GBs: rather
than serialising them, every large Constant of the cut-out block becomes a Parameter, and the worker feeds it
the same bytes mapped from the file they already live in: the IR's `.bin`, which `read_model` memory-maps,
or the unlinked scratch file holding a stacked weight (`moe_fusion.scratch`), reached through this process's
`/proc/<pid>/fd`. Constants in anonymous memory (ONNX inputs, models built in Python) are written once to a
file in the proof's temporary folder. Mapped pages are page cache shared by both processes: no copy in
anonymous memory on either side.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import openvino as ov
import openvino.opset14 as ops

# Constants at least this large become mapped Parameters; smaller ones travel inside the cut-out IR.
MAPPED_MIN_BYTES = 1 << 18
WEIGHT_PREFIX = "moe_fusion_weight_"


@dataclass(frozen=True)
class FileBytes:
    """A tensor's bytes at `offset` in the file at `path` (a path, or /proc/<pid>/fd/<n>)."""

    path: str
    offset: int
    element_type: str
    shape: tuple[int, ...]
    nbytes: int

    def tensor(self) -> tuple[ov.Tensor, np.ndarray]:
        """A Tensor over the mapped bytes (copy-on-write: never written, so never copied), and the mapping,
        which the caller keeps alive as long as the Tensor (a Tensor over raw bytes does not)."""
        raw = np.memmap(self.path, np.uint8, mode="c", offset=self.offset, shape=(self.nbytes,))
        return ov.Tensor(raw, ov.Shape(list(self.shape)), getattr(ov.Type, self.element_type)), raw


def _file_mappings() -> list[tuple[int, int, int, str]]:
    """(start, end, file offset, path) of this process's file-backed mappings."""
    mappings = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):
                start, end = (int(a, 16) for a in fields[0].split("-"))
                mappings.append((start, end, int(fields[2], 16), fields[5].rstrip("\n")))
    return mappings


def _open_fds() -> dict[str, str]:
    """Link target -> /proc/<pid>/fd/<n> path, for files this process holds open (unlinked ones too)."""
    found, base = {}, f"/proc/{os.getpid()}/fd"
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.setdefault(os.readlink(f"/proc/self/fd/{fd}"), f"{base}/{fd}")
        except OSError:
            continue
    return found


class Locator:
    """Finds (or writes) the file bytes behind Constants; one per proof, with its spill folder."""

    def __init__(self, spill: Path) -> None:
        self.spill, self.spilled = spill, 0
        self._mappings = _file_mappings() if Path("/proc/self/maps").exists() else []
        self._fds: dict[str, str] | None = None

    def locate(self, const: ov.Node) -> FileBytes:
        data = np.asarray(const.get_tensor_view().data)  # packed sub-byte types: their bytes
        element_type = const.get_element_type().get_type_name()
        shape, nbytes = tuple(const.get_output_shape(0)), const.get_byte_size()
        address = data.__array_interface__["data"][0]
        for start, end, offset, path in self._mappings:
            if start <= address and address + nbytes <= end:
                path = self._openable(path)
                if path:
                    return FileBytes(path, offset + address - start, element_type, shape, nbytes)
        self.spilled += nbytes
        with tempfile.NamedTemporaryFile(dir=self.spill, suffix=".bin", delete=False) as file:
            data.reshape(-1).view(np.uint8)[:nbytes].tofile(file)
        return FileBytes(file.name, 0, element_type, shape, nbytes)

    def _openable(self, path: str) -> str:
        if not path.endswith(" (deleted)"):
            return path if os.path.isfile(path) else ""
        if self._fds is None:
            self._fds = _open_fds()
        return self._fds.get(path, "")


def parameterize(model: ov.Model, locator: Locator) -> list[FileBytes]:
    """Replace `model`'s large Constants by Parameters (appended after its inputs, named WEIGHT_PREFIX<i>)
    and return where each one's bytes are, in Parameter order."""
    _gather_stored(model)
    found = []
    for node in model.get_ordered_ops():
        if node.get_type_name() != "Constant" or node.get_byte_size() < MAPPED_MIN_BYTES:
            continue
        param = ops.parameter(node.get_output_partial_shape(0), node.get_element_type())
        param.set_friendly_name(f"{WEIGHT_PREFIX}{len(found)}")
        for target in list(node.output(0).get_target_inputs()):
            target.replace_source_output(param.output(0))
        model.add_parameters([param])
        found.append(locator.locate(node))
    return found


def _gather_stored(model: ov.Model) -> None:
    """`Gather(Convert(W), i)` -> `Convert(Gather(W, i))` on a large 16-bit W (exact: the cast is per element).
    Fed as a Parameter, W's Convert would otherwise widen every expert to f32 at each run (2.4 GB per
    Qwen3-30B-A3B layer) where the Gather needs only the routed ones."""
    for gather in model.get_ordered_ops():
        if gather.get_type_name() != "Gather":
            continue
        convert = gather.input_value(0).get_node()
        if convert.get_type_name() != "Convert" or len(convert.output(0).get_target_inputs()) != 1:
            continue
        stored = convert.input_value(0)
        if stored.get_node().get_type_name() != "Constant" or stored.get_node().get_byte_size() < MAPPED_MIN_BYTES \
                or stored.get_element_type() not in (ov.Type.f16, ov.Type.bf16):
            continue
        picked = ops.gather(stored, gather.input_value(1), gather.input_value(2), gather.get_attributes()["batch_dims"])
        gather.output(0).replace(ops.convert(picked, convert.get_output_element_type(0)).output(0))


def relax(model: ov.Model) -> None:
    """Mapped Parameters get a dynamic shape of their rank, so the CPU plugin allocates no input buffer of
    their size at compile time (it reads the fed tensor); kept static where the graph needs it."""
    weights = [p for p in model.get_parameters() if p.get_friendly_name().startswith(WEIGHT_PREFIX)]
    static = [p.get_partial_shape() for p in weights]
    for param in weights:
        param.set_partial_shape(ov.PartialShape.dynamic(param.get_partial_shape().rank))
    try:
        model.validate_nodes_and_infer_types()
    except RuntimeError:
        for param, shape in zip(weights, static, strict=True):
            param.set_partial_shape(shape)
        model.validate_nodes_and_infer_types()
