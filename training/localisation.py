"""Does the Grad-CAM heatmap point at the bleed? Pure numpy, measured where masks exist.

Synthetic studies come with a lesion mask per slice, so the explanation the node shows can
be checked, not just admired: a key slice counts as localised when the hottest pixel of
its Grad-CAM map lies inside the bleed mask dilated by a margin. The margin is in mm
because Grad-CAM at `resnet.layer4` has one value per 32 input pixels (about 15 mm on a
head CT), so its peak cannot be sharper than that.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from training.preprocess import pad_to_square, resize_bilinear

__all__ = ["DEFAULT_MARGIN_MM", "mask_to_input", "dilate", "margin_in_input_pixels", "peak_inside"]

DEFAULT_MARGIN_MM = 10.0


def mask_to_input(mask: np.ndarray, input_size: int) -> np.ndarray:
    """A slice's (H, W) lesion mask on the model's input grid: padded to a square and
    resized as the image was, so it lines up with the Grad-CAM map pixel for pixel."""
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    square = pad_to_square((mask != 0).astype(np.float32)[None])
    return resize_bilinear(square, input_size)[0] >= 0.5


def margin_in_input_pixels(margin_mm: float, pixel_spacing_mm: float, rows: int, columns: int,
                           input_size: int) -> float:
    """`margin_mm` on the input grid of a (rows × columns) slice with this pixel spacing."""
    if margin_mm < 0 or pixel_spacing_mm <= 0:
        raise ValueError(f"need margin ≥ 0 and pixel spacing > 0, got {margin_mm} and {pixel_spacing_mm}")
    return margin_mm / pixel_spacing_mm * input_size / max(rows, columns)


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
