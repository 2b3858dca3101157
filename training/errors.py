"""Errors of the model layer: configuration, checkpoints, inference and data.

They derive from `storage.errors.IchNodeError`; the whole tree is drawn in `node/errors.py`.
"""

from __future__ import annotations

from storage.errors import IchNodeError

__all__ = [
    "ConfigError",
    "CheckpointError",
    "InferenceError",
    "NoAnalysableSeries",
    "DataError",
    "SyntheticDataError",
    "TrainingStopped",
    "TrainingDiverged",
]


class ConfigError(IchNodeError):
    """A configuration file, key or value that cannot be used."""


class CheckpointError(IchNodeError):
    """A model file that is missing, not a checkpoint, or of another architecture."""


class InferenceError(IchNodeError):
    """The model failed on input that passed validation."""


class NoAnalysableSeries(IchNodeError):
    """No series of a study qualifies as the axial head CT to analyse."""


class DataError(IchNodeError):
    """A data folder that cannot be used for training or evaluation."""


class SyntheticDataError(IchNodeError):
    """Options for synthetic studies that cannot be satisfied."""


class TrainingStopped(IchNodeError):
    """Training stopped on request (SIGTERM, SIGINT) after saving its state; `--resume` continues it."""


class TrainingDiverged(IchNodeError):
    """Training met a non-finite loss, gradient or weight; it stopped there, and every state
    on disk is the last finite one."""
