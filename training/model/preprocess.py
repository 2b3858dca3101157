"""CT slice → network input, as in the paper's code, in pure numpy.

The `Predictor` (the node and evaluation) and the training data sets use these functions
with the `PreprocessSpec` stored in the checkpoint, so preprocessing cannot drift between
training and serving. Input that cannot give true HU (a zero or non-finite slope, pixel
data that does not fit BitsAllocated, a constant image) is refused with InvalidInstance
naming the attribute: a triage node must never turn unreadable input into "not detected".
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from storage.errors import InvalidInstance
from training.model import attributes as attr

__all__ = [
    "square_pixels",
    "resize_bilinear_rect",
    "Window",
    "PAPER_WINDOWS",
    "PreprocessSpec",
    "rsna_fix",
    "to_hu",
    "apply_window",
    "window_channels",
    "pad_to_square",
    "resize_bilinear",
    "normalise",
    "hu_from_dataset",
    "hu_to_input",
    "mask_to_input",
    "windowed_to_input",
    "dataset_to_input",
]


@dataclass(frozen=True)
class Window:
    """A HU interval mapped linearly onto [0, 1], values outside clipped."""

    name: str
    low: float
    high: float

    def __post_init__(self) -> None:
        if not self.high > self.low:
            raise ValueError(
                f"window {self.name!r} needs high > low, got [{self.low}, {self.high}]"
            )


# The paper's channel order: brain, subdural, soft tissue.
PAPER_WINDOWS: tuple[Window, ...] = (
    Window("brain", 0.0, 80.0),
    Window("subdural", -20.0, 180.0),
    Window("soft_tissue", -150.0, 230.0),
)


@dataclass(frozen=True)
class PreprocessSpec:
    """Everything that turns HU into the network input; travels inside the checkpoint."""

    input_size: int
    windows: tuple[Window, ...] = field(default=PAPER_WINDOWS)
    mean: float = 0.5
    std: float = 0.5

    def __post_init__(self) -> None:
        if not isinstance(self.input_size, int) or self.input_size < 8:
            raise ValueError(f"input_size must be an integer ≥ 8, got {self.input_size!r}")
        if len(self.windows) != 3:
            raise ValueError(f"the networks take 3 windows, got {len(self.windows)}")
        if not self.std > 0:
            raise ValueError(f"normalisation std must be > 0, got {self.std}")


def rsna_fix(
    pixels: np.ndarray, *, bits_stored: int, pixel_representation: int, intercept: float
) -> tuple[np.ndarray, float]:
    """Undo the RSNA 2019 quirk: some unsigned 12-bit images have an intercept near 0 and
    values shifted by −1000 that wrap at 4096. Returns (pixels, intercept) to use."""
    if bits_stored == 12 and pixel_representation == 0 and intercept > -100:
        fixed = pixels.astype(np.int32) + 1000
        fixed[fixed >= 4096] -= 4096
        return fixed, -1000.0
    return pixels, intercept


def to_hu(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """Modality LUT: HU = pixel × slope + intercept, as float32."""
    return pixels.astype(np.float32) * np.float32(slope) + np.float32(intercept)


def apply_window(hu: np.ndarray, window: Window) -> np.ndarray:
    """Clip `hu` to the window and scale it to [0, 1]."""
    clipped = np.clip(hu, window.low, window.high)
    return ((clipped - window.low) / (window.high - window.low)).astype(np.float32)


def window_channels(hu: np.ndarray, windows: tuple[Window, ...]) -> np.ndarray:
    """Stack one [0, 1] channel per window: (H, W) → (len(windows), H, W)."""
    return np.stack([apply_window(hu, w) for w in windows])


def pad_to_square(channels: np.ndarray, fill: float = 0.0) -> np.ndarray:
    """Centre a (C, H, W) image on a square canvas so resizing keeps the anatomy's shape.
    The fill 0 is air in every window (all window lows are above air's −1000 HU)."""
    _, height, width = channels.shape
    side = max(height, width)
    if height == width:
        return channels
    top, left = (side - height) // 2, (side - width) // 2
    canvas = np.full((channels.shape[0], side, side), fill, dtype=channels.dtype)
    canvas[:, top : top + height, left : left + width] = channels
    return canvas


def _bilinear_axis(src: int, dst: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Pixel-centre alignment, as OpenCV's INTER_LINEAR (which the paper's code used).
    coords = np.clip((np.arange(dst) + 0.5) * (src / dst) - 0.5, 0, src - 1)
    lower = np.floor(coords).astype(np.intp)
    upper = np.minimum(lower + 1, src - 1)
    return lower, upper, (coords - lower).astype(np.float32)


def resize_bilinear(channels: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of a (C, H, W) float image to (C, size, size)."""
    _, height, width = channels.shape
    if height == size and width == size:
        return channels
    return resize_bilinear_rect(channels, size, size)


def resize_bilinear_rect(channels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of a (C, H, W) float image to (C, height, width)."""
    _, source_height, source_width = channels.shape
    y0, y1, wy = _bilinear_axis(source_height, height)
    x0, x1, wx = _bilinear_axis(source_width, width)
    rows_top, rows_bottom = channels[:, y0, :], channels[:, y1, :]
    top = rows_top[:, :, x0] * (1 - wx) + rows_top[:, :, x1] * wx
    bottom = rows_bottom[:, :, x0] * (1 - wx) + rows_bottom[:, :, x1] * wx
    return (top * (1 - wy)[:, None] + bottom * wy[:, None]).astype(np.float32)


def square_pixels(hu: np.ndarray, pixel_spacing: tuple[float, float] | None,
                  ) -> tuple[np.ndarray, tuple[float, float] | None]:
    """A slice whose pixels are not square (PixelSpacing row ≠ column spacing) resampled
    so that they are, at the finer spacing, with its new spacing: otherwise the head would
    reach the model, and the pictures, stretched. Square or unknown spacing is returned as is."""
    if pixel_spacing is None or math.isclose(pixel_spacing[0], pixel_spacing[1], rel_tol=1e-3):
        return hu, pixel_spacing
    row_mm, column_mm = pixel_spacing  # between rows (vertical), between columns (horizontal)
    finest = min(row_mm, column_mm)
    height, width = hu.shape
    resampled = resize_bilinear_rect(hu[None].astype(np.float32), max(1, round(height * row_mm / finest)),
                                     max(1, round(width * column_mm / finest)))[0]
    return resampled, (finest, finest)


def normalise(channels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """(x − mean) / std; the paper uses 0.5 / 0.5, mapping [0, 1] to [−1, 1]."""
    return ((channels - np.float32(mean)) / np.float32(std)).astype(np.float32)


def _rescale(ds: Dataset, uid: str) -> tuple[float, float]:
    """(RescaleSlope, RescaleIntercept), missing meaning 1 and 0; a value that is not a
    number, a slope of 0 (every pixel the same HU) and NaN or infinity (no HU at all)
    are refused."""
    try:
        slope, intercept = attr.number_or_error(ds, "RescaleSlope"), attr.number_or_error(ds, "RescaleIntercept")
    except attr.MalformedAttribute as exc:
        raise InvalidInstance(f"instance {uid}: RescaleSlope/RescaleIntercept are not numbers: {exc}") from exc
    slope = 1.0 if slope is None else slope
    intercept = 0.0 if intercept is None else intercept
    if not math.isfinite(slope) or slope == 0:
        raise InvalidInstance(f"instance {uid}: RescaleSlope {slope:g} cannot map pixels to HU "
                              "(it must be finite and non-zero)")
    if not math.isfinite(intercept):
        raise InvalidInstance(f"instance {uid}: RescaleIntercept {intercept:g} is not finite")
    return slope, intercept


def _check_native_length(ds: Dataset, uid: str) -> None:
    """Uncompressed pixel data must hold Rows × Columns × BitsAllocated / 8 bytes (plus
    one pad byte): otherwise the image would be decoded from the wrong bytes."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax is not None and syntax.is_encapsulated:
        return  # compressed: the decoder checks the frame
    bits = int(ds.get("BitsAllocated", 0) or 0)
    if bits not in (8, 16, 32):
        raise InvalidInstance(f"instance {uid}: BitsAllocated {bits} is not 8, 16 or 32")
    expected = int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * bits // 8
    actual = len(ds.PixelData)
    if actual not in (expected, expected + 1):
        raise InvalidInstance(
            f"instance {uid}: PixelData holds {actual} bytes, but Rows {ds.get('Rows')} × Columns "
            f"{ds.get('Columns')} × BitsAllocated {bits} / 8 = {expected}"
        )


def hu_from_dataset(ds: Dataset) -> np.ndarray:
    """The slice in HU as float32 (H, W).

    Missing RescaleSlope/Intercept mean 1 and 0. MONOCHROME1 changes only how an image
    is displayed, never the modality LUT, so HU are computed the same way for it.
    """
    uid = ds.get("SOPInstanceUID", "<no SOPInstanceUID>")
    if "PixelData" not in ds:
        raise InvalidInstance(f"instance {uid} has no PixelData")
    if int(ds.get("SamplesPerPixel", 1)) != 1:
        raise InvalidInstance(
            f"instance {uid} has SamplesPerPixel {ds.SamplesPerPixel}; a CT slice needs 1"
        )
    if int(ds.get("NumberOfFrames", 1) or 1) != 1:
        raise InvalidInstance(
            f"instance {uid} has {ds.NumberOfFrames} frames; pass one slice at a time"
        )
    slope, intercept = _rescale(ds, uid)
    _check_native_length(ds, uid)
    try:
        pixels = ds.pixel_array
    except Exception as exc:  # pydicom raises several types for bad pixel data
        raise InvalidInstance(f"instance {uid}: pixel data cannot be decoded: {exc}") from exc
    if pixels.ndim != 2:
        raise InvalidInstance(f"instance {uid}: expected a 2-D slice, got shape {pixels.shape}")
    if pixels.min() == pixels.max():
        raise InvalidInstance(f"instance {uid}: every pixel holds the same value ({pixels.flat[0]}): "
                              "a constant image shows no anatomy")
    pixels, intercept = rsna_fix(
        pixels,
        bits_stored=int(ds.get("BitsStored", 16)),
        pixel_representation=int(ds.get("PixelRepresentation", 0)),
        intercept=intercept,
    )
    return to_hu(pixels, slope, intercept)


def windowed_to_input(channels: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A square windowed image (C, H, W) in [0, 1] → normalised network input (C, size, size).
    The training cache holds such images; DICOM slices reach them through `hu_to_input`."""
    return normalise(resize_bilinear(channels, spec.input_size), spec.mean, spec.std)


def hu_to_input(hu: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """HU slice (H, W) → normalised network input (3, size, size), float32."""
    return windowed_to_input(pad_to_square(window_channels(hu, spec.windows)), spec)


def mask_to_input(mask: np.ndarray, spec: PreprocessSpec) -> np.ndarray:
    """A boolean image (H, W) of a slice → boolean (size, size), padded and resized as
    `hu_to_input` pads and resizes the slice, so that it lines up with the network input."""
    square = pad_to_square(mask[None].astype(np.float32))
    return resize_bilinear(square, spec.input_size)[0] >= 0.5


def dataset_to_input(ds: Dataset, spec: PreprocessSpec) -> np.ndarray:
    """A pydicom CT slice → normalised network input (3, size, size), float32."""
    return hu_to_input(hu_from_dataset(ds), spec)
