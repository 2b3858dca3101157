"""Analysis, one pure stage: a study's slice headers in, verdict and result datasets out.

`analyse` reads slices only through the `read` function it is given (the worker's reads
the store; a test's may read memory) and writes nothing: the worker loads the headers,
calls it, writes the result files and records the outcome. Slices stream through the
model one batch at a time; for the most suspicious slices so far it keeps only what the
pictures and Grad-CAM need (the network input and the features the inference pass
returned), so memory does not grow with the length of the series and Grad-CAM
differentiates only the network above its layer.
"""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
from pydicom.dataset import Dataset

from node.output import ResultKind, ResultTexts, SourceImage, build_result_series, result_texts
from node.render import key_slice_image, summary_image
from node.structured import ResultContext, build_kos, build_sr
from storage.errors import InvalidInstance
from training.inference.gradcam import Features
from training.inference.predictor import Predictor
from training.model.rule import TriageRule, Verdict, key_slice_indices
from training.model.series import SeriesChoice, SliceHeader, choose_head_series

__all__ = ["SERIES_PER_ANALYSIS", "AnalysisSettings", "AnalysisResult", "SliceReader", "analyse"]

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


@dataclass(frozen=True)
class AnalysisResult:
    choice: SeriesChoice
    verdict: Verdict
    probabilities: np.ndarray  # P(ICH) of each usable slice, inferior to superior
    key_slices: list[int]  # indices into `probabilities`, most suspicious first
    skipped_slices: dict[str, str]  # SOPInstanceUID → why it was left out
    texts: ResultTexts
    objects: dict[ResultKind, list[Dataset]]  # each object set (its own series) in settings' order
    timings: dict[str, float] = field(default_factory=dict)

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
    # network input (for its picture) and the features Grad-CAM starts from.
    best: list[tuple[float, int]] = field(default_factory=list)
    inputs: dict[int, np.ndarray] = field(default_factory=dict)
    features: dict[int, Features] = field(default_factory=dict)

    def keep(self, index: int, probability: float, network_input: np.ndarray, features: Features,
             count: int) -> None:
        """Keep `count` slices, ranked as key_slice_indices ranks (ties: lower index)."""
        heapq.heappush(self.best, (probability, -index))
        self.inputs[index], self.features[index] = network_input, features
        if len(self.best) > count:
            _, dropped = heapq.heappop(self.best)
            del self.inputs[-dropped], self.features[-dropped]


def _scan(choice: SeriesChoice, read: SliceReader, predictor: Predictor, key_slices: int,
          clock: _Stopwatch) -> _Scan:
    scan = _Scan()
    batch: list[tuple[SliceHeader, np.ndarray]] = []

    def run_batch() -> None:
        started = time.perf_counter()
        probabilities, features = predictor.predict_with_features(np.stack([x for _, x in batch]))
        clock.since("inference", started)
        for (header, network_input), probability, slice_features in zip(batch, probabilities, features):
            scan.keep(len(scan.probabilities), float(probability), network_input, slice_features, key_slices)
            scan.probabilities.append(float(probability))
            scan.headers.append(header)
        batch.clear()

    for header in choice.slices:
        started = time.perf_counter()
        try:
            ds = read(header)
            loaded = clock.since("load", started)
            network_input = predictor.prepare_slice(ds)
            clock.since("preprocess", loaded)
        except Exception as exc:  # InvalidInstance, or pydicom on a damaged file
            scan.skipped[header.sop_instance_uid] = str(exc)
            continue
        if scan.reference is None:
            del ds.PixelData  # only the patient, study and series context is needed
            scan.reference = ds
        batch.append((header, network_input))
        if len(batch) == predictor.batch_size:
            run_batch()
    if batch:
        run_batch()
    return scan


def _check_usable(choice: SeriesChoice, scan: _Scan, settings: AnalysisSettings) -> None:
    """Too few usable slices, or too many left out, and a verdict would mean nothing."""
    total, usable = len(choice.slices), len(scan.probabilities)
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
        images.append(key_slice_image(
            scan.inputs[index][channel] * spec.std + spec.mean, cam,
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


def analyse(headers: Sequence[SliceHeader], read: SliceReader, predictor: Predictor,
            settings: AnalysisSettings, *, series_number: int) -> AnalysisResult:
    """Choose the head series, run the model on it slice by slice, apply the rule, explain
    the key slices and build the object sets `settings.objects` asks for, each a series
    of its own numbered from `series_number` (SC, then SR, then KOS).

    Raises NoAnalysableSeries when no series qualifies and InvalidInstance when too few
    of its slices can be used; both are final for the study.
    """
    clock = _Stopwatch()
    choice = choose_head_series(list(headers), settings.min_slices)
    scan = _scan(choice, read, predictor, settings.key_slices, clock)
    _check_usable(choice, scan, settings)
    probabilities = np.array(scan.probabilities, dtype=np.float32)
    verdict = settings.rule.apply(probabilities)
    keys = key_slice_indices(probabilities, settings.key_slices)
    model = predictor.config
    texts = result_texts(verdict, model.provenance, model.architecture, unusable_slices=len(scan.skipped))
    sources = [SourceImage(scan.headers[i].sop_class_uid, scan.headers[i].sop_instance_uid) for i in keys]
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
    context = ResultContext(settings.manufacturer, settings.institution_name, settings.device_uid,
                            settings.device_name, model.architecture, model.provenance.code_version, texts.warnings)
    if ResultKind.SR in settings.objects:
        objects[ResultKind.SR] = [build_sr(scan.reference, sources, verdict, context,
                                           series_number=series_number + SERIES_OFFSETS[ResultKind.SR],
                                           series_description=texts.descriptions[ResultKind.SR])]
    if ResultKind.KOS in settings.objects:
        objects[ResultKind.KOS] = [build_kos(scan.reference, sources, context,
                                             series_number=series_number + SERIES_OFFSETS[ResultKind.KOS],
                                             description=texts.descriptions[ResultKind.KOS])]
    clock.since("encode", started)
    return AnalysisResult(choice, verdict, probabilities, keys, scan.skipped, texts,
                          {kind: objects[kind] for kind in settings.objects}, clock.timings)
