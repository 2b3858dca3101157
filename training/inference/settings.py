"""How a model runs, as values that check themselves when parsed (`model.device`,
`model.backend`), so nothing downstream checks them again. No torch import here: reading
a config stays fast for commands that never load a model."""

from __future__ import annotations

import enum
import re

__all__ = ["Device", "Backend"]

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class Device(str):
    """auto, cpu, cuda or cuda:N — refused with ValueError when made from anything else."""

    def __new__(cls, name: str) -> "Device":
        if not _DEVICE.fullmatch(str(name)):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, got {name!r}")
        return super().__new__(cls, name)


class Backend(enum.StrEnum):
    """What runs the forward pass."""

    AUTO = "auto"  # ONNX Runtime on a CPU, eager PyTorch on a GPU
    TORCH = "torch"
    ONNXRUNTIME = "onnxruntime"
