"""Forward passes for prediction: eager PyTorch, or the same weights in ONNX Runtime.

ONNX Runtime runs EffClass about twice as fast as eager PyTorch on a CPU with the same
answers (checked by tests/test_runtime.py, measured by `make bench`); on a GPU the
eager model runs, in fp16 autocast when mixed precision is on. Grad-CAM always uses the
PyTorch model, which it needs gradients from.
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

__all__ = ["Forward", "TorchForward", "OnnxForward", "make_forward"]


class Forward(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        """Logits [N, 2] as float32 for a float32 batch [N, 3, S, S]."""


class TorchForward:
    """Eager PyTorch on the predictor's device."""

    def __init__(self, model: nn.Module, device: torch.device, *, mixed_precision: bool = False) -> None:
        self.model = model
        self.device = device
        self.mixed_precision = mixed_precision and device.type == "cuda"
        self.name = "torch-fp16-autocast" if self.mixed_precision else "torch-fp32"

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode(), torch.autocast(
            device_type=self.device.type, dtype=torch.float16, enabled=self.mixed_precision
        ):
            logits = self.model(torch.from_numpy(batch).to(self.device))
        return logits.float().cpu().numpy()


class OnnxForward:
    """The model exported to ONNX (opset 17) in memory and run by ONNX Runtime on the CPU."""

    name = "onnxruntime-cpu"

    def __init__(self, model: nn.Module, input_shape: tuple[int, int, int], *, threads: int | None = None) -> None:
        import onnxruntime as ort

        buffer = io.BytesIO()
        example = torch.zeros(1, *input_shape)
        with warnings.catch_warnings():  # tracing notes about shape checks: expected
            warnings.simplefilter("ignore")
            torch.onnx.export(
                model.cpu().eval(), example, buffer, opset_version=17, dynamo=False,
                input_names=["input"], output_names=["logits"],
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or len(os.sched_getaffinity(0))
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        return self.session.run(["logits"], {"input": np.ascontiguousarray(batch, dtype=np.float32)})[0]


def make_forward(backend: Backend, model: nn.Module, device: torch.device, input_shape: tuple[int, int, int],
                 *, mixed_precision: bool = True) -> Forward:
    """The forward pass `backend` gives on `device`."""
    if backend == Backend.AUTO:
        backend = Backend.ONNXRUNTIME if device.type == "cpu" else Backend.TORCH
    if backend == Backend.ONNXRUNTIME:
        if device.type != "cpu":
            raise ConfigError(f"model.backend onnxruntime runs on the CPU; model.device is {device}")
        return OnnxForward(model, input_shape)
    return TorchForward(model, device, mixed_precision=mixed_precision)
