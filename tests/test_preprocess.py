"""Preprocessing values on small hand-made arrays and on real DICOM files."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian

from node.errors import InvalidInstance
from training.model.preprocess import (
    PAPER_WINDOWS,
    square_pixels,
    PreprocessSpec,
    Window,
    apply_window,
    dataset_to_input,
    hu_from_dataset,
    normalise,
    pad_to_square,
    resize_bilinear,
    rsna_fix,
    to_hu,
    window_channels,
)


def test_windows_are_the_papers_in_channel_order() -> None:
    assert [(w.name, w.low, w.high) for w in PAPER_WINDOWS] == [
        ("brain", 0, 80), ("subdural", -20, 180), ("soft_tissue", -150, 230)
    ]


def test_window_edges_clip_and_scale() -> None:
    brain = PAPER_WINDOWS[0]
    hu = np.array([-1000, -1, 0, 40, 80, 81, 3000], dtype=np.float32)
    assert apply_window(hu, brain).tolist() == [0, 0, 0, 0.5, 1, 1, 1]
    channels = window_channels(np.array([[-20.0, 180.0]], dtype=np.float32), PAPER_WINDOWS)
    assert channels.shape == (3, 1, 2)
    np.testing.assert_allclose(channels[1], [[0.0, 1.0]])
    np.testing.assert_allclose(channels[2], [[130 / 380, 330 / 380]], rtol=1e-6)


def test_window_must_be_ordered() -> None:
    with pytest.raises(ValueError, match="window 'bad' needs high > low"):
        Window("bad", 10, 10)


def test_rsna_fix_unwraps_shifted_unsigned_12_bit_pixels() -> None:
    pixels = np.array([0, 24, 3096, 4095], dtype=np.uint16)
    fixed, intercept = rsna_fix(pixels, bits_stored=12, pixel_representation=0, intercept=-0.0)
    assert intercept == -1000
    assert fixed.tolist() == [1000, 1024, 0, 999]
    # Files without the quirk are left alone.
    same, same_intercept = rsna_fix(pixels, bits_stored=12, pixel_representation=0, intercept=-1024)
    assert same is pixels and same_intercept == -1024
    same, _ = rsna_fix(pixels, bits_stored=16, pixel_representation=1, intercept=0)
    assert same is pixels


def test_to_hu_applies_slope_and_intercept() -> None:
    np.testing.assert_allclose(to_hu(np.array([0, 1024, 2000]), 0.5, -1024), [-1024, -512, -24])


def test_pad_and_resize() -> None:
    image = np.ones((3, 4, 8), dtype=np.float32)
    square = pad_to_square(image)
    assert square.shape == (3, 8, 8)
    assert square[:, 2:6].min() == 1 and square[:, :2].max() == 0 and square[:, 6:].max() == 0
    assert pad_to_square(np.zeros((1, 5, 5))).shape == (1, 5, 5)


@pytest.mark.parametrize("src, dst", [(128, 512), (600, 512), (37, 224)])
def test_resize_matches_opencv_linear(src: int, dst: int) -> None:
    rng = np.random.default_rng(0)
    image = rng.random((3, src, src), dtype=np.float32)
    ours = resize_bilinear(image, dst)
    theirs = np.stack([cv2.resize(c, (dst, dst), interpolation=cv2.INTER_LINEAR) for c in image])
    assert ours.shape == (3, dst, dst)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)


def test_normalise_maps_unit_interval_to_plus_minus_one() -> None:
    np.testing.assert_allclose(normalise(np.array([0.0, 0.5, 1.0]), 0.5, 0.5), [-1, 0, 1])


def _ct(pixels: np.ndarray, **attributes) -> Dataset:
    """A minimal in-memory CT slice."""
    ds = Dataset()
    ds.file_meta = Dataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPInstanceUID = "1.2.3.4"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = int(pixels.dtype == np.int16)
    ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_signed_and_unsigned_pixels_give_the_same_hu() -> None:
    hu = np.array([[-1000, 0], [40, 1500]])
    signed = _ct((hu).astype(np.int16), RescaleSlope=1, RescaleIntercept=0)
    unsigned = _ct((hu + 1024).astype(np.uint16), RescaleSlope=1, RescaleIntercept=-1024)
    np.testing.assert_array_equal(hu_from_dataset(signed), hu)
    np.testing.assert_array_equal(hu_from_dataset(unsigned), hu)


def test_rsna_quirk_is_fixed_from_the_dataset() -> None:
    # 12-bit unsigned, intercept 0, values shifted by −1000 and wrapped at 4096.
    ds = _ct(np.array([[3096, 1040]], dtype=np.uint16), RescaleSlope=1, RescaleIntercept=0,
             BitsStored=12, HighBit=11)
    np.testing.assert_array_equal(hu_from_dataset(ds), [[-1000, 1040]])


def test_missing_slope_and_intercept_mean_identity() -> None:
    np.testing.assert_array_equal(hu_from_dataset(_ct(np.array([[-5, 70]], dtype=np.int16))), [[-5, 70]])


def test_monochrome1_changes_display_not_hu() -> None:
    pixels = np.array([[0, 1064]], dtype=np.uint16)
    mono2 = _ct(pixels, RescaleSlope=1, RescaleIntercept=-1024)
    mono1 = _ct(pixels, RescaleSlope=1, RescaleIntercept=-1024, PhotometricInterpretation="MONOCHROME1")
    np.testing.assert_array_equal(hu_from_dataset(mono1), hu_from_dataset(mono2))
    np.testing.assert_array_equal(hu_from_dataset(mono1), [[-1024, 40]])


def test_multi_valued_window_and_rescale_attributes_are_accepted() -> None:
    pixels = np.zeros((64, 64), dtype=np.int16) + 40
    pixels[0, 0] = -1000  # a corner of air: a constant image is refused
    ds = _ct(pixels, RescaleSlope=1, RescaleIntercept=0, WindowCenter=["40", "700"], WindowWidth=["80", "3000"])
    x = dataset_to_input(ds, PreprocessSpec(input_size=224))
    assert x.shape == (3, 224, 224)
    np.testing.assert_allclose(x[0, 100:, 100:], 0.0, atol=1e-6)  # 40 HU is the brain window's middle


def test_non_square_and_small_images_reach_input_size() -> None:
    pixels = np.full((60, 100), 80, dtype=np.int16)
    pixels[0, 0] = -1000  # a corner of air: a constant image is refused
    ds = _ct(pixels)
    x = dataset_to_input(ds, PreprocessSpec(input_size=512))
    assert x.shape == (3, 512, 512) and x.dtype == np.float32
    assert x[0, 256, 256] == pytest.approx(1.0)  # 80 HU: brain window top → +1
    assert x[0, 5, 256] == pytest.approx(-1.0)  # padding is air → −1


def test_real_ct_file_from_pydicom() -> None:
    ds = dcmread(get_testdata_file("CT_small.dcm"))
    hu = hu_from_dataset(ds)
    assert hu.shape == (128, 128)
    assert -1100 < hu.min() and hu.max() < 3100
    x = dataset_to_input(ds, PreprocessSpec(input_size=512))
    assert x.shape == (3, 512, 512) and -1 <= x.min() and x.max() <= 1


def test_jpeg2000_ct_decodes() -> None:
    ds = dcmread(get_testdata_file("693_J2KI.dcm"))
    assert dataset_to_input(ds, PreprocessSpec(input_size=512)).shape == (3, 512, 512)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda ds: delattr(ds, "PixelData"), "no PixelData"),
        (lambda ds: setattr(ds, "SamplesPerPixel", 3), "SamplesPerPixel 3"),
        (lambda ds: setattr(ds, "NumberOfFrames", 4), "4 frames"),
        (lambda ds: setattr(ds, "PixelData", b"\x00" * 10), "PixelData holds 10 bytes, but Rows 8 × Columns 8 "
                                                             "× BitsAllocated 16 / 8 = 128"),
        (lambda ds: setattr(ds, "BitsAllocated", 8), "PixelData holds 128 bytes, .* BitsAllocated 8 / 8 = 64"),
        (lambda ds: setattr(ds, "BitsAllocated", 12), "BitsAllocated 12 is not 8, 16 or 32"),
        (lambda ds: setattr(ds, "RescaleSlope", 0), "RescaleSlope 0 cannot map pixels to HU"),
        (lambda ds: setattr(ds, "RescaleSlope", "NaN"), "RescaleSlope nan cannot map pixels to HU"),
        (lambda ds: setattr(ds, "RescaleIntercept", "inf"), "RescaleIntercept inf is not finite"),
        (lambda ds: setattr(ds, "PixelData", np.full((8, 8), 7, dtype=np.int16).tobytes()),
         r"every pixel holds the same value \(7\)"),
    ],
)
@pytest.mark.filterwarnings("ignore:Invalid value for VR DS")  # NaN and inf, on purpose
def test_unusable_slices_raise_invalid_instance(change, message: str) -> None:
    """Each attribute that would give wrong HU is named: nothing unreadable becomes a verdict."""
    ds = _ct(np.arange(64, dtype=np.int16).reshape(8, 8))
    change(ds)
    with pytest.raises(InvalidInstance, match=message):
        hu_from_dataset(ds)


def test_non_square_pixels_are_resampled_to_square_at_the_finer_spacing() -> None:
    hu = np.zeros((100, 200), dtype=np.float32)
    hu[40:60, 90:110] = 80.0  # 20 × 20 pixels: 20 mm tall, 10 mm wide at (1.0, 0.5) mm
    square, spacing = square_pixels(hu, (1.0, 0.5))
    assert square.shape == (200, 200) and spacing == (0.5, 0.5)
    rows, columns = np.nonzero(square > 40)
    assert 38 <= rows.max() - rows.min() + 1 <= 42 and 18 <= columns.max() - columns.min() + 1 <= 22  # 20 × 10 mm
    same, kept = square_pixels(hu, (0.5, 0.5))
    assert same is hu and kept == (0.5, 0.5)
    assert square_pixels(hu, None)[0] is hu
