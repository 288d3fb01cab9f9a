"""Where stacked expert weights live until the model is saved.

A fused model's stacked weights are new constants as large as the experts themselves (tens of GB for a
real model). Large ones are written to unlinked temporary files and mapped, so they sit in the page cache
(file-backed, evictable) rather than in anonymous memory, and constants share that memory instead of
copying it. Set TMPDIR to put them on a disk with room. Small arrays stay ordinary numpy arrays. A file stays
open while its mapping lives, so the proof's worker process can map the same bytes (`moe_fusion.mapped`).
"""

from __future__ import annotations

import errno
import mmap
import os
import tempfile
import weakref

import numpy as np
import openvino as ov
import openvino.opset14 as ops

from moe_fusion import host
from moe_fusion.host import NoSpaceError, gigabytes

SCRATCH_FILE_MIN_BYTES = 16 << 20  # below this, plain memory is cheaper than a file

# Constants built from a Tensor (sub-byte types) do not keep the Tensor's memory alive: we do.
_PINNED: list[np.ndarray] = []


def empty(shape: tuple[int, ...] | list[int], dtype: np.dtype | type) -> np.ndarray:
    """An uninitialised C-contiguous array, file-backed when large."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes < SCRATCH_FILE_MIN_BYTES:
        return np.empty(shape, dtype)
    file = tempfile.TemporaryFile(prefix="moe-fusion-")  # noqa: SIM115 (unlinked at once; closed with its mapping)
    _reserve(file, nbytes)
    mapped = mmap.mmap(file.fileno(), nbytes)
    weakref.finalize(mapped, file.close)  # the file's space is freed with its last mapping
    return np.frombuffer(mapped, dtype).reshape(shape)


def _reserve(file, nbytes: int) -> None:
    """Give the file its blocks now: a mapping of a sparse file that cannot grow on a full disk dies of SIGBUS
    at the first write; reserved, a full disk is this one clear error instead."""
    try:
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(file.fileno(), 0, nbytes)
        else:
            file.truncate(nbytes)
    except OSError as error:
        file.close()
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        folder = tempfile.gettempdir()
        raise NoSpaceError(f"no space left on device: stacking expert weights needs {gigabytes(nbytes)} more in "
                           f"the scratch folder {folder} ({gigabytes(host.disk_free(folder))} free); set TMPDIR to a "
                           "disk with room") from None


def constant(array: np.ndarray) -> ov.Output:
    """A Constant sharing `array`'s memory (OpenVINO keeps the array alive)."""
    return ops.constant(np.ascontiguousarray(array), shared_memory=True).output(0)


def packed_constant(raw: np.ndarray, element_type: ov.Type, shape: list[int]) -> ov.Output:
    """A Constant of a sub-byte (or otherwise raw) element type over `raw` bytes, shared, kept alive here."""
    if raw.nbytes >= SCRATCH_FILE_MIN_BYTES:
        _PINNED.append(raw)
        return ops.constant(ov.Tensor(raw, ov.Shape(shape), element_type), shared_memory=True).output(0)
    tensor = ov.Tensor(element_type, shape)
    tensor.data[:] = raw.reshape(tensor.data.shape)
    return ops.constant(tensor).output(0)
