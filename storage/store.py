"""The on-disk store: instances and result objects, each written atomically (see
storage.atomic). Files are readable by the node's user only."""

from __future__ import annotations

import errno
import re
import shutil
from pathlib import Path

from node.errors import InvalidInstance, StorageError, StorageFull
from storage.atomic import atomic_write

__all__ = ["InstanceStore", "check_uid"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(keyword: str, value: object) -> str:
    """A DICOM UID (digits and dots, ≤ 64 characters), or InvalidInstance naming it."""
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not _UID.match(text):
        raise InvalidInstance(f"{keyword} {text!r} is not a valid DICOM UID")
    return text


class InstanceStore:
    """Files under one root folder, addressed by paths relative to it."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> Path:
        """Relative path of an instance; UIDs are checked so they cannot escape the root."""
        return Path(
            "instances",
            check_uid("StudyInstanceUID", study_uid),
            check_uid("SeriesInstanceUID", series_uid),
            check_uid("SOPInstanceUID", sop_uid) + ".dcm",
        )

    def result_folder(self, study_uid: str, series_uid: str) -> Path:
        return Path("results", check_uid("StudyInstanceUID", study_uid), check_uid("SeriesInstanceUID", series_uid))

    def absolute(self, relative: Path | str) -> Path:
        return self.root / relative

    def free_mb(self) -> float:
        """Free space on the disk holding the store, in MiB."""
        return shutil.disk_usage(self.root).free / 2**20

    def delete(self, relative: Path | str) -> None:
        """Remove a stored file (absent already is fine) and its folder once empty."""
        path = self.absolute(relative)
        path.unlink(missing_ok=True)
        for folder in (path.parent, path.parent.parent):
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                break

    def write(self, relative: Path, data: bytes) -> int:
        """Write `data` atomically and durably; returns its size."""
        target = self.absolute(relative)
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(target, lambda handle: handle.write(data))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StorageFull(f"no space left on the disk of {self.root} writing {relative}") from exc
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
        return len(data)
