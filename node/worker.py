"""The worker: claim a ready study, load its headers, `analyse` it, write the result
series, record the outcome, log it. Analysis itself is the pure stage in `node.analysis`.

What happens to a study whose analysis failed depends on the error, not on where it was
raised: a retryable error (disk full, database busy) sends it back to the queue after a
growing wait without using up an attempt; anything else fails it at once with the
reason: an error raised on purpose (no head series, unusable pixels) with its message,
an unexpected one with its type and message (the traceback goes to the node's log), since
trying the same input again would fail the same way. An admin re-runs a failed study
with `ichnode reanalyse` or the pages' Re-analyse button. `worker.max_attempts` bounds
only the claims of a study whose worker died (`requeue_stale`).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

from pydicom.uid import generate_uid

from node.analysis import SERIES_PER_ANALYSIS, AnalysisResult, AnalysisSettings, analyse, failure_notice
from node.config import Config
from node.health import Liveness
from node.lease import KeepAlive, claimant_id
from node.privacy import redact
from node.notify import analysed_message, failed_message, messages_for, patient_fields
from node.output import encode
from node.triagelog import TriageLog
from storage.db import Database, Session, utcnow
from storage.errors import DatabaseMissing, IchNodeError, StorageError
from storage.state import (
    ClaimedStudy,
    FailureNotice,
    backoff_seconds,
    claim_next_study,
    defer_study,
    fail_study,
    finish_study,
    heartbeat,
    queue_notifications,
    requeue_stale,
    result_folders,
    studies_in_progress,
)
from storage.store import InstanceStore
from training.inference.predictor import Predictor
from training.model import attributes as attr
from training.model.checkpoint import checkpoint_digest
from training.model.series import SliceHeader, read_headers
from training.model.slices import read_slice

__all__ = ["NO_CHECKPOINT", "Worker", "analysis_settings", "read_slice", "recover_results"]

log = logging.getLogger(__name__)

NO_CHECKPOINT = "no model checkpoint configured (model.checkpoint)"


def device_uid(config: Config) -> str:
    """output.device_uid, or one derived from the AE title and the host: the same node
    keeps the same UID across restarts."""
    return config.output.device_uid or generate_uid(entropy_srcs=["ichnode", config.node.ae_title,
                                                                   socket.gethostname()])


def analysis_settings(config: Config, predictor: Predictor | None) -> AnalysisSettings:
    """What `analyse` needs; the rule in force depends on triage.source and the checkpoint."""
    rule = config.triage.rule_for(predictor.config.triage) if predictor is not None else config.triage.configured_rule
    return AnalysisSettings(
        rule=rule, min_slices=config.worker.min_slices, abstain=config.triage.abstain,
        max_unusable_fraction=config.worker.max_unusable_fraction, key_slices=config.explain.key_slices,
        aug_smooth=config.explain.aug_smooth, objects=config.output.objects, kos_for=config.output.kos_for,
        manufacturer=config.output.manufacturer, institution_name=config.output.institution_name,
        device_uid=device_uid(config), device_name=config.node.ae_title,
    )


def recover_results(database: Database, store: InstanceStore, stale_after_seconds: float) -> None:
    """Finish what a crash between writing and recording a result series left: publish the
    folders the database recorded, delete the ones it never heard of. Several processes
    share the storage folder, so a folder whose study a live worker is analysing (fresh
    heartbeat) is that worker's work in progress, and left alone."""
    leftovers = store.unpublished_results(stale_after_seconds)  # listed first: the database read is newer
    if not leftovers:
        return
    with database.read() as session:
        recorded = result_folders(session)
        in_progress = studies_in_progress(session, stale_after_seconds, utcnow())
    for folder in leftovers:
        if str(folder) in recorded:
            store.publish_result(folder)
            log.warning("result series %s was recorded before a crash; published it now", folder)
        elif folder.parent.name in in_progress:
            log.info("result series %s is being written by a live worker; left to it", folder)
        else:
            store.delete_unpublished(folder)
            log.warning("deleted result series %s: written before a crash, never recorded", folder)


@contextlib.contextmanager
def _library_warnings_logged(study_uid: str) -> Iterator[None]:
    """pydicom's and highdicom's warnings during an analysis go to the node's log, one line
    each with quoted values redacted, instead of to stderr with a patient's name in them."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            for warning in caught:
                log.warning("study %s: %s: %s", study_uid, warning.category.__name__, redact(str(warning.message)))


class Worker:
    """Claims ready studies one at a time and records what came of each."""

    def __init__(self, config: Config, database: Database, store: InstanceStore, predictor: Predictor | None,
                 triage_log: TriageLog, owner: str | None = None,
                 recorded: Callable[[], None] = lambda: None) -> None:
        self.config = config
        self.database = database
        self.store = store
        self.predictor = predictor
        self.triage_log = triage_log
        self.settings = analysis_settings(config, predictor)
        self.owner = owner or claimant_id()
        self.recorded = recorded  # called once an outcome is recorded: deliveries and notifications may start
        self.liveness = Liveness()  # beaten each time round the loop, for /readyz
        # Which checkpoint file made each analysis: `ichnode calibrate --history` joins on it.
        checkpoint = config.model.checkpoint
        self.model_sha256 = checkpoint_digest(checkpoint) if predictor is not None and checkpoint else None

    def run_once(self) -> bool:
        """Process at most one study; True when one was claimed."""
        study = self._claim()
        if study is None:
            return False
        if self.predictor is None:
            self._fail(study, NO_CHECKPOINT)
            return True
        with KeepAlive(lambda: self._beat(study.id), self.config.worker.heartbeat_seconds,
                       f"study {study.study_instance_uid}"):
            try:
                headers, unreadable = self._headers(study)
                with _library_warnings_logged(study.study_instance_uid):
                    result = analyse(headers, read_slice, self.predictor, self.settings, unreadable=unreadable,
                                     series_number=self.config.output.series_number
                                     + SERIES_PER_ANALYSIS * study.analyses)
                folder = self._write(study, result)
            except Exception as exc:
                self._failed(study, exc)
                return True
        self._finish(study, result, folder)
        return True

    def _beat(self, study_id: int) -> bool:
        with self.database.write() as session:
            return heartbeat(session, study_id, self.owner, utcnow())

    def _claim(self) -> ClaimedStudy | None:
        settings = self.config.worker
        with self.database.write() as session:
            stale = requeue_stale(session, settings.stale_after_seconds, settings.max_attempts, utcnow())
            for gone in stale:
                if gone.failed:
                    self._notify_failed(session, gone.id, gone.study_instance_uid, gone.accession_number,
                                        gone.reason)
            study = claim_next_study(session, self.owner, utcnow())
        for gone in stale:
            log.warning("study %s: %s", gone.study_instance_uid, gone.reason)
            if gone.failed:
                self.triage_log.write("failed", gone.study_instance_uid, gone.accession_number, reason=gone.reason)
        return study

    def _notify_failed(self, session: Session, study_id: int, uid: str, accession: str, reason: str) -> None:
        """Queue the webhooks' messages for a failed study, in the transaction that records it."""
        queue_notifications(session, study_id, messages_for(self.config.notifying, failed_message(
            uid, accession, reason)), utcnow())

    def _headers(self, study: ClaimedStudy) -> tuple[list[SliceHeader], dict[str, str]]:
        """The slices of the study's instances, and the files whose header cannot be read
        (file name → why), which the analysis counts among the slices left out."""
        headers, unreadable = [], {}
        for path in study.instance_paths:
            try:
                headers.extend(read_headers(self.store.absolute(path)))
            except Exception as exc:  # an unreadable file must not stop the others
                unreadable[Path(path).name] = f"the file cannot be read ({type(exc).__name__})"
                log.warning("study %s: cannot read %s: %s", study.study_instance_uid, path, exc)
        return headers, unreadable

    def _write(self, study: ClaimedStudy, result: AnalysisResult) -> Path:
        started = time.perf_counter()
        folder = self.store.result_folder(study.study_instance_uid, result.series_instance_uid)
        self.store.write_result(folder, {f"{kind}-{ds.InstanceNumber:04d}.dcm": encode(ds)
                                         for kind, datasets in result.objects.items() for ds in datasets})
        result.timings["encode"] = round(result.timings.get("encode", 0.0) + time.perf_counter() - started, 3)
        return folder

    def _failed(self, study: ClaimedStudy, exc: Exception) -> None:
        """Try again later only when the environment failed (disk, database); otherwise the
        same input would fail the same way, so the study fails now with the reason."""
        if isinstance(exc, IchNodeError):
            if exc.retryable:
                self._defer(study, str(exc))
            else:
                self._fail(study, str(exc))
            return
        log.exception("study %s: analysis failed unexpectedly", study.study_instance_uid)
        self._fail(study, redact(f"{type(exc).__name__}: {exc}"))  # a library may quote a header value

    def _defer(self, study: ClaimedStudy, reason: str) -> None:
        settings = self.config.worker
        wait = backoff_seconds(study.retries + 1, settings.retry_initial_seconds, settings.retry_max_seconds)
        retry_at = utcnow() + dt.timedelta(seconds=wait)
        with self.database.write() as session:
            deferred = defer_study(session, study.id, self.owner, reason, retry_at=retry_at)
        if deferred is None:
            log.warning("study %s was taken from this worker meanwhile", study.study_instance_uid)
            return
        log.warning("study %s: %s; trying again in %g s", study.study_instance_uid, reason, wait)
        self.triage_log.write("deferred", study.study_instance_uid, study.accession_number, reason=reason,
                              next_attempt_at=retry_at.isoformat(timespec="seconds") + "Z")

    def _fail(self, study: ClaimedStudy, reason: str) -> None:
        written = self._failure_notice(study, reason)
        notice = None
        if written is not None:
            result, folder = written
            notice = FailureNotice(result.series_instance_uid, str(folder), [d.name for d in self.config.sending_to],
                                   [str(kind) for kind in result.objects])
        with self.database.write() as session:
            failed = fail_study(session, study.id, self.owner, reason, notice=notice, now=utcnow())
            if failed is not None:
                self._notify_failed(session, study.id, study.study_instance_uid, study.accession_number, reason)
        if failed is None:
            if written is not None:
                self.store.delete_unpublished(written[1])
            log.warning("study %s was taken from this worker meanwhile; its failure is not recorded",
                        study.study_instance_uid)
            return
        if written is not None:
            self.store.publish_result(written[1])
        self.triage_log.write("failed", study.study_instance_uid, study.accession_number, reason=reason,
                              failure_notice=notice.result_series_uid if notice else None)
        log.warning("study %s: %s", study.study_instance_uid, reason)
        self.recorded()

    def _failure_notice(self, study: ClaimedStudy, reason: str) -> tuple[AnalysisResult, Path] | None:
        """The NOT TRIAGED picture and SR that tell a radiologist the analysis failed,
        written unpublished; None without a model (the node was set up to analyse nothing)
        or when no instance of the study can be read."""
        if self.predictor is None:
            return None
        try:
            result = failure_notice(self._headers(study)[0], read_slice, self.predictor, self.settings, reason,
                                    series_number=self.config.output.series_number
                                    + SERIES_PER_ANALYSIS * study.analyses)
            return (result, self._write(study, result)) if result is not None else None
        except Exception:  # the notice is a courtesy: its failure must not hide the study's
            log.exception("study %s: the failure notice could not be made", study.study_instance_uid)
            return None

    def _finish(self, study: ClaimedStudy, result: AnalysisResult, folder: Path) -> None:
        fields = _analysed_fields(result, self.predictor, self.settings) | {
            "model_sha256": self.model_sha256, "rule_source": str(self.config.triage.source),
            "delivery_mode": str(self.config.delivery.mode)}
        with self.database.write() as session:
            recorded = finish_study(
                session, study.id, self.owner, verdict=result.label,
                study_score=result.verdict.study_score if result.triaged and result.verdict else None,
                result_series_uid=result.series_instance_uid, result_folder=str(folder),
                priority_high=result.positive, destinations=[d.name for d in self.config.sending_to],
                kinds=[str(kind) for kind in result.objects], started_at=study.claimed_at, now=utcnow(),
            )
            if recorded is not None:
                queue_notifications(session, study.id, messages_for(self.config.notifying, analysed_message(
                    study.study_instance_uid, study.accession_number, fields,
                    patient=self._patient(result))), utcnow())
        if recorded is None:
            self.store.delete_unpublished(folder)
            log.warning("study %s was re-queued while this worker analysed it; result %s discarded",
                        study.study_instance_uid, result.series_instance_uid)
            return
        self.store.publish_result(folder)
        self.triage_log.write("analysed", study.study_instance_uid, study.accession_number, **fields)
        self.recorded()

    def _patient(self, result: AnalysisResult) -> dict[str, str] | None:
        """Patient identifiers for notifications, only where log.include_patient_identifiers allows."""
        ds = result.datasets[0]
        return patient_fields(self.config.log.include_patient_identifiers, attr.text(ds, "PatientName"),
                              attr.text(ds, "PatientID"), attr.text(ds, "PatientBirthDate"))

    def run_forever(self, stop: threading.Event) -> None:
        """Claim and process until `stop` is set; idle polls every worker.poll_seconds.
        Without its database the worker claims nothing and says so once."""
        missing = False
        while not stop.is_set():
            self.liveness.beat()
            try:
                busy = self.run_once()
                missing = False
            except DatabaseMissing as exc:
                if not missing:
                    log.error("worker stopped claiming studies: %s", exc)
                missing, busy = True, False
            except StorageError as exc:
                if not exc.retryable:
                    log.exception("worker loop error")
                busy = False  # unreachable or busy: Database logged the outage; try again at the next poll
            except Exception:
                log.exception("worker loop error")
                busy = False
            if not busy:
                stop.wait(self.config.worker.poll_seconds)


def _analysed_fields(result: AnalysisResult, predictor: Predictor, settings: AnalysisSettings) -> dict:
    """The `analysed` event of the triage log: the verdict and its numbers, or NOT TRIAGED
    and why; what the scope and input checks found either way; the model's raw slice
    probabilities whenever it ran (for site validation, never shown as a verdict)."""
    choice, model, rule = result.choice, predictor.config, settings.rule
    fields: dict = dict(
        verdict=result.texts.verdict_line, triaged=result.triaged, positive=result.positive,
        not_triaged=[r.as_dict() for r in result.reasons] if not result.triaged else [],
        scope_findings=[r.as_dict() for r in result.reasons],
        input_check=result.inputs.as_dict() if result.inputs is not None else None,
        slice_threshold=rule.slice_threshold, positive_fraction=rule.positive_fraction,
        min_positive_slices=rule.min_positive_slices,
    )
    verdict = result.verdict
    if verdict is not None and result.triaged:
        fields.update(study_score=round(verdict.study_score, 4), top_k_score=round(verdict.top_k_score, 4),
                      positive_slices=verdict.positive_slices, total_slices=verdict.total_slices,
                      required_slices=verdict.required_slices)
    else:
        fields.update(total_slices=len(result.probabilities))
    if choice is not None:
        fields.update(series_instance_uid=choice.series_instance_uid, series_reason=choice.reason,
                      slice_order=choice.ordering, passed_over=choice.passed_over)
    fields.update(
        skipped_slices=result.skipped_slices,
        slice_probabilities=[round(float(p), 5) for p in result.probabilities],
        result_series_uid=result.series_instance_uid, result_objects=len(result.datasets),
        result_sets={str(kind): len(datasets) for kind, datasets in result.objects.items()},
        model=model.architecture, model_training_data=model.provenance.training_data,
        warnings=result.texts.warnings, timings_s=result.timings,
    )
    return fields
