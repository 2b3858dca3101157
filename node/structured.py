"""Machine-readable results: a TID 1500 Comprehensive 3D SR, as the IHE AI Results profile
asks, and a Key Object Selection document of the key slices (highdicom).

Both reference the key slices of the **original** CT series, so a viewer can jump to them
and a worklist can sort by the coded finding. Where no standard code exists the node uses
its own coding scheme `99ICHNODE` (the `99` prefix marks a private scheme); every code
and its source is listed in docs/results.md.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from node.output import SourceImage
from training.model.inputs import Assessment
from training.model.rule import TriageRule, Verdict
from training.model.scope import Reason, ReasonCode

__all__ = ["ResultContext", "NOT_DETECTED", "NOT_EVALUATED", "NOT_TRIAGED_REASON", "REASON_CODES", "PROCESSING_ALGORITHM",
           "Unanswered", "evidence_for", "build_sr", "build_not_triaged_sr", "build_kos"]

# SNOMED CT 260415000 "Not detected (qualifier value)"; pydicom's dictionary lacks it.
NOT_DETECTED = Code("260415000", "SCT", "Not detected")
# IHE AI Results: Contributing Equipment purpose "Processing Algorithm" (trial code).
PROCESSING_ALGORITHM = Code("Newcode1", "99IHE", "Processing Algorithm")
SCORE_MAX = Code("score-max", "99ICHNODE", "Maximum slice probability of ICH")
SCORE_TOP = Code("score-top3", "99ICHNODE", "Mean of the three highest slice probabilities of ICH")
POSITIVE_SLICES = Code("positive-slices", "99ICHNODE", "Slices above the slice threshold")
ANALYSED_SLICES = Code("analysed-slices", "99ICHNODE", "Slices analysed")
LEFT_OUT_SLICES = Code("left-out-slices", "99ICHNODE", "Slices left out of the analysis")
PROBABILITY = codes.UCUM.NoUnits
SLICES = Code("{slices}", "UCUM", "slices")
# A study outside what the model supports: the finding was not evaluated, and why.
NOT_EVALUATED = codes.SCT.NotEvaluated  # SNOMED CT 373121007
NOT_TRIAGED_REASON = Code("not-triaged-reason", "99ICHNODE", "Reason the study was not triaged")
REASON_CODES = {
    ReasonCode.NO_SERIES: Code("no-series", "99ICHNODE", "No axial head CT series"),
    ReasonCode.NOT_HEAD: Code("not-head", "99ICHNODE", "Not a head CT"),
    ReasonCode.CONTRAST: Code("contrast", "99ICHNODE", "Scan after IV contrast"),
    ReasonCode.SLICE_THICKNESS: Code("slice-thickness", "99ICHNODE", "Slice thickness outside the model's scope"),
    ReasonCode.COVERAGE: Code("coverage", "99ICHNODE", "Too little of the head covered"),
    ReasonCode.AGE: Code("age", "99ICHNODE", "Patient younger than the model supports"),
    ReasonCode.METAL: Code("metal", "99ICHNODE", "Metal inside the skull"),
    ReasonCode.OUT_OF_DISTRIBUTION: Code("out-of-distribution", "99ICHNODE",
                                         "Images outside the model's training inputs"),
    ReasonCode.ANALYSIS_FAILED: Code("analysis-failed", "99ICHNODE", "Analysis failed"),
}
# TID 1501's free-text qualitative evaluation (a TEXT item beside the coded ones).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
OOD_SCORE = Code("ood-score", "99ICHNODE", "Out-of-distribution score of the study")
OOD_LIMIT = Code("ood-limit", "99ICHNODE", "Out-of-distribution score above which the study is not triaged")
OOD_PEAK = Code("ood-peak", "99ICHNODE", "Out-of-distribution score of the study's most unusual slice")
OOD_PEAK_LIMIT = Code("ood-peak-limit", "99ICHNODE",
                      "Most unusual slice's score above which the study is not triaged")


@dataclass(frozen=True)
class ResultContext:
    """Who made the result and with what: the SR's observer, algorithm and equipment."""

    manufacturer: str
    institution_name: str
    device_uid: str  # the node as a device observer
    device_name: str  # its AE title
    architecture: str
    software_version: str
    warnings: list[str]  # what the model's provenance requires every output to say


def evidence_for(reference: Dataset, key_slices: list[SourceImage]) -> list[Dataset]:
    """The instances of the key slices as datasets highdicom can cite, once each (several
    key slices may be frames of one Enhanced CT image): the analysed series' patient, study
    and series context (from `reference`) with each instance's SOP class and UID."""
    evidence: dict[str, Dataset] = {}
    for source in key_slices:
        if source.sop_instance_uid in evidence:
            continue
        ds = copy.deepcopy(reference)
        ds.SOPClassUID, ds.SOPInstanceUID = source.sop_class_uid, source.sop_instance_uid
        if source.frame is not None:
            ds.NumberOfFrames = source.frames
        evidence[source.sop_instance_uid] = ds
    return list(evidence.values())


def _frames_by_instance(key_slices: list[SourceImage]) -> dict[str, list[int]]:
    """The cited frame numbers of each multi-frame instance, in the order cited."""
    frames: dict[str, list[int]] = {}
    for source in key_slices:
        if source.frame is not None:
            frames.setdefault(source.sop_instance_uid, []).append(source.frame)
    return frames


def _source_images(key_slices: list[SourceImage],
                   evidence: list[Dataset]) -> list[hd.sr.SourceImageForMeasurementGroup]:
    frames = _frames_by_instance(key_slices)
    return [hd.sr.SourceImageForMeasurementGroup.from_source_image(
        ds, referenced_frame_numbers=frames.get(ds.SOPInstanceUID)) for ds in evidence]


def _algorithm(rule: TriageRule, parameters: list[str], context: ResultContext) -> hd.sr.AlgorithmIdentification:
    """TID 4019: the algorithm, its version, and the rule's thresholds as parameters; a
    demonstration or untrained model says so in its name."""
    name = " ".join(["ichnode", context.architecture, *(f"[{w}]" for w in context.warnings)])
    rule_parameters = [f"slice_threshold={rule.slice_threshold:g}", f"positive_fraction={rule.positive_fraction:g}",
                       f"min_positive_slices={rule.min_positive_slices}"]
    return hd.sr.AlgorithmIdentification(name=name, version=context.software_version,
                                         parameters=[*rule_parameters, *parameters], manufacturer=context.manufacturer)


def _count(name: Code, value: int) -> hd.sr.Measurement:
    """A slice count written as a whole number: highdicom formats every Numeric Value (DS)
    as a float, so a count of 3 would read "3.0"."""
    measurement = hd.sr.Measurement(name=name, value=int(value), unit=SLICES)
    measurement[0].MeasuredValueSequence[0].NumericValue = str(int(value))
    return measurement


def _measurements(verdict: Verdict, left_out: int) -> list[hd.sr.Measurement]:
    scores = [(SCORE_MAX, verdict.study_score), (SCORE_TOP, verdict.top_k_score)]
    counts = [(POSITIVE_SLICES, verdict.positive_slices), (ANALYSED_SLICES, verdict.total_slices),
              (LEFT_OUT_SLICES, left_out)]
    return ([hd.sr.Measurement(name=name, value=round(float(value), 4), unit=PROBABILITY) for name, value in scores]
            + [_count(name, value) for name, value in counts])


def _reason_items(reasons: list[Reason]) -> list[hd.sr.ContentItem]:
    """Each kind of reason once, coded, with what was found in words after it (two checks
    may find the same kind: BodyPartExamined and the images both saying "not a head")."""
    texts: dict[ReasonCode, list[str]] = {}
    for reason in reasons:
        if reason.text not in texts.setdefault(reason.code, []):
            texts[reason.code].append(reason.text)
    items: list[hd.sr.ContentItem] = []
    for code, found in texts.items():
        meaning = REASON_CODES[code]
        items.extend(hd.sr.QualitativeEvaluation(name=NOT_TRIAGED_REASON, value=meaning))  # one CODE item
        words = f"{meaning.meaning}: {'; '.join(found)}"
        items.append(hd.sr.TextContentItem(name=QUALITATIVE_EVALUATIONS, value=words,
                                           relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
    return items


def _equipment(context: ResultContext) -> hd.ContributingEquipment:
    """Contributing Equipment naming the node, with the IHE AI Results purpose "Processing
    Algorithm" (highdicom accepts only the purposes of DICOM CID 7005, so it is set after)."""
    equipment = hd.ContributingEquipment(
        manufacturer=context.manufacturer, purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=f"ichnode {context.architecture}"[:64], software_versions=context.software_version,
        institution_name=context.institution_name or None,
    )
    equipment.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept.from_code(PROCESSING_ALGORITHM)]
    return equipment


def _observer(context: ResultContext) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=context.device_uid, name=context.device_name, manufacturer_name=context.manufacturer,
            model_name=f"ichnode {context.architecture}"[:64]),
    )


@dataclass(frozen=True)
class Unanswered:
    """Why the model gave no verdict, with the out-of-distribution score when one was computed."""

    reasons: list[Reason]
    rule: TriageRule  # the rule that would have applied
    inputs: Assessment | None = None  # the out-of-distribution scores, when the model ran


def _report(reference: Dataset, key_slices: list[SourceImage], context: ResultContext, *, value: Code,
            measurements: list[hd.sr.Measurement], reasons: list[Reason], algorithm: hd.sr.AlgorithmIdentification,
            series_number: int, series_description: str) -> hd.sr.Comprehensive3DSR:
    """TID 1500 with one measurement group for the study: the ICH finding as `value`."""
    evidence = evidence_for(reference, key_slices)
    evaluations = [hd.sr.QualitativeEvaluation(name=codes.SCT.IntracranialHemorrhage, value=value)]
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="ICH triage of the study"),
        finding_type=codes.SCT.IntracranialHemorrhage,
        finding_sites=[hd.sr.FindingSite(anatomic_location=codes.SCT.Brain)],
        algorithm_id=algorithm,
        qualitative_evaluations=evaluations,
        measurements=measurements or None,
        source_images=_source_images(key_slices, evidence) or None,
    )
    # Beside the coded finding, before the source images (highdicom takes only coded evaluations).
    content = group[0].ContentSequence
    at = next((i for i, item in enumerate(content) if item.ValueType == "IMAGE"), len(content))
    for offset, item in enumerate(_reason_items(reasons)):
        content.insert(at + offset, item)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_observer(context)),
        procedure_reported=codes.SCT.ComputedTomographyOfHead,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence or [reference], content=report[0], series_instance_uid=generate_uid(),
        series_number=series_number, sop_instance_uid=generate_uid(), instance_number=1,
        manufacturer=context.manufacturer, institution_name=context.institution_name or None, is_complete=True,
        is_final=False, is_verified=False, contributing_equipment=[_equipment(context)],
    )
    sr.SeriesDescription = series_description[:64]
    return sr


def build_sr(reference: Dataset, key_slices: list[SourceImage], verdict: Verdict, context: ResultContext, *,
             series_number: int, series_description: str, left_out: int = 0) -> hd.sr.Comprehensive3DSR:
    """The IHE AI Results SR of a verdict: the coded finding, the scores, the slices left
    out of the analysis (the verdict did not see them), the key slices."""
    return _report(reference, key_slices, context, value=codes.SCT.Suspected if verdict.positive else NOT_DETECTED,
                   measurements=_measurements(verdict, left_out), reasons=[],
                   algorithm=_algorithm(verdict.rule, [f"required_slices={verdict.required_slices}"], context),
                   series_number=series_number, series_description=series_description)


def build_not_triaged_sr(reference: Dataset, sources: list[SourceImage], unanswered: Unanswered,
                         context: ResultContext, *, series_number: int,
                         series_description: str) -> hd.sr.Comprehensive3DSR:
    """The SR of a study the model did not answer for: the finding *not evaluated*, each
    reason coded, the out-of-distribution score and its limit when computed; no scores of
    ICH, which would mean nothing."""
    found = unanswered.inputs
    measurements = [] if found is None else [
        hd.sr.Measurement(name=name, value=round(float(value), 4), unit=PROBABILITY)
        for name, value in ((OOD_SCORE, found.score), (OOD_LIMIT, found.limit), (OOD_PEAK, found.peak),
                            (OOD_PEAK_LIMIT, found.peak_limit))]
    return _report(reference, sources, context, value=NOT_EVALUATED, measurements=measurements,
                   reasons=unanswered.reasons, algorithm=_algorithm(unanswered.rule, ["abstain=true"], context),
                   series_number=series_number, series_description=series_description)


def build_kos(reference: Dataset, key_slices: list[SourceImage], context: ResultContext, *, series_number: int,
              description: str) -> hd.ko.KeyObjectSelectionDocument:
    """A Key Object Selection document (TID 2010, "Of Interest") of the key slices; a key
    slice that is a frame of an Enhanced CT image is cited with its frame number. Its key
    object description is the series description and the model's whole warning."""
    evidence = evidence_for(reference, key_slices)
    content = hd.ko.KeyObjectSelection(
        document_title=codes.DCM.OfInterest, referenced_objects=evidence,
        observer_device_context=_observer(context), description=". ".join([description, *context.warnings])[:1024],
    )
    _cite_frames(content, _frames_by_instance(key_slices))
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=evidence, content=content, series_instance_uid=generate_uid(), series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=context.manufacturer,
        institution_name=context.institution_name or None, contributing_equipment=[_equipment(context)],
    )
    kos.SeriesDescription = description[:64]
    return kos


def _cite_frames(content: hd.ko.KeyObjectSelection, frames: dict[str, list[int]]) -> None:
    """highdicom cites whole instances; add Referenced Frame Number to the IMAGE items of
    multi-frame ones (PS3.3 C.17.3.3, Image Reference Macro)."""
    for item in content[0].ContentSequence:
        if item.ValueType != "IMAGE":
            continue
        referenced = item.ReferencedSOPSequence[0]
        numbers = frames.get(referenced.ReferencedSOPInstanceUID)
        if numbers:
            referenced.ReferencedFrameNumber = numbers if len(numbers) > 1 else numbers[0]
