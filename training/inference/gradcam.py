"""Grad-CAM that differentiates only what it needs.

Grad-CAM weighs a layer's activation A by the spatial mean of d logit(ICH) / dA. Only the
network above the layer lies between A and the logit, so the network is cut there
(`GradcamSplit`): the part below runs without autograd — or not at all, when the
inference pass already returned its features — and only the part above is
differentiated, with respect to A alone (no weight gradients). For EffClass at its
default layer this skips the EfficientNet backbone and most of the BiFPN at 512², which
is where a full-network backward pass spends its time and memory.

The maps equal pytorch-grad-cam's `GradCAM` at the same layer (tests/test_gradcam.py):
the same weights, ReLU, min-max scaling, bilinear resize and, with `aug_smooth`, the same
six flipped and scaled passes.
"""

from __future__ import annotations

import numpy as np
import torch
import ttach
from pytorch_grad_cam.utils.image import scale_cam_image
from torch import nn

from training.errors import InferenceError
from training.model.architectures import GradcamSplit

__all__ = ["ICH_CLASS", "Features", "SplitGradCam"]

ICH_CLASS = 1  # logits are [no ICH, ICH]
Features = list[np.ndarray]  # what `below` gave for one slice, one array per tensor


class SplitGradCam:
    """Grad-CAM of the ICH logit for one model cut at one layer."""

    def __init__(self, model: nn.Module, split: GradcamSplit, device: torch.device) -> None:
        self.model = model
        self.split = split
        self.device = device

    def features(self, inputs: np.ndarray) -> list[Features]:
        """What `above` needs, per slice, computed without autograd."""
        with torch.inference_mode():
            tensors = self.split.below(torch.from_numpy(inputs).to(self.device))
        arrays = [t.float().cpu().numpy() for t in tensors]
        return [[a[i] for a in arrays] for i in range(len(inputs))]

    def maps(self, features: list[Features], size: tuple[int, int]) -> np.ndarray:
        """Grad-CAM maps [N, H, W] in [0, 1] at `size` (H, W) from each slice's features."""
        tensors = [torch.from_numpy(np.stack([f[k] for f in features])).to(self.device)
                   for k in range(len(features[0]))]
        activation = tensors[-1].requires_grad_(True)
        weights = [p for p in self.model.parameters() if p.requires_grad]
        for parameter in weights:  # gradients with respect to the activation only
            parameter.requires_grad_(False)
        try:
            with torch.enable_grad():
                logits = self.split.above([*tensors[:-1], activation])
                (gradient,) = torch.autograd.grad(logits[:, ICH_CLASS].sum(), activation)
        finally:
            for parameter in weights:
                parameter.requires_grad_(True)
        cam = (gradient.mean(dim=(2, 3), keepdim=True) * activation.detach()).sum(dim=1)
        cam = np.maximum(cam.float().cpu().numpy(), 0)
        # pytorch-grad-cam scales each map to [0, 1] and resizes it, then scales again.
        result = scale_cam_image(scale_cam_image(cam, (size[1], size[0])))
        if not np.isfinite(result).all():
            raise InferenceError("Grad-CAM produced non-finite values")
        return result.astype(np.float32)

    def maps_for(self, inputs: np.ndarray, *, aug_smooth: bool = False) -> np.ndarray:
        """Grad-CAM maps of network inputs [N, 3, S, S]; `aug_smooth` averages the maps of
        six flipped and scaled copies (smoother, six times the cost)."""
        size = (inputs.shape[-2], inputs.shape[-1])
        if not aug_smooth:
            return self.maps(self.features(inputs), size)
        transforms = ttach.Compose([ttach.HorizontalFlip(), ttach.Multiply(factors=[0.9, 1, 1.1])])
        maps = []
        for transform in transforms:
            augmented = transform.augment_image(torch.from_numpy(inputs)).numpy()
            cam = torch.from_numpy(self.maps(self.features(augmented), size))[:, None]
            maps.append(transform.deaugment_mask(cam)[:, 0].numpy())
        return np.mean(np.float32(maps), axis=0)
