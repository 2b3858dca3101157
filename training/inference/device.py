"""Where the model runs: a configured `Device` resolved to a torch device on this machine
(auto: the first CUDA GPU when there is one, else the CPU)."""

from __future__ import annotations

import torch

from training.errors import ConfigError
from training.inference.settings import Device

__all__ = ["resolve_device"]


def resolve_device(device: Device, key: str = "model.device") -> torch.device:
    """The torch device for `device` on this machine; ConfigError, naming the config `key`
    that gave it, when the GPU it names is not here."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cpu":
        return resolved
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} is {str(device)!r} but no CUDA GPU is available here")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise ConfigError(
            f"{key} is {str(device)!r} but only {torch.cuda.device_count()} GPU(s) exist"
        )
    return resolved
