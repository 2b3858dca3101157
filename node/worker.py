"""Analysis: claim a ready study, choose and order its head series, run the model, apply
the patient rule, explain the key slices with Grad-CAM, and store the result series."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from sqlalchemy import select
from sqlalchemy.orm import sessionmaker

from node.config import Config
from node.errors import IchNodeError, InvalidInstance
from node.output import ResultTexts, build_result_series, encode, result_texts
from node.render import key_slice_image, summary_image
from node.series import SeriesChoice, choose_head_series, read_header
from node.triage import Verdict, key_slice_indices, patient_verdict
from node.triagelog import TriageLog
from storage.db import Instance, utcnow
from storage.state import claim_next_study, fail_study, finish_study, heartbeat, requeue_stale
from storage.store import InstanceStore
from training.predictor import Predictor
from training.preprocess import dataset_to_input

__all__ = ["NO_CHECKPOINT", "Analysis", "Analyzer", "Worker", "worker_id"]

log = logging.getLogger(__name__)

NO_CHECKPOINT = "no model checkpoint configured (model.checkpoint)"


def worker_id() -> str:
    """host:pid:random — unique across hosts and restarts."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class Analysis:
    verdict: Verdict
    choice: SeriesChoice
    texts: ResultTexts
    result_series_uid: str
    result_folder: Path  # relative to storage.root
    objects: int
    timings: dict[str, float] = field(default_factory=dict)
    skipped_slices: dict[str, str] = field(default_factory=dict)  # SOPInstanceUID → why


class _Stopwatch:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timings[stage] = round(now - self._last, 3)
        self._last = now

    def add(self, stage: str, seconds: float) -> None:
        """A stage timed by its caller; the next lap starts now."""
        self.timings[stage] = round(seconds, 3)
        self._last = time.perf_counter()


class Analyzer:
    """One study's instances → verdict and a stored Secondary Capture series."""

    def __init__(self, predictor: Predictor, config: Config, store: InstanceStore) -> None:
        self.predictor = predictor
        self.config = config
        self.store = store
        names = [w.name for w in predictor.config.preprocess.windows]
        self._brain_channel = names.index("brain") if "brain" in names else 0

    def analyse(self, study_uid: str, paths: list[Path], *, series_number: int) -> Analysis:
        clock = _Stopwatch()
        headers = []
        for path in paths:
            try:
                headers.append(read_header(path))
            except Exception as exc:  # an unreadable file must not stop the others
                log.warning("study %s: cannot read %s: %s", study_uid, path, exc)
        choice = choose_head_series(headers, self.config.worker.min_slices)
        headers, datasets, inputs, skipped = self._usable_slices(choice, clock)
        probabilities = self.predictor.predict(inputs)
        clock.lap("inference")
        triage = self.config.triage
        verdict = patient_verdict(
            probabilities,
            slice_threshold=triage.slice_threshold,
            positive_fraction=triage.positive_fraction,
            min_positive_slices=triage.min_positive_slices,
        )
        keys = key_slice_indices(probabilities, self.config.explain.key_slices)
        cams = self.predictor.gradcam(inputs[keys], aug_smooth=self.config.explain.aug_smooth)
        clock.lap("gradcam")
        model = self.predictor.config
        texts = result_texts(verdict, model.provenance, model.architecture)
        images = self._images(inputs, cams, keys, probabilities, headers, verdict, texts)
        series_uid, objects = build_result_series(
            datasets[0], images, texts=texts, series_number=series_number,
            manufacturer=self.config.output.manufacturer,
            institution_name=self.config.output.institution_name,
            software_version=model.provenance.code_version,
            sources=[datasets[i] for i in keys] + [None],
        )
        folder = self.store.result_folder(study_uid, series_uid)
        for ds in objects:
            self.store.write(folder / f"{ds.InstanceNumber:04d}.dcm", encode(ds))
        clock.lap("encode")
        return Analysis(verdict, choice, texts, series_uid, folder, len(objects), clock.timings, skipped)

    def _usable_slices(self, choice: SeriesChoice, clock: "_Stopwatch"):
        """(headers, datasets, inputs, skipped) of the chosen slices that can be used: a
        slice that cannot is left out and reported rather than failing the study, unless
        too few remain."""
        spec = self.predictor.config.preprocess
        datasets, inputs, skipped, kept = [], [], {}, []
        load = preprocess = 0.0
        for header in choice.slices:
            started = time.perf_counter()
            try:
                ds = pydicom.dcmread(header.path)
                loaded = time.perf_counter()
                inputs.append(dataset_to_input(ds, spec))
            except Exception as exc:  # InvalidInstance, or pydicom on a damaged file
                skipped[header.sop_instance_uid] = str(exc)
                continue
            load += loaded - started
            preprocess += time.perf_counter() - loaded
            datasets.append(ds)
            kept.append(header)
        clock.add("load", load)
        clock.add("preprocess", preprocess)
        minimum = self.config.worker.min_slices
        if len(inputs) < minimum:
            raise InvalidInstance(
                f"series {choice.series_instance_uid}: only {len(inputs)} of {len(choice.slices)} slices "
                f"are usable, fewer than worker.min_slices = {minimum} (first problem: "
                f"{next(iter(skipped.values()), 'none')})"
            )
        return kept, datasets, np.stack(inputs), skipped

    def _images(self, inputs, cams, keys, probabilities, headers, verdict, texts) -> list[np.ndarray]:
        spec = self.predictor.config.preprocess
        images = []
        for cam, index in zip(cams, keys):
            brain = inputs[index, self._brain_channel] * spec.std + spec.mean
            header = headers[index]
            images.append(
                key_slice_image(
                    brain, cam, probability=float(probabilities[index]),
                    slice_number=index + 1, total_slices=len(probabilities),
                    position_mm=header.position[2] if header.position else None,
                    verdict_line=texts.verdict_line, positive=verdict.positive,
                    warnings=texts.warnings,
                )
            )
        images.append(
            summary_image(
                probabilities, slice_threshold=verdict.slice_threshold, key_slices=keys,
                verdict_line=texts.verdict_line, rule_line=texts.rule_line,
                positive=verdict.positive, warnings=texts.warnings,
            )
        )
        return images


class _Heartbeat:
    """Keeps a claimed study's heartbeat fresh from a background thread."""

    def __init__(self, sessions: sessionmaker, study_id: int, owner: str, every: float) -> None:
        self._sessions, self._study_id, self._owner, self._every = sessions, study_id, owner, every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                with self._sessions() as session:
                    heartbeat(session, self._study_id, self._owner, utcnow())
            except Exception as exc:  # the database may be briefly unavailable
                log.warning("heartbeat for study %d failed: %s", self._study_id, exc)

    def __enter__(self) -> "_Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Worker:
    """Claims ready studies one at a time and records what came of each."""

    def __init__(
        self,
        config: Config,
        sessions: sessionmaker,
        store: InstanceStore,
        analyzer: Analyzer | None,
        triage_log: TriageLog,
        owner: str | None = None,
    ) -> None:
        self.config = config
        self.sessions = sessions
        self.store = store
        self.analyzer = analyzer
        self.triage_log = triage_log
        self.owner = owner or worker_id()

    def run_once(self) -> bool:
        """Process at most one study; True when one was claimed."""
        settings = self.config.worker
        with self.sessions() as session:
            for study in requeue_stale(session, settings.stale_after_seconds, settings.max_attempts, utcnow()):
                log.warning("study %s: %s", study.study_instance_uid, study.last_error)
                if study.state.value == "failed":
                    self.triage_log.write("failed", study.study_instance_uid, study.accession_number,
                                          reason=study.last_error)
            study = claim_next_study(session, self.owner, utcnow())
            if study is None:
                return False
            started_at = study.heartbeat_at
            paths = [
                self.store.absolute(p)
                for p in session.scalars(select(Instance.path).where(Instance.study_id == study.id))
            ]
            study_id, uid, accession = study.id, study.study_instance_uid, study.accession_number
            series_number = self.config.output.series_number + study.analyses
        if self.analyzer is None:
            self._fail(study_id, uid, accession, NO_CHECKPOINT, retry=False)
            return True
        with _Heartbeat(self.sessions, study_id, self.owner, settings.heartbeat_seconds):
            try:
                analysis = self.analyzer.analyse(uid, paths, series_number=series_number)
            except IchNodeError as exc:  # no head series, unusable pixels, …: final
                self._fail(study_id, uid, accession, str(exc), retry=False)
                return True
            except Exception as exc:  # unexpected: keep the node up, try again later
                log.exception("study %s: analysis failed", uid)
                self._fail(study_id, uid, accession, f"{type(exc).__name__}: {exc}", retry=True)
                return True
        self._finish(study_id, uid, accession, analysis, started_at)
        return True

    def _fail(self, study_id: int, uid: str, accession: str, reason: str, *, retry: bool) -> None:
        with self.sessions() as session:
            study = fail_study(session, study_id, self.owner, reason, retry=retry,
                               max_attempts=self.config.worker.max_attempts)
        if study is None:
            log.warning("study %s was taken from this worker meanwhile; its failure is not recorded", uid)
            return
        if study.state.value == "failed":
            self.triage_log.write("failed", uid, accession, reason=reason)
        log.warning("study %s: %s", uid, reason)

    def _finish(self, study_id: int, uid: str, accession: str, analysis: Analysis, started_at) -> None:
        verdict = analysis.verdict
        with self.sessions() as session:
            study = finish_study(
                session, study_id, self.owner, verdict=verdict.label, study_score=verdict.study_score,
                result_series_uid=analysis.result_series_uid, result_folder=str(analysis.result_folder),
                priority_high=verdict.positive, destinations=[d.name for d in self.config.destinations],
                started_at=started_at, now=utcnow(),
            )
        if study is None:
            log.warning("study %s was re-queued while this worker analysed it; result %s not delivered",
                        uid, analysis.result_series_uid)
            return
        model = self.analyzer.predictor.config
        self.triage_log.write(
            "analysed", uid, accession,
            verdict=analysis.texts.verdict_line, positive=verdict.positive,
            study_score=round(verdict.study_score, 4), top_k_score=round(verdict.top_k_score, 4),
            positive_slices=verdict.positive_slices, total_slices=verdict.total_slices,
            required_slices=verdict.required_slices, slice_threshold=verdict.slice_threshold,
            series_instance_uid=analysis.choice.series_instance_uid,
            series_reason=analysis.choice.reason, slice_order=analysis.choice.ordering,
            skipped_slices=analysis.skipped_slices,
            passed_over=analysis.choice.passed_over,
            result_series_uid=analysis.result_series_uid, result_objects=analysis.objects,
            model=model.architecture, model_training_data=model.provenance.training_data,
            warnings=analysis.texts.warnings, timings_s=analysis.timings,
        )

    def run_forever(self, stop: threading.Event) -> None:
        """Claim and process until `stop` is set; idle polls every worker.poll_seconds."""
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # the database may be briefly unavailable
                log.exception("worker loop error")
                busy = False
            if not busy:
                stop.wait(self.config.worker.poll_seconds)
