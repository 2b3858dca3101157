"""The one way to run a model: preprocessing → forward → P(ICH), and Grad-CAM (the split
path of training/inference/gradcam.py: the inference pass already gives what Grad-CAM
starts from).

The node and evaluation both use `Predictor`, so a slice is prepared for the network the
same way wherever it comes from (a DICOM file, or the training cache); tests may replace
it with any object that has the same methods. Its settings arrive already checked
(`Device`, `Backend`, `GradcamLayer` check themselves when parsed); only what depends on
the checkpoint or the machine is checked here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from pydicom.dataset import Dataset
from scipy.special import expit
from torch import nn

from training.errors import InferenceError
from training.inference.device import resolve_device
from training.inference.gradcam import ICH_CLASS, Features, SplitGradCam
from training.inference.runtime import make_forward
from training.inference.settings import Backend, Device
from training.model.architectures import architecture_spec, gradcam_split, resolve_gradcam_layer
from training.model.checkpoint import ModelConfig, load_checkpoint
from training.model.layers import GradcamLayer
from training.model.preprocess import dataset_to_input, hu_to_input, windowed_to_input

__all__ = ["Inference", "Predictor"]


@dataclass(frozen=True)
class Inference:
    """What one pass over a batch of slices gives."""

    probabilities: np.ndarray  # P(ICH) per slice, float32 [N]
    features: list[Features]  # per slice, what Grad-CAM starts from
    descriptors: list[dict[str, np.ndarray]]  # per slice, each descriptor layer's channel means


class Predictor:
    """Slice probabilities and Grad-CAM maps from one model, batched, on one device."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        *,
        device: Device = Device("auto"),
        batch_size: int = 8,
        backend: Backend = Backend.TORCH,
        mixed_precision: bool = True,
        gradcam_layer: GradcamLayer = GradcamLayer.AUTO,
    ) -> None:
        self.gradcam_layer = resolve_gradcam_layer(config.architecture, gradcam_layer)
        self.config = config
        self.device = resolve_device(device)
        self.batch_size = batch_size
        self.model = model.to(self.device).eval()
        split = gradcam_split(self.model, self.gradcam_layer)
        self.descriptor_layers = architecture_spec(config.architecture).descriptor_layers
        self.forward = make_forward(backend, self.model, split, self.device, self.input_shape,
                                    descriptor_layers=self.descriptor_layers, mixed_precision=mixed_precision)
        self.model.to(self.device)  # an ONNX export leaves the model on the CPU
        self._cam = SplitGradCam(self.model, split, self.device)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, *, device: Device = Device("auto"), batch_size: int = 8,
        backend: Backend = Backend.TORCH, mixed_precision: bool = True,
        gradcam_layer: GradcamLayer = GradcamLayer.AUTO,
    ) -> "Predictor":
        model, config = load_checkpoint(path)
        return cls(model, config, device=device, batch_size=batch_size, backend=backend,
                   mixed_precision=mixed_precision, gradcam_layer=gradcam_layer)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.config.preprocess.input_size
        return (3, size, size)

    def prepare_slice(self, ds: Dataset) -> np.ndarray:
        """One DICOM slice → network input [3, S, S]; InvalidInstance names what is wrong."""
        return dataset_to_input(ds, self.config.preprocess)

    def prepare_hu(self, hu: np.ndarray) -> np.ndarray:
        """One slice in HU (H, W) → network input [3, S, S]: for a caller that also needs the HU."""
        return hu_to_input(hu, self.config.preprocess)

    def prepare_windowed(self, channels: np.ndarray) -> np.ndarray:
        """One windowed square image [3, H, W] in [0, 1] (the training cache) → network input."""
        return windowed_to_input(channels, self.config.preprocess)

    def prepare(self, slices: Sequence[Dataset]) -> np.ndarray:
        """DICOM slices → network inputs [N, 3, S, S] with the checkpoint's preprocessing."""
        if not slices:
            return np.zeros((0, *self.input_shape), dtype=np.float32)
        return np.stack([self.prepare_slice(ds) for ds in slices])

    def _check(self, inputs: np.ndarray) -> None:
        if inputs.ndim != 4 or tuple(inputs.shape[1:]) != self.input_shape:
            raise InferenceError(
                f"inputs must have shape [N, {', '.join(map(str, self.input_shape))}], "
                f"got {list(inputs.shape)}"
            )

    def infer(self, inputs: np.ndarray) -> Inference:
        """P(ICH), Grad-CAM features and descriptors of each slice, in batches of `batch_size`."""
        self._check(inputs)
        logits, features, descriptors = [], [], []
        for start in range(0, len(inputs), self.batch_size):
            batch_logits, batch_features, batch_descriptors = self.forward(inputs[start : start + self.batch_size])
            logits.append(batch_logits)
            features += [[f[i] for f in batch_features] for i in range(len(batch_logits))]
            descriptors += [{layer: d[i] for layer, d in batch_descriptors.items()} for i in range(len(batch_logits))]
        if not logits:
            return Inference(np.zeros(0, dtype=np.float32), [], [])
        both = np.concatenate(logits).astype(np.float64)
        # Softmax of two logits is the logistic function of their difference.
        probabilities = expit(both[:, ICH_CLASS] - both[:, 1 - ICH_CLASS]).astype(np.float32)
        return Inference(probabilities, features, descriptors)

    def predict_with_features(self, inputs: np.ndarray) -> tuple[np.ndarray, list[Features]]:
        """P(ICH) per slice, float32 [N], and each slice's features for `gradcam_from_features`."""
        inference = self.infer(inputs)
        return inference.probabilities, inference.features

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """P(ICH) per slice, float32 [N], in batches of `batch_size`."""
        return self.infer(inputs).probabilities

    def predict_slices(self, slices: Sequence[Dataset]) -> np.ndarray:
        """P(ICH) per DICOM slice, in the order given."""
        return self.predict(self.prepare(slices))

    def warm_up(self) -> None:
        """One pass of a blank slice through inference and Grad-CAM, so that first-run
        costs (kernel set-up, memory) are paid at start-up, not by the first study, and a
        model that cannot run fails there."""
        _, features = self.predict_with_features(np.zeros((1, *self.input_shape), dtype=np.float32))
        self.gradcam_from_features(features)

    def gradcam_cell_pixels(self) -> float:
        """Input pixels per Grad-CAM value: how coarse the map is before it is upsampled."""
        (features,) = self._cam.features(np.zeros((1, *self.input_shape), dtype=np.float32))
        return self.input_shape[-1] / features[-1].shape[-1]

    def gradcam(self, inputs: np.ndarray, *, aug_smooth: bool = False) -> np.ndarray:
        """Grad-CAM of the ICH class at `gradcam_layer`: float32 [N, S, S] in [0, 1].
        `aug_smooth` averages six flipped/scaled passes: smoother maps, six times the cost."""
        self._check(inputs)
        if len(inputs) == 0:
            return np.zeros((0, *self.input_shape[1:]), dtype=np.float32)
        return self._cam.maps_for(inputs, aug_smooth=aug_smooth)

    def gradcam_from_features(self, features: list[Features]) -> np.ndarray:
        """Grad-CAM maps from the features `predict_with_features` returned: only the
        network above the Grad-CAM layer runs again."""
        if not features:
            return np.zeros((0, *self.input_shape[1:]), dtype=np.float32)
        return self._cam.maps(features, self.input_shape[1:])
