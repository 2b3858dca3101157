"""Which series of a study is the head CT to analyse, and in which order its slices go.

Pure functions over header values: they can be tested without files and they record why
each series was chosen or passed over, for the triage log.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from pydicom.uid import UID

from training.errors import NoAnalysableSeries
from training.model.slices import (ANALYSABLE_CLASSES, CT_IMAGE_STORAGE, ENHANCED_CT_CLASSES, SliceHeader,
                                   could_be_analysed, read_header, read_headers)
from training.model.vocabulary import kernel_is_sharp, tokens

__all__ = ["SliceHeader", "SeriesChoice", "read_header", "read_headers", "could_be_analysed", "choose_head_series",
           "order_slices", "slice_normal", "CT_IMAGE_STORAGE", "ENHANCED_CT_CLASSES"]

# A slice normal within 30° of the patient's z axis counts as axial (gantry tilt allowed).
AXIAL_MIN_COSINE = float(np.cos(np.radians(30)))
PREFERRED_THICKNESS_MM = (3.0, 5.0)
# Description words of sharp (bone, lung) reconstructions, when the kernel says nothing.
_SHARP_DESCRIPTION_WORDS = {"BONE", "BONES", "LUNG", "LUNGS", "SHARP", "SKULLBASE", "OSSEOUS", "KNOCHEN"}


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
    if first.sop_class_uid not in ANALYSABLE_CLASSES:
        return f"not a CT image ({_sop_class_name(first.sop_class_uid)})"
    if any("LOCALIZER" in s.image_type for s in slices):
        return "a localizer (scout)"
    if any(s.frames != 1 and s.frame is None for s in slices):
        kind = "an Enhanced CT image" if first.sop_class_uid in ENHANCED_CT_CLASSES else "a multi-frame image"
        return f"{kind} without per-frame functional groups"
    if first.orientation is None:
        return "no ImageOrientationPatient"
    if abs(slice_normal(first.orientation)[2]) < AXIAL_MIN_COSINE:
        return "not axial"
    if len(slices) < min_slices:
        return f"{len(slices)} slices, fewer than worker.min_slices = {min_slices}"
    return None


def _sop_class_name(uid: str) -> str:
    """The SOP class as the standard names it; a private or unknown one is not named by its UID."""
    name = UID(uid).name
    return "a private or unknown SOP class" if not name or name == uid else name


def _is_sharp(slices: list[SliceHeader]) -> bool:
    """A bone or lung reconstruction, by its kernel (vendor tables) or its description."""
    first = slices[0]
    return bool(kernel_is_sharp(first.kernel)) or bool(_SHARP_DESCRIPTION_WORDS & set(tokens(first.description)))


def _thickness_ok(slices: list[SliceHeader]) -> bool:
    thickness = slices[0].thickness
    low, high = PREFERRED_THICKNESS_MM
    return thickness is not None and low <= thickness <= high


ScopeJudge = Callable[[list[SliceHeader]], list[str]]  # what a checkpoint's scope says against a series


def _describe(slices: list[SliceHeader]) -> str:
    """A series as people name it: modality, description, slices and thickness."""
    first = slices[0]
    thickness = f", {first.thickness:g} mm" if first.thickness else ""
    return f"{first.modality or '?'} {first.description or '(no description)'!r}, {len(slices)} slices{thickness}"


def choose_head_series(headers: list[SliceHeader], min_slices: int,
                       judge: ScopeJudge | None = None) -> SeriesChoice:
    """The axial CT series to analyse. Prefers, in turn: series the checkpoint's scope
    admits (`judge` gives what the scope says against a series), soft-tissue kernels,
    3-5 mm slices, more slices.

    Raises NoAnalysableSeries listing why every series was passed over.
    """
    by_series: dict[str, list[SliceHeader]] = {}
    for header in headers:
        by_series.setdefault(header.series_instance_uid, []).append(header)
    passed_over: dict[str, str] = {}
    out_of_scope: dict[str, list[str]] = {}
    candidates = []
    for uid, slices in by_series.items():
        problem = _disqualification(slices, min_slices)
        if problem:
            passed_over[uid] = f"{_describe(slices)}: {problem}"
            continue
        out_of_scope[uid] = judge(order_slices(slices)[0]) if judge is not None else []
        candidates.append((not out_of_scope[uid], not _is_sharp(slices), _thickness_ok(slices), len(slices), uid))
    if not candidates:
        details = "; ".join(passed_over.values()) or "no instances"  # each series by what people see of it
        raise NoAnalysableSeries(f"no axial head CT series to analyse: {details}")
    candidates.sort(reverse=True)
    in_scope, soft, thickness_ok, count, uid = candidates[0]
    for other_in_scope, _, _, _, other in candidates[1:]:
        why = ("outside the model's scope: " + "; ".join(out_of_scope[other])) if not other_in_scope \
            else "another qualifying series was preferred"
        passed_over[other] = f"{_describe(by_series[other])}: {why}"
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
