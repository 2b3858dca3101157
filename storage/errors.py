"""The base of the project's error tree, and the errors of the storage layer.

Every error raised on purpose derives from `IchNodeError` and says what was wrong, naming
the file, study or setting involved. Whether trying again may help is a property of each
error (`retryable`), not of its class alone: a full disk is retried, a study whose data
cannot be analysed is not. The whole tree is drawn in `node/errors.py`.
"""

from __future__ import annotations

__all__ = ["IchNodeError", "InvalidInstance", "StorageError", "StorageFull", "DatabaseMissing"]


class IchNodeError(Exception):
    """Base of every error the project raises on purpose.

    `retryable` says whether the same work may succeed later unchanged (the environment
    failed: disk, database, network) or never will (the input or the setup is wrong).
    """

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class InvalidInstance(IchNodeError):
    """A DICOM instance whose content cannot be used (identifiers, pixel data, geometry)."""


class StorageError(IchNodeError):
    """An instance, result or database row could not be written or read."""

    retryable = True


class StorageFull(StorageError):
    """No space left on the disk holding storage.root."""


class DatabaseMissing(StorageError):
    """The database does not exist (or vanished) where storage.database_url points."""

    retryable = False
