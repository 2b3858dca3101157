"""A study's instances as slice records: classic CT slices and Enhanced CT frames alike.

A classic CT Image is one slice. An Enhanced (or Legacy Converted Enhanced) CT Image holds
many, each frame described by its per-frame functional groups with the shared ones as
defaults: position, orientation, pixel spacing, thickness, rescale. Both become the same
`SliceHeader` before series choice, ordering and scope checks, and `read_slice` gives any
of them as a single-slice dataset, so nothing after this module needs to know which form
a scanner sent. Every header value is read through `training.model.attributes`: a value
that is absent, empty or malformed is unknown, never an error.
"""

from __future__ import annotations

import copy
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import pixel_array
from pydicom.uid import ExplicitVRLittleEndian

from training.model import attributes as attr
from training.model.vocabulary import region_of_code

__all__ = ["CT_IMAGE_STORAGE", "ENHANCED_CT_CLASSES", "HEADER_ATTRIBUTES", "CONTRAST_ATTRIBUTES", "SliceHeader", "read_headers", "read_header", "read_slice",
           "could_be_analysed", "contrast_given"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
ENHANCED_CT_CLASSES = (ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE)
ANALYSABLE_CLASSES = (CT_IMAGE_STORAGE, *ENHANCED_CT_CLASSES)


@dataclass(frozen=True)
class SliceHeader:
    """The header values of one slice (a classic instance, or one frame of a multi-frame
    one) that selection, ordering and the scope checks need."""

    path: Path
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    modality: str
    image_type: tuple[str, ...] = ()
    orientation: tuple[float, ...] | None = None
    position: tuple[float, float, float] | None = None
    thickness: float | None = None
    kernel: str = ""
    description: str = ""
    instance_number: int | None = None
    frames: int = 1  # NumberOfFrames of the object the slice comes from
    # What the scope checks (training/model/scope.py) read.
    pixel_spacing: tuple[float, float] | None = None
    body_part: str = ""
    protocol: str = ""
    study_description: str = ""
    contrast: str = ""  # the contrast attributes present, e.g. "ContrastBolusAgent OMNIPAQUE"
    patient_age: str = ""
    birth_date: str = ""
    study_date: str = ""
    anatomic_region: str = ""  # the region the Anatomic Region Sequence codes (vocabulary.Region), if known
    # A frame of an Enhanced CT object: its number (1-based) and its rescale, from the
    # functional groups. None for a classic slice, which carries its own.
    frame: int | None = None
    rescale: tuple[float, float] | None = None

    @property
    def key(self) -> str:
        """Unique within a study: the SOPInstanceUID, with the frame number for a frame."""
        return self.sop_instance_uid if self.frame is None else f"{self.sop_instance_uid}#{self.frame}"


# Every attribute the slice records read (besides the Contrast/Bolus ones below and the
# functional groups of Enhanced CT); tests/test_real_headers.py strips each in turn.
HEADER_ATTRIBUTES = ("SOPInstanceUID", "SeriesInstanceUID", "SOPClassUID", "Modality", "ImageType",
                     "ConvolutionKernel", "SeriesDescription", "InstanceNumber", "NumberOfFrames",
                     "BodyPartExamined", "ProtocolName", "StudyDescription", "PatientAge", "PatientBirthDate",
                     "StudyDate", "AnatomicRegionSequence", "ImageOrientationPatient", "ImagePositionPatient",
                     "SliceThickness", "PixelSpacing")

# Attributes of the Contrast/Bolus module that say IV contrast was given.
CONTRAST_ATTRIBUTES = ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume",
                       "ContrastBolusIngredient", "ContrastBolusStartTime")


def contrast_given(ds: Dataset) -> str:
    """The contrast attributes present (empty when none say contrast was given)."""
    found = [f"{keyword} {attr.text(ds, keyword)}" for keyword in CONTRAST_ATTRIBUTES if attr.text(ds, keyword)]
    if attr.items(ds, "ContrastBolusAgentSequence"):
        found.append("ContrastBolusAgentSequence")
    return "; ".join(found)


def _anatomic_region(ds: Dataset) -> str:
    for item in attr.items(ds, "AnatomicRegionSequence"):
        region = region_of_code(attr.text(item, "CodingSchemeDesignator"), attr.text(item, "CodeValue"))
        if region is not None:
            return str(region)
    return ""


def _base(path: Path, ds: Dataset) -> dict:
    """What every slice of the object shares: identity, descriptions, patient and contrast."""
    return dict(
        path=Path(path), sop_instance_uid=attr.uid(ds, "SOPInstanceUID"),
        series_instance_uid=attr.uid(ds, "SeriesInstanceUID"), sop_class_uid=attr.uid(ds, "SOPClassUID"),
        modality=attr.text(ds, "Modality").upper(), image_type=attr.words(ds, "ImageType"),
        kernel=" ".join(attr.text(ds, "ConvolutionKernel").split("\\")),
        description=attr.text(ds, "SeriesDescription"), instance_number=attr.integer(ds, "InstanceNumber"),
        frames=max(attr.integer(ds, "NumberOfFrames") or 1, 1), body_part=attr.text(ds, "BodyPartExamined"),
        protocol=attr.text(ds, "ProtocolName"), study_description=attr.text(ds, "StudyDescription"),
        contrast=contrast_given(ds), patient_age=attr.text(ds, "PatientAge"),
        birth_date=attr.text(ds, "PatientBirthDate"), study_date=attr.text(ds, "StudyDate"),
        anatomic_region=_anatomic_region(ds),
    )


def _pixel_spacing(ds: Dataset | None) -> tuple[float, float] | None:
    spacing = attr.numbers(ds, "PixelSpacing", 2) if ds is not None else None
    return spacing if spacing is not None and min(spacing) > 0 else None  # type: ignore[return-value]


def _thickness(ds: Dataset | None) -> float | None:
    thickness = attr.number(ds, "SliceThickness") if ds is not None else None
    return thickness if thickness is not None and thickness > 0 else None


def _frame_headers(path: Path, ds: Dataset, base: dict) -> list[SliceHeader]:
    """One header per frame, each from its own functional groups, then the shared ones."""
    shared = attr.items(ds, "SharedFunctionalGroupsSequence")[:1]
    per_frame = attr.items(ds, "PerFrameFunctionalGroupsSequence")
    contrast = base["contrast"] or ("ContrastBolusUsageSequence" if attr.first_item(
        [*per_frame[:1], *shared], "ContrastBolusUsageSequence") is not None else "")
    headers = []
    for number in range(1, base["frames"] + 1):
        groups = [per_frame[number - 1]] if number <= len(per_frame) else []
        groups += shared

        def group(keyword: str) -> Dataset | None:
            return attr.first_item(groups, keyword)

        measures = group("PixelMeasuresSequence")
        transform = group("PixelValueTransformationSequence")
        frame_type = group("CTImageFrameTypeSequence")
        reconstruction = group("CTReconstructionSequence")
        slope = attr.number(transform, "RescaleSlope") if transform is not None else None
        intercept = attr.number(transform, "RescaleIntercept") if transform is not None else None
        plane = group("PlaneOrientationSequence")
        position = group("PlanePositionSequence")
        headers.append(SliceHeader(**{
            **base, "contrast": contrast,
            "image_type": (attr.words(frame_type, "FrameType") if frame_type is not None else ()) or base["image_type"],
            "kernel": base["kernel"] or (attr.text(reconstruction, "ConvolutionKernel").replace("\\", " ")
                                         if reconstruction is not None else ""),
            "orientation": attr.numbers(plane, "ImageOrientationPatient", 6) if plane is not None else None,
            "position": attr.numbers(position, "ImagePositionPatient", 3) if position is not None else None,
            "thickness": _thickness(measures), "pixel_spacing": _pixel_spacing(measures),
            "instance_number": number, "frame": number,
            "rescale": (slope if slope is not None else 1.0, intercept if intercept is not None else 0.0),
        }))
    return headers


def _with_unassigned(ds: Dataset) -> Dataset:
    """A Legacy Converted Enhanced CT image keeps the classic attributes that no functional
    group holds (ConvolutionKernel, BodyPartExamined …) in its Unassigned Shared Converted
    Attributes; the object's own top-level values come first."""
    merged = Dataset()
    for item in attr.items(ds, "SharedFunctionalGroupsSequence")[:1]:
        for unassigned in attr.items(item, "UnassignedSharedConvertedAttributesSequence")[:1]:
            merged.update(unassigned)
    for element in ds:
        if element.keyword not in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
            merged.add(element)
    return merged


def read_headers(path: Path) -> list[SliceHeader]:
    """The slices of a stored instance (pixel data is not loaded): one for a classic CT
    image, one per frame for an Enhanced CT image."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    if attr.uid(ds, "SOPClassUID") in ENHANCED_CT_CLASSES and attr.items(ds, "PerFrameFunctionalGroupsSequence"):
        return _frame_headers(Path(path), ds, _base(Path(path), _with_unassigned(ds)))
    base = _base(Path(path), ds)
    return [SliceHeader(**base, orientation=attr.numbers(ds, "ImageOrientationPatient", 6),
                        position=attr.numbers(ds, "ImagePositionPatient", 3),  # type: ignore[arg-type]
                        thickness=_thickness(ds), pixel_spacing=_pixel_spacing(ds))]


def read_header(path: Path) -> SliceHeader:
    """The header of a stored single-slice instance (the first frame of a multi-frame one)."""
    return read_headers(path)[0]


class _LastObject:
    """The multi-frame object read last: its frames are read one after another, and parsing
    its functional groups again for each would cost the square of its length."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._key: tuple[str, int] | None = None
        self._dataset: Dataset | None = None

    def get(self, path: Path) -> Dataset:
        key = (str(path), os.stat(path).st_mtime_ns)
        with self._lock:
            if key != self._key or self._dataset is None:
                self._dataset, self._key = pydicom.dcmread(path), key
            return self._dataset


_LAST_OBJECT = _LastObject()

# What a frame's single-slice dataset keeps of its object: everything but the frames'
# descriptions and pixels, which it gets for its own frame.
_FRAME_ONLY = ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence", "PixelData", "NumberOfFrames",
               "FloatPixelData", "DoubleFloatPixelData")


def _frame_dataset(header: SliceHeader) -> Dataset:
    source = _LAST_OBJECT.get(header.path)
    pixels = np.ascontiguousarray(pixel_array(source, index=header.frame - 1))  # type: ignore[operator]
    ds = Dataset()
    for element in source:
        if element.keyword not in _FRAME_ONLY:
            ds.add(copy.deepcopy(element))
    slope, intercept = header.rescale or (1.0, 0.0)
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.ImageType = list(header.image_type) or ["ORIGINAL", "PRIMARY", "AXIAL"]
    if header.orientation is not None:
        ds.ImageOrientationPatient = list(header.orientation)
    if header.position is not None:
        ds.ImagePositionPatient = list(header.position)
    if header.pixel_spacing is not None:
        ds.PixelSpacing = list(header.pixel_spacing)
    ds.InstanceNumber = header.frame
    little = pixels.astype(pixels.dtype.newbyteorder("<"))
    ds.BitsAllocated = little.dtype.itemsize * 8
    ds.PixelRepresentation = 1 if little.dtype.kind == "i" else 0
    ds.PixelData = little.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def read_slice(header: SliceHeader) -> Dataset:
    """The slice with its pixels, as a single-slice dataset whichever form it came in."""
    if header.frame is None:
        return pydicom.dcmread(header.path)
    return _frame_dataset(header)


def could_be_analysed(sop_class_uid: str, image_type: tuple[str, ...]) -> bool:
    """Whether an instance could hold slices `choose_head_series` analyses: a CT image,
    classic or enhanced, that is not a localizer. Only such an instance can change a
    finished study's result; anything else (a scout, our own result series sent back)
    would re-analyse the same slices and send a duplicate result."""
    return sop_class_uid in ANALYSABLE_CLASSES and "LOCALIZER" not in image_type
