"""Forward passes for prediction: eager PyTorch, or the same weights in ONNX Runtime.
Either returns, beside the logits, the features Grad-CAM starts from (the model cut at
its Grad-CAM layer), so explaining a key slice needs no second pass below that layer.

ONNX Runtime runs EffClass about twice as fast as eager PyTorch on a CPU with the same
answers (checked by tests/test_runtime.py, measured by `make bench`); on a GPU the
eager model runs, in fp16 autocast when mixed precision is on. Grad-CAM always uses the
PyTorch model above the cut, which it needs gradients from.
"""

from __future__ import annotations

import io
import os
import warnings
from typing import Protocol

import numpy as np
import torch
from torch import nn

from training.errors import ConfigError
from training.inference.settings import Backend
from training.model.architectures import GradcamSplit

__all__ = ["Forward", "TorchForward", "OnnxForward", "make_forward"]


class Forward(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [N, 2] as float32 for a float32 batch [N, 3, S, S], and the features
        Grad-CAM starts from (the model's `below` at the Grad-CAM layer), batched."""


class _Split(nn.Module):
    """The model as `above(below(x))`, returning the logits and what `below` gave, so one
    inference pass also yields what Grad-CAM needs."""

    def __init__(self, model: nn.Module, split: GradcamSplit) -> None:
        super().__init__()
        self.model = model  # registered, so the split's parameters are the module's
        self.split = split
        # A new module is in training mode; the ONNX exporter restores that mode after
        # exporting, which would put the model's batch norms into training mode too.
        self.eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        features = self.split.below(x)
        return (self.split.above(features), *features)


class TorchForward:
    """Eager PyTorch on the predictor's device."""

    def __init__(self, model: nn.Module, split: GradcamSplit, device: torch.device, *,
                 mixed_precision: bool = False) -> None:
        self.module = _Split(model, split)
        self.device = device
        self.mixed_precision = mixed_precision and device.type == "cuda"
        self.name = "torch-fp16-autocast" if self.mixed_precision else "torch-fp32"

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        with torch.inference_mode(), torch.autocast(
            device_type=self.device.type, dtype=torch.float16, enabled=self.mixed_precision
        ):
            logits, *features = self.module(torch.from_numpy(batch).to(self.device))
        return logits.float().cpu().numpy(), [f.float().cpu().numpy() for f in features]


class OnnxForward:
    """The model exported to ONNX (opset 17) in memory and run by ONNX Runtime on the CPU."""

    name = "onnxruntime-cpu"

    def __init__(self, model: nn.Module, split: GradcamSplit, input_shape: tuple[int, int, int], *,
                 threads: int | None = None) -> None:
        import onnxruntime as ort

        module = _Split(model.cpu(), split)
        example = torch.zeros(1, *input_shape)
        with torch.inference_mode():
            count = len(module(example)) - 1
        self.outputs = ["logits", *(f"feature{i}" for i in range(count))]
        buffer = io.BytesIO()
        # Without gradients the export holds about 600 MB less at its peak (make bench).
        with warnings.catch_warnings(), torch.no_grad():  # tracing notes about shape checks: expected
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module, example, buffer, opset_version=17, dynamo=False,
                input_names=["input"], output_names=self.outputs,
                dynamic_axes={name: {0: "batch"} for name in ["input", *self.outputs]},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        # The memory pattern pre-allocates every activation of a batch at once: 500 MB more
        # at the default batch of 8 for EffClass, and no faster on a CPU (make bench).
        options.enable_mem_pattern = False
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
        logits, *features = self.session.run(self.outputs, {"input": np.ascontiguousarray(batch, dtype=np.float32)})
        return logits, features


def make_forward(backend: Backend, model: nn.Module, split: GradcamSplit, device: torch.device,
                 input_shape: tuple[int, int, int], *, mixed_precision: bool = True) -> Forward:
    """The forward pass `backend` gives on `device`."""
    if backend == Backend.AUTO:
        backend = Backend.ONNXRUNTIME if device.type == "cpu" else Backend.TORCH
    if backend == Backend.ONNXRUNTIME:
        if device.type != "cpu":
            raise ConfigError(f"model.backend onnxruntime runs on the CPU; model.device is {device}")
        return OnnxForward(model, split, input_shape)
    return TorchForward(model, split, device, mixed_precision=mixed_precision)
