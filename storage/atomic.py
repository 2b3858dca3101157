"""Atomic, durable file writes: temporary name, fsync, rename, fsync of the folder.

After a crash a path holds either the whole new file or what it held before, never half.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "fsync_folder"]


def atomic_write(path: Path, write: Callable[[BinaryIO], None], *, shared: bool = False) -> None:
    """Call `write(handle)` on a temporary file beside `path`, then move it into place.
    The file is private to its owner (mode 0600) unless `shared`: then readable as the
    umask allows, as `open()` would create it (0644 under the usual umask 022).
    OSError (ENOSPC included) reaches the caller, which knows what the file was for."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            if shared:
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def _umask() -> int:
    """The process's umask, read without changing it (Linux); 0o022 where it cannot be read."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o022


def fsync_folder(folder: Path) -> None:
    """Make a rename or a new entry in `folder` survive a crash."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
