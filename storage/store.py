"""The on-disk store: instances and result objects, each written atomically (see
storage.atomic). Files are readable by the node's user only; paths are relative to the
root, so hosts sharing the folder may mount it where they like.

A result series is written into `<folder>.partial` and renamed into place only after the
database has recorded it, so a crash in between leaves a folder that is easy to tell
apart: recorded ones are published on the next start, unrecorded ones deleted.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
import uuid
from pathlib import Path

from storage.errors import InvalidInstance, StorageError, StorageFull
from storage.atomic import atomic_write, fsync_folder

__all__ = ["InstanceStore", "check_uid", "result_folder"]

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def check_uid(keyword: str, value: object) -> str:
    """A DICOM UID (digits and dots, ≤ 64 characters), or InvalidInstance naming it."""
    text = str(value or "").strip().rstrip("\x00")
    if not text or len(text) > 64 or not _UID.match(text):
        raise InvalidInstance(f"{keyword} {text!r} is not a valid DICOM UID")
    return text


def result_folder(study_uid: str, series_uid: str) -> Path:
    """Relative folder of a result series; UIDs are checked so they cannot escape the root."""
    return Path("results", check_uid("StudyInstanceUID", study_uid), check_uid("SeriesInstanceUID", series_uid))


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
        return result_folder(study_uid, series_uid)

    def absolute(self, relative: Path | str) -> Path:
        return self.root / relative

    def holds_instances(self) -> bool:
        """Whether any received instance is stored (a new database would lose track of it)."""
        folder = self.root / "instances"
        return folder.is_dir() and any(folder.iterdir())

    def marker(self) -> str | None:
        """The storage folder's marker (`MARKER_FILE`), or None when it has none."""
        try:
            return (self.root / MARKER_FILE).read_text().strip() or None
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StorageError(f"cannot read {self.root / MARKER_FILE}: {exc.strerror or exc}") from exc

    def write_marker(self, marker: str) -> None:
        """Mark the folder as the one a database's paths are relative to."""
        try:
            self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(self.root / MARKER_FILE, lambda handle: handle.write(marker.encode() + b"\n"))
        except OSError as exc:
            raise StorageError(f"cannot write {self.root / MARKER_FILE}: {exc.strerror or exc}") from exc

    def free_mb(self) -> float:
        """Free space on the disk holding the store, in MiB."""
        return shutil.disk_usage(self.root).free / 2**20

    def free_inodes(self) -> int | None:
        """Files that can still be created on the store's file system; None where the file
        system does not count them (f_files 0: btrfs, some network file systems)."""
        stats = os.statvfs(self.root)
        return stats.f_favail if stats.f_files else None

    def refusal(self, min_free_mb: float) -> str | None:
        """Why a store would be refused now, or None: no free inodes, a folder that cannot
        be written (a small file is written and removed), or less than `min_free_mb` free."""
        try:
            if self.free_inodes() == 0:
                return (f"no free inodes on the file system of {self.root}: space is free, but no file can be "
                        "created, so stores are refused")
        except OSError:
            pass  # the probe below names what is wrong with the folder
        probe = self.root / f".ready-{uuid.uuid4().hex}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, b"ready")
            finally:
                os.close(fd)
                probe.unlink(missing_ok=True)
            free = self.free_mb()
        except OSError as exc:
            return f"storage.root {self.root} cannot be written: {exc.strerror or exc}"
        if free < min_free_mb:
            return (f"{free:.0f} MiB free on the disk of {self.root}, below storage.min_free_mb = {min_free_mb:g}: "
                    "stores are refused")
        return None

    def _full(self) -> str:
        """Why a write met ENOSPC: no free inodes, or no space."""
        try:
            inodes = self.free_inodes()
        except OSError:
            inodes = None
        return "no free inodes (files) left" if inodes == 0 else "no space left"

    def delete(self, relative: Path | str) -> None:
        """Remove a stored file (absent already is fine) and its folder once empty."""
        path = self.absolute(relative)
        path.unlink(missing_ok=True)
        for folder in (path.parent, path.parent.parent):
            try:
                folder.rmdir()
            except OSError:  # not empty, or already gone
                break

    def write_result(self, folder: Path, files: dict[str, bytes]) -> None:
        """Write a result series into `folder`.partial (see the module docstring); a write
        that fails (a full disk) leaves nothing behind."""
        staging = _partial(folder)
        try:
            for name, data in files.items():
                self.write(staging / name, data)
        except StorageError:
            self.delete_unpublished(folder)
            raise

    def publish_result(self, folder: Path | str) -> None:
        """Move a recorded result from `folder`.partial into place; nothing to do when it is
        there, also when another process sharing the folder moved it a moment ago."""
        target, staging = self.absolute(folder), self.absolute(_partial(Path(folder)))
        if staging.is_dir() and not target.exists():
            try:
                os.replace(staging, target)
            except OSError:
                if not target.is_dir():
                    raise
                return
            fsync_folder(target.parent)

    def unpublished_results(self, older_than_seconds: float) -> list[Path]:
        """Result folders still `.partial` and untouched for this long (relative, without
        the suffix): what a crash between writing and recording left behind."""
        results = self.root / "results"
        cutoff = time.time() - older_than_seconds
        found = []
        for staging in results.glob("*/*.partial") if results.is_dir() else ():
            if staging.stat().st_mtime < cutoff:
                found.append(_partial(staging.relative_to(self.root), undo=True))
        return found

    def delete_unpublished(self, folder: Path) -> None:
        shutil.rmtree(self.absolute(_partial(folder)), ignore_errors=True)

    def write(self, relative: Path, data: bytes) -> int:
        """Write `data` atomically and durably; returns its size."""
        target = self.absolute(relative)
        try:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic_write(target, lambda handle: handle.write(data))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StorageFull(f"{self._full()} on the disk of {self.root} writing {relative}") from exc
            raise StorageError(f"cannot write {target}: {exc.strerror or exc}") from exc
        return len(data)


# The file in storage.root whose value the database also holds (storage.state.store_marker).
MARKER_FILE = ".ichnode-store"


def _partial(folder: Path, *, undo: bool = False) -> Path:
    if undo:
        return folder.with_name(folder.name.removesuffix(".partial"))
    return folder.with_name(folder.name + ".partial")
