"""Which series of a study is the head CT to analyse, and in which order its slices go.

Pure functions over header values: they can be tested without files and they record why
each series was chosen or passed over, for the triage log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from training.errors import NoAnalysableSeries

__all__ = ["SliceHeader", "SeriesChoice", "read_header", "could_be_analysed", "choose_head_series", "order_slices",
           "slice_normal"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
# A slice normal within 30° of the patient's z axis counts as axial (gantry tilt allowed).
AXIAL_MIN_COSINE = float(np.cos(np.radians(30)))
PREFERRED_THICKNESS_MM = (3.0, 5.0)
# Kernels and descriptions of sharp (bone/lung) reconstructions across vendors.
# Siemens names sharpness by number: H30s is a soft brain kernel, H70h or Hr60 bone.
_SHARP = re.compile(r"BONE|SHARP|LUNG|EDGE|\b[HBJQ]r?(5[5-9]|[6-9]\d)[a-z]?\b", re.IGNORECASE)


@dataclass(frozen=True)
class SliceHeader:
    """The header values of one instance that selection and ordering need."""

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
    frames: int = 1
    # What the scope checks (training/model/scope.py) read.
    pixel_spacing: tuple[float, float] | None = None
    body_part: str = ""
    protocol: str = ""
    study_description: str = ""
    contrast: str = ""  # the contrast attributes present, e.g. "ContrastBolusAgent OMNIPAQUE"
    patient_age: str = ""
    birth_date: str = ""
    study_date: str = ""


def _floats(value: object, count: int) -> tuple[float, ...] | None:
    try:
        numbers = tuple(float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    return numbers if len(numbers) == count and all(np.isfinite(numbers)) else None


# Attributes of the Contrast/Bolus module that say IV contrast was given.
CONTRAST_ATTRIBUTES = ("ContrastBolusAgent", "ContrastBolusRoute", "ContrastBolusVolume",
                       "ContrastBolusIngredient", "ContrastBolusStartTime")


def _contrast(ds: pydicom.Dataset) -> str:
    found = [f"{keyword} {ds.get(keyword)}" for keyword in CONTRAST_ATTRIBUTES if str(ds.get(keyword) or "").strip()]
    if "ContrastBolusAgentSequence" in ds and len(ds.ContrastBolusAgentSequence):
        found.append("ContrastBolusAgentSequence")
    return "; ".join(found)


def read_header(path: Path) -> SliceHeader:
    """Read the header of a stored instance (pixel data is not loaded)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    thickness = ds.get("SliceThickness")
    instance_number = ds.get("InstanceNumber")
    return SliceHeader(
        path=Path(path),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", "")),
        modality=str(ds.get("Modality", "")),
        image_type=tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_floats(ds.get("ImagePositionPatient"), 3),  # type: ignore[arg-type]
        thickness=float(thickness) if thickness not in (None, "") else None,
        kernel=" ".join(str(k) for k in np.atleast_1d(ds.get("ConvolutionKernel") or "")),
        description=str(ds.get("SeriesDescription", "")),
        instance_number=int(instance_number) if instance_number not in (None, "") else None,
        frames=int(ds.get("NumberOfFrames", 1) or 1),
        pixel_spacing=_floats(ds.get("PixelSpacing"), 2),  # type: ignore[arg-type]
        body_part=str(ds.get("BodyPartExamined", "") or ""),
        protocol=str(ds.get("ProtocolName", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
        contrast=_contrast(ds),
        patient_age=str(ds.get("PatientAge", "") or ""),
        birth_date=str(ds.get("PatientBirthDate", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
    )


def could_be_analysed(sop_class_uid: str, image_type: tuple[str, ...]) -> bool:
    """Whether an instance could be one of the slices `choose_head_series` analyses: a CT
    Image Storage object that is not a localizer. Only such an instance can change a
    finished study's result; anything else (an Enhanced CT object, a scout, our own result
    series sent back) would re-analyse the same slices and send a duplicate result."""
    return sop_class_uid == CT_IMAGE_STORAGE and "LOCALIZER" not in image_type


@dataclass(frozen=True)
class SeriesChoice:
    """The chosen series with its slices in order, and why each series was (not) taken."""

    series_instance_uid: str
    slices: list[SliceHeader]
    reason: str
    passed_over: dict[str, str] = field(default_factory=dict)
    ordering: str = "position along the slice normal"


def slice_normal(orientation: tuple[float, ...]) -> np.ndarray:
    """The unit normal of slices with this ImageOrientationPatient, pointing superior."""
    row, column = np.array(orientation[:3]), np.array(orientation[3:])
    normal = np.cross(row, column)
    length = np.linalg.norm(normal)
    normal = normal / length if length > 0 else normal
    return -normal if normal[2] < 0 else normal  # feet-first orientations: row × column points inferior


def _disqualification(slices: list[SliceHeader], min_slices: int) -> str | None:
    first = slices[0]
    if first.modality != "CT":
        return f"modality {first.modality or 'missing'}, not CT"
    if first.sop_class_uid == ENHANCED_CT_IMAGE_STORAGE:
        return "Enhanced CT (multi-frame) is stored but not analysed by this version"
    if first.sop_class_uid != CT_IMAGE_STORAGE:
        return f"SOP class {first.sop_class_uid} is not CT Image Storage"
    if any("LOCALIZER" in s.image_type for s in slices):
        return "a localizer (scout)"
    if any(s.frames != 1 for s in slices):
        return "multi-frame images"
    if first.orientation is None:
        return "no ImageOrientationPatient"
    if abs(slice_normal(first.orientation)[2]) < AXIAL_MIN_COSINE:
        return "not axial"
    if len(slices) < min_slices:
        return f"{len(slices)} slices, fewer than worker.min_slices = {min_slices}"
    return None


def _is_sharp(slices: list[SliceHeader]) -> bool:
    first = slices[0]
    return bool(_SHARP.search(first.kernel) or _SHARP.search(first.description))


def _thickness_ok(slices: list[SliceHeader]) -> bool:
    thickness = slices[0].thickness
    low, high = PREFERRED_THICKNESS_MM
    return thickness is not None and low <= thickness <= high


def choose_head_series(headers: list[SliceHeader], min_slices: int) -> SeriesChoice:
    """The axial CT series to analyse; prefers soft-tissue kernels and 3-5 mm slices.

    Raises NoAnalysableSeries listing why every series was passed over.
    """
    by_series: dict[str, list[SliceHeader]] = {}
    for header in headers:
        by_series.setdefault(header.series_instance_uid, []).append(header)
    passed_over: dict[str, str] = {}
    candidates = []
    for uid, slices in by_series.items():
        problem = _disqualification(slices, min_slices)
        if problem:
            passed_over[uid] = problem
        else:
            candidates.append((not _is_sharp(slices), _thickness_ok(slices), len(slices), uid))
    if not candidates:
        details = "; ".join(f"{uid}: {why}" for uid, why in passed_over.items()) or "no instances"
        raise NoAnalysableSeries(f"no axial head CT series to analyse ({details})")
    candidates.sort(reverse=True)
    soft, thickness_ok, count, uid = candidates[0]
    for _, _, _, other in candidates[1:]:
        passed_over[other] = "another qualifying series was preferred"
    slices = by_series[uid]
    ordered, ordering = order_slices(slices)
    reason = (
        f"axial CT, {count} slices, {'soft-tissue' if soft else 'sharp'} kernel "
        f"{slices[0].kernel or '(none given)'}, {slices[0].thickness or '?'} mm"
        f"{'' if thickness_ok else ' (outside the preferred 3-5 mm)'}"
    )
    return SeriesChoice(uid, ordered, reason, passed_over, ordering)


def order_slices(slices: list[SliceHeader]) -> tuple[list[SliceHeader], str]:
    """Slices from inferior to superior: ImagePositionPatient projected on the slice
    normal (InstanceNumber is not guaranteed); InstanceNumber when positions are missing."""
    first = slices[0]
    if first.orientation is not None and all(s.position is not None for s in slices):
        normal = slice_normal(first.orientation)
        keys = [float(np.dot(normal, s.position)) for s in slices]
        order = sorted(range(len(slices)), key=lambda i: (keys[i], slices[i].instance_number or 0))
        duplicates = len(keys) - len({round(k, 3) for k in keys})
        note = f" ({duplicates} slices repeat another's position; all kept)" if duplicates else ""
        return [slices[i] for i in order], "position along the slice normal" + note
    ordered = sorted(slices, key=lambda s: (s.instance_number is None, s.instance_number or 0))
    return ordered, "InstanceNumber (ImagePositionPatient missing)"
