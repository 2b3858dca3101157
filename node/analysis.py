"""Analysis, one pure stage: a study's slice headers in, verdict and result datasets out.

`analyse` reads slices only through the `read` function it is given (the worker's reads
the store; a test's may read memory) and writes nothing: the worker loads the headers,
calls it, writes the result files and records the outcome. Slices stream through the
model one batch at a time; for the most suspicious slices so far it keeps only what the
pictures and Grad-CAM need (the network input, the HU its intracranial mask is found
on, and the features the inference pass returned), so memory does not grow with the length of the series and Grad-CAM
differentiates only the network above its layer.

A study the model cannot answer for is *not triaged*: before the model runs, when the
chosen series is outside the checkpoint's scope (training/model/scope.py) or the study
has no axial CT series at all; while it runs, when a slice shows metal inside the skull
(checked on the HU each slice's input is made from); after it, when its slices lie
outside the checkpoint's training inputs (training/model/inputs.py). Its result says NOT TRIAGED and why, and is
never flagged or "not detected" (with `settings.abstain` false, in a silent trial, the
verdict is given and the findings only recorded).
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
from pydicom.dataset import Dataset

from node.output import (KosFor, ResultKind, ResultTexts, SourceImage, build_result_series, not_triaged_texts,
                         result_texts, source_image)
from node.reference import result_reference
from node.render import key_slice_image, not_triaged_image, summary_image
from node.structured import ResultContext, Unanswered, build_kos, build_not_triaged_sr, build_sr
from storage.errors import InvalidInstance
from training.errors import NoAnalysableSeries
from training.inference.gradcam import Features
from training.inference.predictor import Predictor
from training.model.inputs import Assessment
from training.model.preprocess import hu_from_dataset, mask_to_input, square_pixels
from training.model.rule import POSITIVE_LABEL, TriageRule, Verdict, key_slice_indices
from training.model.scope import (NOT_TRIAGED_LABEL, Reason, ReasonCode, header_reasons, intracranial_mask,
                                  metal_depth_mm, metal_reason, middle_slices, scope_reasons)
from training.model.series import SeriesChoice, SliceHeader, choose_head_series

__all__ = ["SERIES_PER_ANALYSIS", "AnalysisSettings", "AnalysisResult", "SliceReader", "analyse", "failure_notice"]

SliceReader = Callable[[SliceHeader], Dataset]
# An analysis's series numbers: SC, SR and KOS follow each other; the next analysis of the
# study starts SERIES_PER_ANALYSIS higher, so the newest result has the highest numbers.
SERIES_OFFSETS = {ResultKind.SC: 0, ResultKind.SR: 1, ResultKind.KOS: 2}
SERIES_PER_ANALYSIS = len(SERIES_OFFSETS)


@dataclass(frozen=True)
class AnalysisSettings:
    """What the node's config says about analysing one study."""

    rule: TriageRule
    min_slices: int  # fewest usable slices a series needs
    max_unusable_fraction: float  # more unreadable slices than this fails the study
    key_slices: int
    aug_smooth: bool
    objects: tuple[ResultKind, ...]  # which object sets to build, in this order
    manufacturer: str
    institution_name: str
    device_uid: str  # the node as the SR's device observer
    device_name: str
    abstain: bool = True  # a study outside the scope or the training inputs gets NOT TRIAGED
    kos_for: KosFor = KosFor.FLAGGED  # which triaged studies get a Key Object Selection (when objects has it)


@dataclass(frozen=True)
class AnalysisResult:
    choice: SeriesChoice | None  # None: the study has no series to analyse
    verdict: Verdict | None  # None: the model did not run (outside the scope)
    probabilities: np.ndarray  # P(ICH) of each usable slice, inferior to superior (empty when not run)
    key_slices: list[int]  # indices into `probabilities`, most suspicious first
    skipped_slices: dict[str, str]  # SOPInstanceUID → why it was left out
    texts: ResultTexts
    objects: dict[ResultKind, list[Dataset]]  # each object set (its own series) in settings' order
    timings: dict[str, float] = field(default_factory=dict)
    reasons: tuple[Reason, ...] = ()  # what the scope and input checks found against the study
    inputs: Assessment | None = None  # the out-of-distribution score, when the checkpoint has a profile
    triaged: bool = True  # False: NOT TRIAGED (reasons found and settings.abstain)

    @property
    def positive(self) -> bool:
        """Flagged: only a triaged study with a positive verdict."""
        return self.triaged and self.verdict is not None and self.verdict.positive

    @property
    def label(self) -> str:
        """The verdict as the database and the pages name it."""
        if not self.triaged or self.verdict is None:
            return NOT_TRIAGED_LABEL
        return POSITIVE_LABEL if self.positive else self.verdict.label

    @property
    def series_instance_uid(self) -> str:
        """The first object set's series: it names the result (its folder, the study's record)."""
        return next(iter(self.objects.values()))[0].SeriesInstanceUID

    @property
    def datasets(self) -> list[Dataset]:
        return [ds for datasets in self.objects.values() for ds in datasets]


class _Stopwatch:
    """Seconds per stage; stages timed in pieces add up."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.timings[stage] = round(self.timings.get(stage, 0.0) + seconds, 3)

    def since(self, stage: str, started: float) -> float:
        now = time.perf_counter()
        self.add(stage, now - started)
        return now


@dataclass
class _Scan:
    """What streaming the series through the model leaves behind."""

    probabilities: list[float] = field(default_factory=list)
    headers: list[SliceHeader] = field(default_factory=list)  # of the usable slices
    skipped: dict[str, str] = field(default_factory=dict)
    reference: Dataset | None = None  # first usable slice without its pixels: study context
    # The most suspicious slices so far, (P(ICH), -index), and what each needs later: its
    # network input and HU with pixel spacing (for its picture and intracranial mask) and
    # the features Grad-CAM starts from.
    best: list[tuple[float, int]] = field(default_factory=list)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    hu: dict[int, tuple[np.ndarray, tuple[float, float] | None]] = field(default_factory=dict)
    features: dict[int, Features] = field(default_factory=dict)
    descriptors: list[np.ndarray] = field(default_factory=list)  # each slice's, for the input profile
    metal: list[float | None] = field(default_factory=list)  # each slice's metal_depth_mm, when the scope checks it

    def keep(self, index: int, probability: float, network_input: np.ndarray,
             hu: tuple[np.ndarray, tuple[float, float] | None], features: Features, count: int) -> None:
        """Keep `count` slices, ranked as key_slice_indices ranks (ties: lower index)."""
        heapq.heappush(self.best, (probability, -index))
        self.inputs[index], self.hu[index], self.features[index] = network_input, hu, features
        if len(self.best) > count:
            _, dropped = heapq.heappop(self.best)
            del self.inputs[-dropped], self.hu[-dropped], self.features[-dropped]


def _scan(choice: SeriesChoice, read: SliceReader, predictor: Predictor, key_slices: int,
          clock: _Stopwatch, preloaded: dict[str, Dataset], unreadable: Mapping[str, str]) -> _Scan:
    """Every slice through the model, and through the metal check when the scope asks for it
    (on the HU the model's input is made from, so each slice is read once); `preloaded`
    holds slices the scope check already read; `unreadable` files are left out from the start."""
    scan = _Scan(skipped=dict(unreadable))
    metal_check = predictor.config.scope.metal_check
    batch: list[tuple[SliceHeader, np.ndarray, tuple[np.ndarray, tuple[float, float] | None]]] = []

    def run_batch() -> None:
        started = time.perf_counter()
        inference = predictor.infer(np.stack([x for _, x, _ in batch]))
        clock.since("inference", started)
        for i, ((header, network_input, hu), probability) in enumerate(zip(batch, inference.probabilities)):
            scan.keep(len(scan.probabilities), float(probability), network_input, hu, inference.features[i],
                      key_slices)
            scan.probabilities.append(float(probability))
            scan.headers.append(header)
            scan.descriptors.append(inference.descriptors[i])
        batch.clear()

    for header in choice.slices:
        started = time.perf_counter()
        try:
            ds = preloaded.pop(header.key, None) or read(header)
            loaded = clock.since("load", started)
            hu, spacing = square_pixels(hu_from_dataset(ds), header.pixel_spacing)
            network_input = predictor.prepare_hu(hu)
            if metal_check:
                scan.metal.append(metal_depth_mm(hu, spacing))
            clock.since("preprocess", loaded)
        except Exception as exc:  # InvalidInstance, or pydicom on a damaged file
            scan.skipped[header.key] = str(exc)
            continue
        if scan.reference is None:
            scan.reference = result_reference(ds)  # only the patient, study and series context is needed
        batch.append((header, network_input, (hu, spacing)))
        if len(batch) == predictor.batch_size:
            run_batch()
    if batch:
        run_batch()
    return scan


def _check_usable(choice: SeriesChoice, scan: _Scan, settings: AnalysisSettings, unreadable: int) -> None:
    """Too few usable slices, or too many left out, and a verdict would mean nothing. Files
    of the study that could not be read at all count against the series: they may be its."""
    total, usable = len(choice.slices) + unreadable, len(scan.probabilities)
    first = next(iter(scan.skipped.values()), "none")
    if usable < settings.min_slices:
        raise InvalidInstance(
            f"series {choice.series_instance_uid}: only {usable} of {total} slices are usable, fewer than "
            f"worker.min_slices = {settings.min_slices} (first problem: {first})"
        )
    if total - usable > settings.max_unusable_fraction * total:
        raise InvalidInstance(
            f"series {choice.series_instance_uid}: {total - usable} of {total} slices are unusable, more than "
            f"worker.max_unusable_fraction = {settings.max_unusable_fraction:g} (first problem: {first})"
        )


def _window_label(predictor: Predictor) -> tuple[int, str]:
    """The channel shown beside the heatmap (the brain window when there is one) and its name."""
    windows = predictor.config.preprocess.windows
    index = next((i for i, w in enumerate(windows) if w.name == "brain"), 0)
    window = windows[index]
    return index, f"{window.name.replace('_', ' ')} window ({window.low:g}-{window.high:g} HU)"


def _images(scan: _Scan, keys: list[int], cams: np.ndarray, verdict: Verdict, texts: ResultTexts,
            predictor: Predictor) -> list[np.ndarray]:
    spec = predictor.config.preprocess
    channel, label = _window_label(predictor)
    probabilities = np.array(scan.probabilities)
    images = []
    for index, cam in zip(keys, cams):
        header = scan.headers[index]
        mask = mask_to_input(intracranial_mask(*scan.hu[index]), spec)
        images.append(key_slice_image(
            scan.inputs[index][channel] * spec.std + spec.mean, cam, mask=mask,
            probability=float(probabilities[index]), slice_number=index + 1,
            total_slices=len(probabilities), position_mm=header.position[2] if header.position else None,
            verdict_line=texts.verdict_line, positive=verdict.positive, warnings=texts.warnings,
            window_label=label,
        ))
    images.append(summary_image(
        probabilities, slice_threshold=verdict.rule.slice_threshold, key_slices=keys,
        verdict_line=texts.verdict_line, rule_line=texts.rule_line, positive=verdict.positive,
        warnings=texts.warnings,
    ))
    return images


def _gradcam(scan: _Scan, keys: list[int], predictor: Predictor, aug_smooth: bool) -> np.ndarray:
    """Maps of the key slices from the features the inference pass kept; smoothing runs
    flipped and scaled copies of the inputs, so it starts from the inputs instead."""
    if aug_smooth:
        return predictor.gradcam(np.stack([scan.inputs[i] for i in keys]), aug_smooth=True)
    return predictor.gradcam_from_features([scan.features[i] for i in keys])


def _scope(choice: SeriesChoice, read: SliceReader, predictor: Predictor,
           clock: _Stopwatch) -> tuple[list[Reason], dict[str, Dataset], bool]:
    """What the headers and the middle slices' HU say against the checkpoint's scope, the
    middle slices read for it (the scan uses them rather than reading them again), and
    whether any of those could not give HU."""
    preloaded: dict[str, Dataset] = {}
    damaged = []

    def read_hu(header: SliceHeader) -> np.ndarray:
        try:
            ds = preloaded[header.key] = read(header)
            return hu_from_dataset(ds)
        except Exception:
            damaged.append(header.key)
            raise

    started = time.perf_counter()
    reasons = scope_reasons(choice.slices, predictor.config.scope, read_hu)
    clock.since("scope", started)
    return reasons, preloaded, bool(damaged)


def _context(settings: AnalysisSettings, predictor: Predictor, warnings: list[str]) -> ResultContext:
    model = predictor.config
    return ResultContext(settings.manufacturer, settings.institution_name, settings.device_uid,
                         settings.device_name, model.architecture, model.provenance.code_version, warnings)


def _facts(choice: SeriesChoice | None, scan: _Scan | None, assessment: Assessment | None,
           predictor: Predictor) -> list[str]:
    """The numbers a reader of a NOT TRIAGED picture needs: what was looked at, what the
    model supports, the out-of-distribution score."""
    model = predictor.config
    facts = [f"Series: {choice.reason}." if choice else "No axial CT series in the study."]
    if assessment is not None:
        facts.append(f"{assessment.describe()}.")
    if scan is not None:
        facts.append(f"{len(scan.probabilities)} slices went through the model.")
    facts.append(f"This model supports: {model.scope.describe()}.")
    return facts


def _not_triaged(reasons: list[Reason], choice: SeriesChoice | None, reference: Dataset, sources: list[SourceImage],
                 predictor: Predictor, settings: AnalysisSettings, clock: _Stopwatch, *, series_number: int,
                 scan: _Scan | None = None, assessment: Assessment | None = None,
                 failed: bool = False) -> AnalysisResult:
    """The result of a study the model does not answer for: a notice picture and an SR that
    says the finding was not evaluated and why; no key slices, so no Key Object Selection.
    `failed`: the notice of a failed analysis."""
    model = predictor.config
    texts = not_triaged_texts([r.text for r in reasons], model.provenance, model.architecture, failed=failed)
    started = time.perf_counter()
    objects: dict[ResultKind, list[Dataset]] = {}
    if ResultKind.SC in settings.objects:
        headline = {"headline": "The analysis of this study failed: it was not triaged."} if failed else {}
        facts = [f"Series: {choice.reason}." if choice else "No series was analysed."] if failed else \
            _facts(choice, scan, assessment, predictor)
        picture = not_triaged_image(verdict_line=texts.verdict_line, reasons=[r.text for r in reasons],
                                    facts=facts, warnings=texts.warnings, **headline)
        _, objects[ResultKind.SC] = build_result_series(
            reference, [picture], texts=texts, series_number=series_number + SERIES_OFFSETS[ResultKind.SC],
            manufacturer=settings.manufacturer, institution_name=settings.institution_name,
            software_version=model.provenance.code_version, sources=[None])
    if ResultKind.SR in settings.objects or not objects:  # a result always has an object set
        unanswered = Unanswered(reasons, settings.rule, assessment)
        objects[ResultKind.SR] = [build_not_triaged_sr(
            reference, sources, unanswered, _context(settings, predictor, texts.warnings),
            series_number=series_number + SERIES_OFFSETS[ResultKind.SR],
            series_description=texts.descriptions[ResultKind.SR])]
    clock.since("encode", started)
    probabilities = np.array(scan.probabilities if scan else [], dtype=np.float32)
    return AnalysisResult(choice, None, probabilities, [], scan.skipped if scan else {}, texts, objects,
                          clock.timings, tuple(reasons), assessment, triaged=False)


def _no_series(headers: Sequence[SliceHeader], read: SliceReader, problem: NoAnalysableSeries, predictor: Predictor,
               settings: AnalysisSettings, clock: _Stopwatch, series_number: int) -> AnalysisResult:
    """A study with nothing the model could read (an MR, a scout alone, another body part
    as Enhanced CT): not triaged, the result attached to its first readable instance."""
    found = _first_readable(headers, read, {})
    if found is None:
        raise problem  # nothing to attach a result to: the study fails with the reason
    reference, source = found
    return _not_triaged([Reason(ReasonCode.NO_SERIES, str(problem))], None, reference, [source], predictor,
                        settings, clock, series_number=series_number)


def failure_notice(headers: Sequence[SliceHeader], read: SliceReader, predictor: Predictor,
                   settings: AnalysisSettings, reason: str, *, series_number: int) -> AnalysisResult | None:
    """What a radiologist sees of a study whose analysis failed: a NOT TRIAGED picture and
    SR saying *analysis failed* and why, attached to the study's first readable instance;
    None when no instance can be read (nothing to attach it to)."""
    found = _first_readable(headers, read, {})
    if found is None:
        return None
    reference, source = found
    return _not_triaged([Reason(ReasonCode.ANALYSIS_FAILED, reason)], None, reference, [source], predictor,
                        settings, _Stopwatch(), series_number=series_number, failed=True)


def _first_readable(headers: Sequence[SliceHeader], read: SliceReader,
                    preloaded: dict[str, Dataset]) -> tuple[Dataset, SourceImage] | None:
    """The first instance that can be read, without its pixels, to carry the study's
    context into a NOT TRIAGED result, and the instance it cites."""
    for header in headers:
        try:
            reference = result_reference(preloaded.get(header.key) or read(header))
        except Exception:  # an unreadable file: try the next
            continue
        return reference, source_image(header)
    return None


def analyse(headers: Sequence[SliceHeader], read: SliceReader, predictor: Predictor,
            settings: AnalysisSettings, *, series_number: int,
            unreadable: Mapping[str, str] = MappingProxyType({})) -> AnalysisResult:
    """Choose the head series, check it against the checkpoint's scope, run the model on it
    slice by slice, check its slices against the checkpoint's training inputs, apply the
    rule, explain the key slices and build the object sets `settings.objects` asks for
    (a KOS only for a flagged study unless `settings.kos_for` is all), each a series of
    its own numbered from `series_number` (SC, then SR, then KOS).

    `unreadable` names the study's files whose header could not be read (file → why): each
    is counted among the slices left out.

    Raises InvalidInstance when too few slices of the series can be used (final for the
    study), and NoAnalysableSeries when no instance of the study can be read at all.
    """
    clock = _Stopwatch()
    scope = predictor.config.scope
    try:
        choice = choose_head_series(list(headers), settings.min_slices,
                                    lambda slices: [r.text for r in header_reasons(slices, scope)])
    except NoAnalysableSeries as problem:
        return _no_series(headers, read, problem, predictor, settings, clock, series_number)
    reasons, preloaded, damaged = _scope(choice, read, predictor, clock)
    # Damaged slices: the scan first finds out whether the series can be read at all (a
    # study that cannot be read fails saying why, which tells an admin more than the scope).
    if reasons and settings.abstain and not damaged:
        found = _first_readable(middle_slices(choice.slices, 1) + choice.slices, read, preloaded)
        if found is None:
            raise InvalidInstance(f"series {choice.series_instance_uid}: no slice of it can be read")
        reference, source = found
        return _not_triaged(reasons, choice, reference, [source], predictor, settings, clock,
                            series_number=series_number)
    scan = _scan(choice, read, predictor, settings.key_slices, clock, preloaded, unreadable)
    _check_usable(choice, scan, settings, len(unreadable))
    probabilities = np.array(scan.probabilities, dtype=np.float32)
    model = predictor.config
    metal = metal_reason(scan.metal)
    if metal is not None:
        reasons.append(metal)
    assessment = model.inputs.assess(scan.descriptors) if model.inputs is not None else None
    if assessment is not None and assessment.outside:
        reasons.append(Reason(ReasonCode.OUT_OF_DISTRIBUTION, assessment.reason()))
    if reasons and settings.abstain:
        middle = middle_slices(scan.headers, 1)[0]
        return _not_triaged(reasons, choice, scan.reference, [source_image(middle)], predictor, settings, clock,
                            series_number=series_number, scan=scan, assessment=assessment)
    keys = key_slice_indices(probabilities, settings.key_slices)
    sources = [source_image(scan.headers[i]) for i in keys]
    verdict = settings.rule.apply(probabilities)
    texts = result_texts(verdict, model.provenance, model.architecture, unusable_slices=len(scan.skipped))
    objects: dict[ResultKind, list[Dataset]] = {}
    started = time.perf_counter()
    if ResultKind.SC in settings.objects:  # the only set with pictures, so the only one that needs Grad-CAM
        cams = _gradcam(scan, keys, predictor, settings.aug_smooth)
        started = clock.since("gradcam", started)
        _, objects[ResultKind.SC] = build_result_series(
            scan.reference, _images(scan, keys, cams, verdict, texts, predictor), texts=texts,
            series_number=series_number + SERIES_OFFSETS[ResultKind.SC], manufacturer=settings.manufacturer,
            institution_name=settings.institution_name, software_version=model.provenance.code_version,
            sources=[*sources, None],
        )
    context = _context(settings, predictor, texts.warnings)
    kos = ResultKind.KOS in settings.objects and (verdict.positive or settings.kos_for == KosFor.ALL)
    # Only a KOS asked for and the study not flagged: the SR, as a result always has an object set.
    if ResultKind.SR in settings.objects or not (objects or kos):
        objects[ResultKind.SR] = [build_sr(scan.reference, sources, verdict, context,
                                           series_number=series_number + SERIES_OFFSETS[ResultKind.SR],
                                           series_description=texts.descriptions[ResultKind.SR],
                                           left_out=len(scan.skipped))]
    if kos:
        objects[ResultKind.KOS] = [build_kos(scan.reference, sources, context,
                                             series_number=series_number + SERIES_OFFSETS[ResultKind.KOS],
                                             description=texts.descriptions[ResultKind.KOS])]
    clock.since("encode", started)
    return AnalysisResult(choice, verdict, probabilities, keys, scan.skipped, texts,
                          {kind: objects[kind] for kind in (*settings.objects, ResultKind.SR) if kind in objects},
                          clock.timings, tuple(reasons), assessment)

