"""The one exception tree of the project.

Every error that can reach a person derives from `IchNodeError` and says what was wrong,
naming the file, config key or study involved::

    IchNodeError
    ├── ConfigError          bad or unknown configuration key or value
    ├── CheckpointError      a file that is not a usable checkpoint
    ├── InvalidInstance      a DICOM instance that cannot be used as it is
    ├── StorageError         an instance or result could not be stored
    │   └── StorageFull      no space left (the SCP answers 0xA700)
    ├── InferenceError       the model could not run on valid input
    ├── NoAnalysableSeries   a study without an axial head CT series to analyse
    ├── DeliveryError        a destination did not take a result
    └── SyntheticDataError   impossible options for synthetic studies
"""

from __future__ import annotations

__all__ = [
    "IchNodeError",
    "ConfigError",
    "CheckpointError",
    "InvalidInstance",
    "StorageError",
    "StorageFull",
    "InferenceError",
    "NoAnalysableSeries",
    "DeliveryError",
    "SyntheticDataError",
]


class IchNodeError(Exception):
    """Base of every error the project raises on purpose."""


class ConfigError(IchNodeError):
    """A configuration file, key or value that cannot be used."""


class CheckpointError(IchNodeError):
    """A model file that is missing, not a checkpoint, or of another architecture."""


class InvalidInstance(IchNodeError):
    """A DICOM instance whose content the node cannot use (pixel data, geometry, …)."""


class StorageError(IchNodeError):
    """An instance, result or database row could not be written."""


class StorageFull(StorageError):
    """The disk holding storage.root is full."""


class InferenceError(IchNodeError):
    """The model failed on input that passed validation."""


class NoAnalysableSeries(IchNodeError):
    """No series of a study qualifies as the axial head CT to analyse."""


class DeliveryError(IchNodeError):
    """A destination refused a result or could not be reached."""


class SyntheticDataError(IchNodeError):
    """Options for synthetic studies that cannot be satisfied."""
