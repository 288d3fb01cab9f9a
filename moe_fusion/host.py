"""Facts about the machine a run is on: memory available and disk space free, each read one way; and the
error for a disk that is full."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

UNKNOWN_MEMORY = 1 << 62  # what available_memory says where it cannot tell: no limit


class NoSpaceError(OSError):
    """Not enough disk space for the work asked for; the message says what is needed and what is free."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


def available_memory() -> int:
    """MemAvailable in bytes (Linux); UNKNOWN_MEMORY elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return UNKNOWN_MEMORY


def disk_free(path: str | Path) -> int:
    """Bytes free to this user on the file system that holds `path` (or would: its nearest existing
    parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def same_disk(a: str | Path, b: str | Path) -> bool:
    """Whether two paths (or their nearest existing parents) lie on one file system."""
    return _device(a) == _device(b)


def _device(path: str | Path) -> int:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def gigabytes(nbytes: int) -> str:
    """Bytes as users read disk sizes: '2.4 GB', or '1.26 MB' below 0.1 GB."""
    return f"{nbytes / 1e6:.3g} MB" if nbytes < 1e8 else f"{nbytes / 1e9:.1f} GB"
