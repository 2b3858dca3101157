"""The result series: DICOM Secondary Capture images (highdicom) in the source study.

Patient and study modules are copied from the analysed series; the series is new
(DERIVED\\SECONDARY), its SeriesDescription and every ImageComments carry the verdict and
the priority flag, so the flag is visible in any PACS worklist or viewer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from node.config import KosFor, ResultKind
from training.model.checkpoint import Provenance
from training.model.rule import Verdict
from training.model.scope import NOT_TRIAGED_LABEL
from training.model.series import SliceHeader

__all__ = ["ResultKind", "KosFor", "ResultTexts", "SourceImage", "model_warnings", "result_texts",
           "not_triaged_texts", "build_result_series", "encode", "source_image"]

DESCRIPTION_PREFIX = "AI ICH TRIAGE"  # the verdict line burned into the pictures and written in comments
# SeriesDescription (64 characters at most) leads with the verdict, as a series list shows
# it: "AI ICH: <verdict>", then which object set, then what the model is.
SERIES_PREFIX = "AI ICH"
SERIES_KINDS = {"sc": "", "sr": "report", "kos": "slices"}
FAILED_LABEL = "analysis failed"  # a failure notice: NOT TRIAGED because the analysis failed
DEMO_WARNING = "DEMO MODEL - SYNTHETIC DATA - NOT FOR CLINICAL USE"
UNTRAINED_WARNING = "UNTRAINED MODEL (RANDOM WEIGHTS) - RESULTS ARE MEANINGLESS"
# The model's warning as short as a series description leaves room for.
DEMO_TAG = "DEMO, NOT CLINICAL"
UNTRAINED_TAG = "UNTRAINED MODEL"


@dataclass(frozen=True)
class ResultTexts:
    """The words that go with a verdict: descriptions, comments and burned-in warnings."""

    descriptions: dict[ResultKind, str]  # SeriesDescription of each object set
    verdict_line: str
    rule_line: str
    image_comments: str
    warnings: list[str]
    derivation: str = "Grad-CAM and P(ICH) of an ICH classifier"  # the pictures' DerivationDescription

    @property
    def series_description(self) -> str:
        """The Secondary Capture series' description."""
        return self.descriptions[ResultKind.SC]


@dataclass(frozen=True)
class SourceImage:
    """The CT slice a result image shows, for its Source Image Sequence: an instance, or
    one frame of a multi-frame instance."""

    sop_class_uid: str
    sop_instance_uid: str
    frame: int | None = None  # 1-based, for a frame of an Enhanced CT image
    frames: int = 1  # NumberOfFrames of the instance


def source_image(header: SliceHeader) -> SourceImage:
    """The slice `header` describes, as results cite it."""
    return SourceImage(header.sop_class_uid, header.sop_instance_uid, header.frame, header.frames)


def model_warnings(provenance: Provenance) -> list[str]:
    """What every output of this model must say about the model itself (from its provenance)."""
    if provenance.synthetic:
        return [DEMO_WARNING]
    if provenance.untrained:
        return [UNTRAINED_WARNING]
    return []


def _descriptions(label: str, provenance: Provenance) -> dict[ResultKind, str]:
    """Each object set's SeriesDescription: the verdict first, in every mode, so a worklist
    and a series list show the flag; a demonstration or untrained model says so after it
    (its whole warning is on every picture and in the SR)."""
    tag = DEMO_TAG if provenance.synthetic else UNTRAINED_TAG if provenance.untrained else ""
    descriptions = {}
    for kind in ResultKind:
        words = [f"{SERIES_PREFIX}: {label}", SERIES_KINDS[kind], f"({tag})" if tag else ""]
        descriptions[kind] = " ".join(w for w in words if w)
    return descriptions


def _model_line(provenance: Provenance, architecture: str) -> str:
    return f"Model {architecture}, trained on: {provenance.training_data} ({provenance.description})."


def result_texts(verdict: Verdict, provenance: Provenance, architecture: str, *,
                 unusable_slices: int = 0) -> ResultTexts:
    """The verdict's words. Slices left out as unreadable are counted, so a reader knows
    the verdict did not see them."""
    warnings = model_warnings(provenance)
    verdict_line = f"{DESCRIPTION_PREFIX}: {verdict.label}"
    rule_line = (
        f"{verdict.positive_slices} of {verdict.total_slices} slices with P(ICH) > "
        f"{verdict.rule.slice_threshold:g} (positive when >= {verdict.required_slices}); "
        f"max P(ICH) {verdict.study_score:.3f}"
    )
    left_out = ([f"{unusable_slices} unreadable slices of the series were left out of the analysis."]
                if unusable_slices else [])
    comments = " ".join([f"{verdict_line}.", f"{rule_line}.", *left_out, _model_line(provenance, architecture),
                         "NOT FOR DIAGNOSTIC USE.", *warnings])
    return ResultTexts(_descriptions(verdict.label, provenance), verdict_line, rule_line, comments, warnings)


def not_triaged_texts(reasons: list[str], provenance: Provenance, architecture: str, *,
                      failed: bool = False) -> ResultTexts:
    """The words of a study the model did not answer for: NOT TRIAGED and why, never a
    verdict (it is neither flagged nor "not detected"). `failed`: the analysis itself
    failed, so a radiologist knows triage did not run."""
    warnings = model_warnings(provenance)
    verdict_line = f"{DESCRIPTION_PREFIX}: {NOT_TRIAGED_LABEL}"
    why = "; ".join(reasons)
    if failed:
        opening = (f"{verdict_line}: the analysis failed, so this study has no verdict (neither flagged nor "
                   "cleared); the node's administrator has been told.")
        derivation = "Failure notice of an ICH classifier: analysis failed, no verdict"
    else:
        opening = (f"{verdict_line}: input outside what this model was trained on, so it gives no verdict "
                   "(neither flagged nor cleared).")
        derivation = "Scope and input checks of an ICH classifier: not triaged, no verdict"
    comments = " ".join([opening, f"Why: {why}.", _model_line(provenance, architecture), "NOT FOR DIAGNOSTIC USE.",
                         *warnings])
    label = f"{NOT_TRIAGED_LABEL}, {FAILED_LABEL}" if failed else NOT_TRIAGED_LABEL
    return ResultTexts(_descriptions(label, provenance), verdict_line, f"not triaged: {why}", comments,
                       warnings, derivation)


def build_result_series(
    reference: Dataset,
    images: list[np.ndarray],
    *,
    texts: ResultTexts,
    series_number: int,
    manufacturer: str,
    institution_name: str,
    software_version: str,
    sources: list[SourceImage | None],
) -> tuple[str, list[hd.sc.SCImage]]:
    """One SC image per RGB array; `sources[i]` is the CT slice image i shows, if any."""
    if len(images) != len(sources):
        raise ValueError(f"{len(images)} images but {len(sources)} source entries")
    series_uid = generate_uid()
    result = []
    for number, (pixels, source) in enumerate(zip(images, sources), start=1):
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=reference,
            pixel_array=pixels,
            photometric_interpretation="RGB",
            bits_allocated=8,
            coordinate_system="PATIENT",
            patient_orientation=("L", "P"),
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=generate_uid(),
            instance_number=number,
            manufacturer=manufacturer,
            series_description=texts.series_description,
            institution_name=institution_name or None,
            software_versions=software_version,
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        # General Series: an unpaired body part, so no Laterality is needed (dciodvfy).
        sc.BodyPartExamined = "HEAD"
        sc.ImageComments = texts.image_comments
        sc.BurnedInAnnotation = "YES"
        sc.DerivationDescription = texts.derivation[:1024]
        if source is not None:
            item = Dataset()
            item.ReferencedSOPClassUID = source.sop_class_uid
            item.ReferencedSOPInstanceUID = source.sop_instance_uid
            if source.frame is not None:
                item.ReferencedFrameNumber = source.frame
            sc.SourceImageSequence = [item]
        result.append(sc)
    return series_uid, result


def encode(ds: Dataset) -> bytes:
    """The object as a DICOM file (preamble, file meta, dataset)."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
