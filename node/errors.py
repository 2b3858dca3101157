"""The one error tree of the project, drawn whole; the node's own errors.

Each layer raises its own errors (`storage/errors.py`, `training/errors.py`, this
module); all derive from `IchNodeError`, which lives in the lowest layer. The CLI is the
one place that turns any of them into a message and an exit code. `retryable` is a
property of each error: the worker and the sender try again later when it is true.

    IchNodeError                      storage.errors
    ├── InvalidInstance               storage.errors    permanent: the data is wrong
    ├── StorageError                  storage.errors    retried: disk or database failed
    │   ├── StorageFull               storage.errors    retried: no space left
    │   └── DatabaseMissing           storage.errors    permanent: no database where configured
    ├── ConfigError                   training.errors   bad or unknown setting
    ├── CheckpointError               training.errors   not a usable checkpoint
    ├── InferenceError                training.errors   the model failed on valid input
    ├── NoAnalysableSeries            training.errors   no axial head CT series in a study
    ├── DataError                     training.errors   a data folder that cannot be used
    ├── SyntheticDataError            training.errors   impossible synthetic-study options
    ├── TrainingStopped               training.errors   training stopped on request, state saved
    ├── TrainingDiverged              training.errors   a non-finite loss or gradient; finite states kept
    ├── DeliveryError                 node.errors       retried: a destination did not take a result
    ├── PullError                     node.errors       retried: a [[sources]] PACS did not answer a poll
    └── CannotReanalyse               node.errors       a study named for re-analysis: unknown, or purged
"""

from __future__ import annotations

from storage import errors as _storage_errors
from storage.errors import *  # noqa: F403 - the tree, re-exported whole (see __all__)
from storage.errors import IchNodeError
from training import errors as _training_errors
from training.errors import *  # noqa: F403

# Every error importable from here, so that the CLI and the node's modules need one import.
__all__ = [*_storage_errors.__all__, *_training_errors.__all__, "DeliveryError", "PullError", "CannotReanalyse"]


class DeliveryError(IchNodeError):
    """A destination refused a result or could not be reached."""

    retryable = True


class PullError(IchNodeError):
    """A [[sources]] PACS could not be reached, refused a query or a retrieval, or sent
    less than it reported; the poll is tried again at the next interval."""

    retryable = True


class CannotReanalyse(IchNodeError):
    """A study an admin named for re-analysis is not on the node, or has no instances left."""
