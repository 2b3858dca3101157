"""What a checkpoint's model was trained on, and whether a series falls inside it.

A model trained on adult non-contrast head CT answers for nothing else with any meaning:
a contrast-enhanced scan, a child's head, a 0.6 mm reconstruction, a partial study or an
abdomen sent by a misrouted auto-forward rule would get a confident verdict that is noise.
`Scope` is the checkpoint's own declaration (written at training time, shown in the
model card and at start-up); the checks here read the chosen series' headers and, so as
not to trust the headers alone, its HU: the middle slices must show a head, and no slice
may show metal inside the skull (checked as the scan reads each slice). Each failed check is a
`Reason` that names what was found and what the checkpoint supports. Pure functions:
the node's analysis stage and `ichnode evaluate` run the same checks.
"""

from __future__ import annotations

import datetime as dt
import enum
import math
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import ndimage

from training.model.series import SliceHeader, slice_normal
from training.model.vocabulary import contrast_words, region_of_body_part, regions_in_text

__all__ = ["NOT_TRIAGED_LABEL", "ReasonCode", "Reason", "Scope", "HuReader", "scope_reasons", "header_reasons",
           "head_image_reason", "intracranial_mask", "metal_depth_mm", "metal_reason", "middle_slices", "age_in_years", "coverage_mm"]


# The verdict of a study outside the scope, as the database, the triage log and the pages name it.
NOT_TRIAGED_LABEL = "NOT TRIAGED"


class ReasonCode(enum.StrEnum):
    """Why a study was not triaged; the codes are part of the triage log and the SR."""

    NO_SERIES = "no_series"  # no axial CT series in the study
    NOT_HEAD = "not_head"
    CONTRAST = "contrast"
    SLICE_THICKNESS = "slice_thickness"
    COVERAGE = "coverage"
    AGE = "age"
    METAL = "metal"  # metal inside the skull: clips, coils, electrodes
    OUT_OF_DISTRIBUTION = "out_of_distribution"  # the images lie outside the training inputs
    ANALYSIS_FAILED = "analysis_failed"  # the analysis itself failed: a failure notice, not a scope finding


@dataclass(frozen=True)
class Reason:
    """One reason a study is outside what the model can answer for."""

    code: ReasonCode
    text: str  # for people: what was found, and what the checkpoint supports

    def as_dict(self) -> dict[str, str]:
        return {"code": str(self.code), "text": self.text}


@dataclass(frozen=True)
class Scope:
    """The inputs a checkpoint supports. The defaults describe adult non-contrast axial
    head CT at 2.5-5 mm covering at least 80 mm; a checkpoint trained on anything else
    declares its own (the training config's [scope] table)."""

    body_parts: tuple[str, ...] = ("HEAD", "BRAIN", "SKULL")  # BodyPartExamined values, when present
    contrast: bool = False  # whether scans after IV contrast are supported
    slice_thickness_mm: tuple[float, float] = (2.5, 5.0)
    min_coverage_mm: float = 80.0  # extent of the series along the slice normal
    min_age_years: float = 18.0  # 0: any age; applied when the age is known
    head_image_check: bool = True  # skull around brain-density tissue in the middle slices
    metal_check: bool = True  # False: scans with metal inside the skull (clips, coils) are supported

    def __post_init__(self) -> None:
        object.__setattr__(self, "body_parts", tuple(str(p).upper() for p in self.body_parts))
        object.__setattr__(self, "slice_thickness_mm", tuple(float(t) for t in self.slice_thickness_mm))
        if not self.body_parts:
            raise ValueError("body_parts must name at least one BodyPartExamined value, e.g. [\"HEAD\"]")
        thickness = self.slice_thickness_mm
        if len(thickness) != 2 or not 0 < thickness[0] <= thickness[1]:
            raise ValueError(f"slice_thickness_mm must be [low, high] with 0 < low ≤ high, "
                             f"got {list(self.slice_thickness_mm)}")
        if not self.min_coverage_mm >= 0:
            raise ValueError(f"min_coverage_mm must be ≥ 0, got {self.min_coverage_mm}")
        if not 0 <= self.min_age_years < 150:
            raise ValueError(f"min_age_years must be in [0, 150), got {self.min_age_years}")

    def describe(self) -> str:
        """One line for start-up, the model page and the model card."""
        low, high = self.slice_thickness_mm
        return (f"{'/'.join(self.body_parts)}; {'with or without' if self.contrast else 'without'} IV contrast; "
                f"slices {low:g}-{high:g} mm; coverage ≥ {self.min_coverage_mm:g} mm; "
                f"age ≥ {self.min_age_years:g} years when known; "
                f"image check of the head {'on' if self.head_image_check else 'off'}; "
                f"metal inside the skull {'not supported' if self.metal_check else 'supported'}")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["body_parts"], data["slice_thickness_mm"] = list(self.body_parts), list(self.slice_thickness_mm)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Scope":
        return cls(**{**data, "body_parts": tuple(data.get("body_parts", cls.body_parts)),
                      "slice_thickness_mm": tuple(data.get("slice_thickness_mm", cls.slice_thickness_mm))})


_AGE = re.compile(r"^(\d{3})([DWMY])$")
_DAYS_PER_UNIT = {"D": 1.0, "W": 7.0, "M": 365.25 / 12, "Y": 365.25}


def middle_slices(slices: list[SliceHeader], count: int = 3) -> list[SliceHeader]:
    """The `count` slices around the middle of an ordered series: the level where any head
    CT shows brain inside the skull."""
    start = max(0, (len(slices) - count) // 2)
    return slices[start:start + count]


def coverage_mm(slices: list[SliceHeader]) -> float | None:
    """Extent of an ordered series along its slice normal, one slice thickness included;
    None when positions are missing."""
    first = slices[0]
    if first.orientation is None or any(s.position is None for s in slices):
        return None
    normal = slice_normal(first.orientation)
    heights = [float(np.dot(normal, s.position)) for s in slices]  # type: ignore[arg-type]
    return max(heights) - min(heights) + (first.thickness or 0.0)


def age_in_years(patient_age: str, birth_date: str, study_date: str) -> float | None:
    """PatientAge (e.g. 045Y, 006M), else StudyDate − PatientBirthDate; None when unknown."""
    match = _AGE.match(patient_age.strip().upper())
    if match:
        return int(match.group(1)) * _DAYS_PER_UNIT[match.group(2)] / 365.25
    try:
        born = dt.datetime.strptime(birth_date.strip()[:8], "%Y%m%d").date()
        seen = dt.datetime.strptime(study_date.strip()[:8], "%Y%m%d").date()
    except ValueError:
        return None
    return (seen - born).days / 365.25 if seen >= born else None


def _supported_regions(scope: Scope) -> set[str]:
    return {str(region_of_body_part(part) or part) for part in scope.body_parts}


def _body_part_reason(first: SliceHeader, scope: Scope) -> Reason | None:
    """BodyPartExamined, the Anatomic Region Sequence and the descriptions, read through the
    vendor vocabularies; a word the tables do not know refuses nothing (the image check of
    the head decides)."""
    supported = _supported_regions(scope)
    part = first.body_part.strip().upper()
    region = region_of_body_part(part) if part else None
    if region is not None and str(region) not in supported:
        return Reason(ReasonCode.NOT_HEAD, f"BodyPartExamined is {part} ({region}); this model supports "
                                           f"{', '.join(scope.body_parts)}")
    if first.anatomic_region and first.anatomic_region not in supported:
        return Reason(ReasonCode.NOT_HEAD, f"the Anatomic Region Sequence codes the {first.anatomic_region}; "
                                           f"this model supports {', '.join(scope.body_parts)}")
    if region is not None or first.anatomic_region:
        return None
    described = " ".join(t for t in (first.description, first.protocol, first.study_description) if t)
    named = {str(r) for r in regions_in_text(described)}
    if named and not named & supported:
        return Reason(ReasonCode.NOT_HEAD, f"the series is described as {described!r} "
                                           f"({', '.join(sorted(named))}), not a head")
    return None


def _contrast_reason(slices: list[SliceHeader], scope: Scope) -> Reason | None:
    if scope.contrast:
        return None
    given = next((s.contrast for s in slices if s.contrast), "")
    if given:
        return Reason(ReasonCode.CONTRAST, f"IV contrast was given ({given}); this model supports only "
                                           "non-contrast scans")
    first = slices[0]
    described = " ".join(t for t in (first.description, first.protocol) if t)
    words = contrast_words(described)
    if words:
        return Reason(ReasonCode.CONTRAST, f"the series is described as {described!r} ({words}): "
                                           "a contrast-enhanced scan; this model supports only non-contrast scans")
    return None


def _thickness_reason(slices: list[SliceHeader], scope: Scope) -> Reason | None:
    low, high = scope.slice_thickness_mm
    thickness = slices[0].thickness
    if thickness is None:
        return None  # the coverage check still bounds the series
    if not low - 0.01 <= thickness <= high + 0.01:
        return Reason(ReasonCode.SLICE_THICKNESS, f"slices are {thickness:g} mm thick; this model supports "
                                                  f"{low:g}-{high:g} mm")
    return None


def _coverage_reason(slices: list[SliceHeader], scope: Scope) -> Reason | None:
    extent = coverage_mm(slices)
    if extent is None:
        extent = len(slices) * (slices[0].thickness or 0.0) or None
    if extent is not None and extent < scope.min_coverage_mm:
        return Reason(ReasonCode.COVERAGE, f"the series covers {extent:.0f} mm; this model needs at least "
                                           f"{scope.min_coverage_mm:g} mm of the head (a partial study could "
                                           "miss a bleed outside it)")
    return None


def _age_reason(first: SliceHeader, scope: Scope) -> Reason | None:
    years = age_in_years(first.patient_age, first.birth_date, first.study_date)
    if scope.min_age_years > 0 and years is not None and years < scope.min_age_years:
        return Reason(ReasonCode.AGE, f"the patient is {years:.1f} years old; this model supports "
                                      f"{scope.min_age_years:g} years and older")
    return None


def header_reasons(slices: list[SliceHeader], scope: Scope) -> list[Reason]:
    """What the headers of an ordered series say against `scope` (empty: nothing)."""
    first = slices[0]
    found = [_body_part_reason(first, scope), _contrast_reason(slices, scope), _thickness_reason(slices, scope),
             _coverage_reason(slices, scope), _age_reason(first, scope)]
    return [reason for reason in found if reason is not None]


# A head at the level of the lateral ventricles: skull (≥ 300 HU) closed around at least
# this much tissue, most of it in the range of brain and CSF.
BONE_HU = 300.0
BRAIN_HU = (-5.0, 90.0)
MIN_INTRACRANIAL_CM2 = 40.0
MIN_BRAIN_SHARE = 0.8


# The intracranial mask keeps every enclosed region at least this large whose median is
# brain density: at the skull base the cranial fossae are separate regions, the sinuses and
# mastoid air cells are not brain.
MIN_MASK_REGION_CM2 = 1.0


def _enclosed_by_bone(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Bone, and the regions it closes around (labelled, and how many), kept two pixels
    off the bone so that a thin gap in the skull does not join the inside to the outside."""
    bone = hu >= BONE_HU
    enclosed = ndimage.binary_fill_holes(bone) & ~ndimage.binary_dilation(bone, iterations=2)
    labels, count = ndimage.label(enclosed)
    return bone, labels, count


def intracranial_mask(hu: np.ndarray, pixel_spacing: tuple[float, float] | None) -> np.ndarray:
    """Where one slice (HU) shows the inside of the skull, as a boolean image: the regions
    bone closes around that hold brain-density tissue, grown back to the inner table. Empty
    where no skull is closed (a skull defect, a slice below the skull base)."""
    bone, labels, count = _enclosed_by_bone(hu)
    if count == 0:
        return np.zeros(hu.shape, dtype=bool)
    index = np.arange(1, count + 1)
    pixel_cm2 = (pixel_spacing[0] * pixel_spacing[1] if pixel_spacing else 0.25) / 100
    sizes = ndimage.sum_labels(np.ones_like(hu), labels, index) * pixel_cm2
    medians = ndimage.median(ndimage.uniform_filter(hu, 5), labels, index)
    kept = index[(sizes >= MIN_MASK_REGION_CM2) & (medians >= BRAIN_HU[0]) & (medians <= BRAIN_HU[1])]
    inside = np.isin(labels, kept)
    return ndimage.binary_dilation(inside, iterations=2) & ~bone & ndimage.binary_fill_holes(bone)


def _is_head_slice(hu: np.ndarray, pixel_spacing: tuple[float, float] | None) -> tuple[bool, str]:
    """Whether one slice shows brain inside a closed skull, and what was measured."""
    _, labels, count = _enclosed_by_bone(hu)
    if count == 0:
        return False, "no tissue enclosed by bone"
    sizes = ndimage.sum_labels(np.ones_like(hu), labels, range(1, count + 1))
    largest = labels == int(np.argmax(sizes)) + 1
    area_mm2 = float(largest.sum()) * (pixel_spacing[0] * pixel_spacing[1] if pixel_spacing else 0.25)
    smooth = ndimage.uniform_filter(hu, 5)  # so that a noisy scan still reads as brain
    brain = float(np.mean((smooth[largest] >= BRAIN_HU[0]) & (smooth[largest] <= BRAIN_HU[1])))
    measured = f"{area_mm2 / 100:.0f} cm² enclosed by bone, {brain:.0%} of it at brain density"
    return area_mm2 >= MIN_INTRACRANIAL_CM2 * 100 and brain >= MIN_BRAIN_SHARE, measured


def head_image_reason(middle: list[tuple[np.ndarray, tuple[float, float] | None]]) -> Reason | None:
    """A Reason when most of the middle slices (HU, PixelSpacing) do not show brain inside
    a closed skull: the images say this is not a head CT, whatever the header says."""
    results = [_is_head_slice(hu, spacing) for hu, spacing in middle]
    heads = sum(ok for ok, _ in results)
    if middle and heads < math.ceil(len(middle) / 2):
        return Reason(ReasonCode.NOT_HEAD, f"the images do not show a head: in {len(middle) - heads} of the "
                                           f"{len(middle)} middle slices no skull encloses brain "
                                           f"({results[len(results) // 2][1]} in the middle one)")
    return None


# Metal inside the skull (aneurysm clips, coils, electrodes): its streaks hide and mimic
# blood, and a model trained on scans without it has never seen them. A 12-bit CT scale
# ends at 3071 HU and bone, petrous bone and tooth enamel included, stays below 3000 HU, so
# a pixel at 3000 HU or more is metal or saturated by it. Only metal this deep inside the
# skull's outline counts: past the scalp (electrodes, earrings), the skull and the teeth.
METAL_HU = 3000.0
MIN_METAL_DEPTH_MM = 15.0
MIN_METAL_MM2 = 2.0  # less is a stray pixel, not an object


def metal_depth_mm(hu: np.ndarray, pixel_spacing: tuple[float, float] | None) -> float | None:
    """How deep inside the skull's outline the deepest metal of one slice lies (mm), or
    None when the slice has none there. Scans without metal cost one maximum."""
    metal = hu >= METAL_HU
    if not metal.any():
        return None
    spacing = pixel_spacing or (0.5, 0.5)
    pixel_mm2 = spacing[0] * spacing[1]
    if metal.sum() * pixel_mm2 < MIN_METAL_MM2:
        return None
    depth = ndimage.distance_transform_edt(ndimage.binary_fill_holes(hu >= BONE_HU), sampling=spacing)
    deep = metal & (depth >= MIN_METAL_DEPTH_MM)
    if deep.sum() * pixel_mm2 < MIN_METAL_MM2:
        return None
    return float(depth[deep].max())


def metal_reason(depths: list[float | None], slices: str = "slices") -> Reason | None:
    """A Reason when any slice (its `metal_depth_mm`) shows metal inside the skull;
    `slices` names which were looked at."""
    found = [d for d in depths if d is not None]
    if not found:
        return None
    return Reason(ReasonCode.METAL, f"metal (≥ {METAL_HU:g} HU) lies up to {max(found):.0f} mm inside the skull "
                                    f"on {len(found)} of {len(depths)} {slices}: clips, coils or other implants, "
                                    "whose streaks this model was not trained on")


HuReader = Callable[[SliceHeader], np.ndarray]  # a slice's HU; raises for a slice that cannot give them


def scope_reasons(slices: list[SliceHeader], scope: Scope, read_hu: HuReader) -> list[Reason]:
    """What `scope` says against an ordered series before the model runs: its headers,
    and (when the scope asks for it) the HU of its middle slices read through `read_hu`;
    slices that cannot be read are left to the analysis, which names them. Metal is
    checked on every slice as the scan reads it (`metal_depth_mm`, `metal_reason`)."""
    reasons = header_reasons(slices, scope)
    if scope.head_image_check:
        middle = []
        for header in middle_slices(slices):
            try:
                middle.append((read_hu(header), header.pixel_spacing))
            except Exception:  # InvalidInstance, or pydicom on a damaged file
                continue
        found = head_image_reason(middle)
        if found is not None and scope.metal_check:  # streaks can hide the brain's density: name their cause
            found = metal_reason([metal_depth_mm(hu, spacing) for hu, spacing in middle], "middle slices") or found
        if found is not None:
            reasons.append(found)
    return reasons
