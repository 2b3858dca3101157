"""Forward passes for prediction: eager PyTorch, or the same weights in ONNX Runtime.
Either returns, beside the logits, the features Grad-CAM starts from (the model cut at
its Grad-CAM layer), so explaining a key slice needs no second pass below that layer,
and each slice's descriptors (channel means of a few layers) that the out-of-distribution
check compares with the training inputs, so that check costs no pass of its own.

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
from training.model.architectures import GradcamSplit, descriptor_modules

__all__ = ["Forward", "Outputs", "TorchForward", "OnnxForward", "make_forward"]

# (logits [N, 2], Grad-CAM features (batched, one array per tensor), descriptors by layer [N, D])
Outputs = tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]


class Forward(Protocol):
    name: str

    def __call__(self, batch: np.ndarray) -> Outputs:
        """Logits [N, 2] as float32 for a float32 batch [N, 3, S, S], the features Grad-CAM
        starts from (the model's `below` at the Grad-CAM layer), and each descriptor layer's
        channel means (`logits` among them)."""


class _Split(nn.Module):
    """The model as `above(below(x))`, returning the logits, what `below` gave and the
    channel means of the descriptor layers, so one inference pass also yields what
    Grad-CAM and the out-of-distribution check need."""

    def __init__(self, model: nn.Module, split: GradcamSplit, descriptor_layers: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model  # registered, so the split's parameters are the module's
        self.split = split
        self.layers = tuple(layer for layer in descriptor_layers if layer != "logits")
        self._taps: dict[tuple[str, int], torch.Tensor] | None = None  # filled only during forward
        self._hooks = [module.register_forward_hook(self._tap(layer, index))
                       for layer in self.layers for index, module in enumerate(descriptor_modules(model, layer))]
        # A new module is in training mode; the ONNX exporter restores that mode after
        # exporting, which would put the model's batch norms into training mode too.
        self.eval()

    def _tap(self, layer: str, index: int):
        def hook(_module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
            if self._taps is not None:  # Grad-CAM runs the same modules: not ours to record
                self._taps[(layer, index)] = output
        return hook

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        self._taps = {}
        try:
            features = self.split.below(x)
            logits = self.split.above(features)
            descriptors = [torch.cat([tensor.mean(dim=(2, 3)) for (layer, _), tensor in sorted(self._taps.items())
                                      if layer == name], dim=1) for name in self.layers]
        finally:
            self._taps = None
        return (logits, *features, *descriptors)

    def split_outputs(self, outputs: list[np.ndarray]) -> Outputs:
        """The forward's flat outputs as (logits, features, descriptors by layer)."""
        logits, rest = outputs[0], outputs[1:]
        count = len(rest) - len(self.layers)
        descriptors = {"logits": logits, **dict(zip(self.layers, rest[count:]))}
        return logits, rest[:count], descriptors


class TorchForward:
    """Eager PyTorch on the predictor's device."""

    def __init__(self, model: nn.Module, split: GradcamSplit, device: torch.device, *,
                 descriptor_layers: tuple[str, ...] = (), mixed_precision: bool = False) -> None:
        self.module = _Split(model, split, descriptor_layers)
        self.device = device
        self.mixed_precision = mixed_precision and device.type == "cuda"
        self.name = "torch-fp16-autocast" if self.mixed_precision else "torch-fp32"

    def __call__(self, batch: np.ndarray) -> Outputs:
        with torch.inference_mode(), torch.autocast(
            device_type=self.device.type, dtype=torch.float16, enabled=self.mixed_precision
        ):
            outputs = self.module(torch.from_numpy(batch).to(self.device))
        return self.module.split_outputs([t.float().cpu().numpy() for t in outputs])


class OnnxForward:
    """The model exported to ONNX (opset 17) in memory and run by ONNX Runtime on the CPU."""

    name = "onnxruntime-cpu"

    def __init__(self, model: nn.Module, split: GradcamSplit, input_shape: tuple[int, int, int], *,
                 descriptor_layers: tuple[str, ...] = (), threads: int | None = None) -> None:
        import onnxruntime as ort

        module = self.module = _Split(model.cpu(), split, descriptor_layers)
        example = torch.zeros(1, *input_shape)
        with torch.inference_mode():
            count = len(module(example)) - 1 - len(module.layers)
        self.outputs = ["logits", *(f"feature{i}" for i in range(count)), *(f"descriptor_{d}" for d in module.layers)]
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

    def __call__(self, batch: np.ndarray) -> Outputs:
        outputs = self.session.run(self.outputs, {"input": np.ascontiguousarray(batch, dtype=np.float32)})
        return self.module.split_outputs(outputs)


def make_forward(backend: Backend, model: nn.Module, split: GradcamSplit, device: torch.device,
                 input_shape: tuple[int, int, int], *, descriptor_layers: tuple[str, ...] = (),
                 mixed_precision: bool = True) -> Forward:
    """The forward pass `backend` gives on `device`, returning `descriptor_layers` too."""
    if backend == Backend.AUTO:
        backend = Backend.ONNXRUNTIME if device.type == "cpu" else Backend.TORCH
    if backend == Backend.ONNXRUNTIME:
        if device.type != "cpu":
            raise ConfigError(f"model.backend onnxruntime runs on the CPU; model.device is {device}")
        return OnnxForward(model, split, input_shape, descriptor_layers=descriptor_layers)
    return TorchForward(model, split, device, descriptor_layers=descriptor_layers,
                        mixed_precision=mixed_precision)
