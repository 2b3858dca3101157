"""Does the Grad-CAM heatmap point at the bleed? Pure numpy, measured where masks exist.

Synthetic studies come with a lesion mask per slice, so the explanation the node shows can
be checked, not just admired: a key slice counts as localised when the hottest pixel of
its Grad-CAM map lies inside the bleed mask dilated by half a Grad-CAM cell. The map has
one value per cell of the layer it explains at (EffClass's default `bifpn_p3`: 64 × 64
over the 512-pixel input, 8 pixels a cell; `layer4`: 7 × 7, 73 pixels a cell), measured
from the model, and is upsampled smoothly, so its peak sits near a cell centre; "the bleed
reaches to within half a cell of the peak" is the finest claim such a map can support.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from training.model.preprocess import pad_to_square, resize_bilinear

__all__ = ["mask_to_input", "dilate", "peak_inside"]


def mask_to_input(mask: np.ndarray, input_size: int) -> np.ndarray:
    """A slice's (H, W) lesion mask on the model's input grid: padded to a square and
    resized as the image was, so it lines up with the Grad-CAM map pixel for pixel."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    square = pad_to_square((mask != 0).astype(np.float32)[None])
    return resize_bilinear(square, input_size)[0] >= 0.5


def dilate(mask: np.ndarray, radius: float) -> np.ndarray:
    """Pixels within `radius` (Euclidean, in pixels) of the mask; empty stays empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return mask.copy()
    return ndimage.distance_transform_edt(~mask) <= radius


def peak_inside(cam: np.ndarray, region: np.ndarray) -> bool:
    """Whether the heatmap's maximum (the first, in row-major order, on ties) is in `region`."""
    if cam.shape != region.shape:
        raise ValueError(f"heatmap {cam.shape} and region {region.shape} differ in shape")
    row, column = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return bool(region[row, column])
