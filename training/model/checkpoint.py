"""Checkpoints: one file holding the weights and the model's own config.

The config says which architecture the weights belong to, how to preprocess its input,
which thresholds it recommends and where it came from (training data, metrics, code
version), so the node needs nothing but the file. A checkpoint trained on synthetic data
says so in its provenance, and everything built from it carries that warning.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from training.errors import CheckpointError
from storage.atomic import atomic_write
from training.model.architectures import architecture_spec, create_model
from training.model.preprocess import PreprocessSpec, Window
from training.model.rule import TriageRule
from training.model.inputs import InputProfile
from training.model.scope import Scope

__all__ = [
    "CHECKPOINT_FORMAT",
    "FORMAT_VERSION",
    "TRAINING_DATA_KINDS",
    "Provenance",
    "ModelConfig",
    "default_model_config",
    "save_checkpoint",
    "load_checkpoint",
    "read_state_dict",
    "read_torch_file",
    "checkpoint_digest",
    "initial_model",
]

CHECKPOINT_FORMAT = "ichnode-checkpoint"
FORMAT_VERSION = 1
# "none": random weights, never trained. "synthetic": phantoms from training/synthetic.py.
TRAINING_DATA_KINDS = ("none", "synthetic", "rsna", "other")


@dataclass(frozen=True)
class Provenance:
    """Where the weights came from; shown with every result the model produces."""

    training_data: str = "none"
    description: str = "random initial weights, not trained"
    metrics: dict[str, Any] = field(default_factory=dict)
    code_version: str = field(default_factory=lambda: _code_version())
    created: str = field(
        default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    )
    # How the weights were made, to repeat or audit the run: the resolved training config,
    # initial weights (with their SHA-256), git commit, library versions, SHA-256 of the
    # split lists. Empty for checkpoints written before it was recorded.
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.training_data not in TRAINING_DATA_KINDS:
            raise ValueError(
                f"training_data must be one of {', '.join(TRAINING_DATA_KINDS)}, "
                f"got {self.training_data!r}"
            )

    @property
    def synthetic(self) -> bool:
        """Trained on synthetic phantoms: outputs must say it is a demonstration."""
        return self.training_data == "synthetic"

    @property
    def untrained(self) -> bool:
        return self.training_data == "none"


@dataclass(frozen=True)
class ModelConfig:
    """The model's own config, saved beside its weights."""

    architecture: str
    preprocess: PreprocessSpec
    triage: TriageRule = field(default_factory=TriageRule)
    provenance: Provenance = field(default_factory=Provenance)
    # The inputs the model supports; a checkpoint written before scopes existed gets the defaults.
    scope: Scope = field(default_factory=Scope)
    # Its training inputs in feature space, for the out-of-distribution check (`ichnode fit-ood`).
    inputs: InputProfile | None = None

    def __post_init__(self) -> None:
        spec = architecture_spec(self.architecture)
        if self.preprocess.input_size != spec.input_size:
            raise ValueError(
                f"architecture {self.architecture!r} takes {spec.input_size}² input, "
                f"config says {self.preprocess.input_size}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (the profile's arrays as numpy arrays)."""
        plain = {name: getattr(self, name) for name in ("architecture", "preprocess", "triage", "provenance")}
        return asdict(ModelConfig(**plain)) | {
            "scope": self.scope.to_dict(), "inputs": self.inputs.to_dict() if self.inputs else None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        preprocess = dict(data["preprocess"])
        preprocess["windows"] = tuple(Window(**w) for w in preprocess["windows"])
        return cls(
            architecture=data["architecture"],
            preprocess=PreprocessSpec(**preprocess),
            triage=TriageRule(**data["triage"]),
            provenance=Provenance(**data["provenance"]),
            scope=Scope.from_dict(data["scope"]) if "scope" in data else Scope(),
            inputs=InputProfile.from_dict(data["inputs"]) if data.get("inputs") else None,
        )


def default_model_config(architecture: str, provenance: Provenance | None = None) -> ModelConfig:
    """The paper's preprocessing and thresholds for `architecture`."""
    spec = architecture_spec(architecture)
    return ModelConfig(
        architecture=architecture,
        preprocess=PreprocessSpec(input_size=spec.input_size),
        provenance=provenance or Provenance(),
    )


def _code_version() -> str:
    try:
        return f"ichnode {metadata.version('ichnode')}"
    except metadata.PackageNotFoundError:
        return "ichnode (not installed)"


def save_checkpoint(path: str | Path, model: nn.Module, config: ModelConfig, *, half: bool = False) -> Path:
    """Write weights and config to `path` atomically (a reader never sees half a file).

    `half` stores floating-point tensors as float16, for a file half the size (one that
    is committed to the repository, say); loading casts them back to the model's float32.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if half:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    payload = {
        "format": CHECKPOINT_FORMAT,
        "format_version": FORMAT_VERSION,
        "config": _tensors(config.to_dict()),
        "state_dict": state,
    }

    # A checkpoint is no secret: readable as the umask allows, like the files beside it.
    atomic_write(path, lambda handle: torch.save(payload, handle), shared=True)
    return path


def _tensors(data: Any) -> Any:
    """numpy arrays as tensors: a checkpoint is read with weights_only, which loads tensors
    but no numpy objects."""
    if isinstance(data, dict):
        return {key: _tensors(value) for key, value in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_tensors(value) for value in data)
    return torch.from_numpy(data) if isinstance(data, np.ndarray) else data


def checkpoint_digest(path: str | Path) -> str:
    """SHA-256 of the checkpoint file: which weights and rule an analysis used, for joining
    a node's history with the checkpoint it is calibrated into."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _read_payload(path: Path) -> Any:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    return read_torch_file(path, "a model checkpoint")


def read_torch_file(path: Path, what: str) -> Any:
    """What `torch.save` wrote to `path`, as tensors and plain data only: a weights file is
    data, never code to run. CheckpointError says the file is not `what` otherwise,
    without torch's advice to load it with weights_only=False (that runs the file's code)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a foreign file
        text = str(exc)
        # torch's own reason follows its advice; keep only the reason.
        reason = text.split("WeightsUnpickler error:", 1)[1] if "WeightsUnpickler error:" in text else text
        reason = next((line.strip() for line in reason.splitlines() if line.strip()), "")
        raise CheckpointError(f"{path} is not {what}: it is not a file of tensors and plain data that torch.save "
                              f"writes ({type(exc).__name__}{': ' + reason if reason else ''})") from None


def _is_checkpoint(payload: Any) -> bool:
    return isinstance(payload, dict) and payload.get("format") == CHECKPOINT_FORMAT


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a checkpoint of this project, or from a bare saved state dict."""
    path = Path(path)
    payload = _read_payload(path)
    if _is_checkpoint(payload):
        return payload["state_dict"]
    if isinstance(payload, dict) and payload and all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in payload.items()
    ):
        return payload
    raise CheckpointError(f"{path} holds neither a checkpoint nor a state dict")


def load_checkpoint(
    path: str | Path, *, architecture: str | None = None
) -> tuple[nn.Module, ModelConfig]:
    """The model (eval mode, on the CPU) and its config from `path`.

    With `architecture`, a checkpoint of any other architecture is refused.
    """
    path = Path(path)
    payload = _read_payload(path)
    if not _is_checkpoint(payload):
        raise CheckpointError(
            f"{path} is not an ichnode checkpoint (no '{CHECKPOINT_FORMAT}' header); "
            "write checkpoints with `ichnode train` or training.model.checkpoint.save_checkpoint"
        )
    if payload.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {payload.get('format_version')!r}; "
            f"this ichnode reads version {FORMAT_VERSION}"
        )
    try:
        config = ModelConfig.from_dict(payload["config"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{path} has an invalid model config: {exc}") from exc
    if architecture is not None and config.architecture != architecture:
        raise CheckpointError(
            f"{path} holds a {config.architecture!r} model, not {architecture!r}"
        )
    model = create_model(config.architecture)
    try:
        model.load_state_dict(payload["state_dict"])
    except (KeyError, RuntimeError) as exc:
        raise CheckpointError(
            f"{path}: weights do not fit architecture {config.architecture!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.eval(), config


def initial_model(architecture: str, *, init_from: str | Path | None = None) -> nn.Module:
    """Architecture `architecture` with random weights, or with the weights of `init_from`
    (a checkpoint of this project or a bare state dict saved with `torch.save`)."""
    model = create_model(architecture)
    if init_from is None:
        return model
    path = Path(init_from)
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as exc:
        raise CheckpointError(
            f"initial weights {path} do not fit architecture {architecture!r}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model
