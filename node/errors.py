"""The one exception tree of the project.

Every error that can reach a person derives from `IchNodeError` and says what was wrong,
naming the file, config key or study involved::

    IchNodeError
    ├── ConfigError          bad or unknown configuration key or value
    ├── CheckpointError      a file that is not a usable checkpoint
    ├── InvalidInstance      a DICOM instance that cannot be used as it is
    ├── InferenceError       the model could not run on valid input
    └── SyntheticDataError   impossible options for synthetic studies

Later layers (storage, delivery) add their branches here, not elsewhere.
"""

from __future__ import annotations

__all__ = [
    "IchNodeError",
    "ConfigError",
    "CheckpointError",
    "InvalidInstance",
    "InferenceError",
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


class InferenceError(IchNodeError):
    """The model failed on input that passed validation."""


class SyntheticDataError(IchNodeError):
    """Options for synthetic studies that cannot be satisfied."""
