"""Receiving one instance: file on disk, row in the database, then the status to answer.

The SCP's C-STORE handler only calls `Ingest.receive`; every failure becomes a DICOM
status here, so no exception reaches pynetdicom. Success means the instance is on disk
and recorded in its study, so it will be analysed; anything less is 0xA700, and the
sender keeps the instance and tries again.

A study is not quiet while the association that sent its latest instance is open: a
sender slowed down (a busy scanner, a busy node) would otherwise pause longer than
completion.stable_seconds between two instances, and the study would be analysed
half-received and then again. Each instance holds its study for
completion.resend_wait_seconds, this process renews the holds of what its open
associations are sending, and the end of an association (or its moving on to another
study) releases the hold, so the quiet time counts from there. A hold written before a
crash cut the association outlives the crash: the sender's re-send finds the study
still waiting for it.

A refused instance is still the sender's to send again, so a study with one refused
(disk or inodes full, below storage.min_free_mb, the database away) is held for as long
as the cause lasts and for a whole completion.stable_seconds after it ends, rather than
going ready, half-received, the moment the refusals stop.
"""

from __future__ import annotations

import datetime as dt
import logging
import threading
import time
from collections.abc import Hashable

from pydicom.dataset import Dataset

from node.triagelog import TriageLog
from storage.db import Database, utcnow
from storage.errors import InvalidInstance, StorageError
from storage.state import ReceivedInstance, RecordOutcome, hold_studies, record_instance, release_hold
from storage.store import InstanceStore, check_uid
from training.model import attributes as attr
from training.model.series import could_be_analysed

__all__ = ["Status", "Ingest"]

log = logging.getLogger(__name__)


class Status:
    """C-STORE status codes the node answers (PS3.4 Annex B)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # the instance could not be stored
    DATASET_MISMATCH = 0xA900  # required identifiers missing or invalid
    CANNOT_UNDERSTAND = 0xC210  # the dataset could not be decoded


def _received(ds: Dataset, relative: str, size: int, *, calling_aet: str, transfer_syntax_uid: str,
              uids: tuple[str, str, str, str]) -> ReceivedInstance:
    study_uid, series_uid, sop_uid, sop_class = uids
    image_type = attr.words(ds, "ImageType")
    return ReceivedInstance(
        study_instance_uid=study_uid, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
        sop_class_uid=sop_class, modality=attr.text(ds, "Modality")[:16],
        accession_number=attr.text(ds, "AccessionNumber")[:16],
        study_date=attr.text(ds, "StudyDate")[:8], study_description=attr.text(ds, "StudyDescription")[:64],
        transfer_syntax_uid=str(transfer_syntax_uid), path=relative, size=size,
        calling_aet=calling_aet, analysable=could_be_analysed(sop_class, image_type),
    )


class Ingest:
    """Stores received instances durably and keeps the study state up to date."""

    def __init__(self, store: InstanceStore, database: Database, triage_log: TriageLog,
                 *, min_free_mb: float = 0.0, reopen_failed: bool = False,
                 resend_wait_seconds: float = 300.0, stable_seconds: float = 30.0) -> None:
        self.store = store
        self.database = database
        self.triage_log = triage_log
        self.min_free_mb = min_free_mb
        self.reopen_failed = reopen_failed  # completion.reopen_failed: a re-send re-opens a failed study
        self.hold = dt.timedelta(seconds=resend_wait_seconds)
        self.quiet = dt.timedelta(seconds=stable_seconds)
        # Study → (when, in monotonic seconds, and how large) its latest refused instance;
        # a lock of its own, so a refusal never waits on a database write that may hang.
        self._refused: dict[str, tuple[float, int]] = {}
        self._refused_lock = threading.Lock()
        self._sending: dict[Hashable, str] = {}  # open association → the study of its latest instance
        # Taken around every change of a hold too, so a renewal never restores a hold that
        # the end of its association has just released.
        self._sending_lock = threading.Lock()

    def receive(self, ds: Dataset, encoded: bytes, *, calling_aet: str, transfer_syntax_uid: str,
                association: Hashable | None = None) -> int:
        """Store `encoded` (the file as received) and record it; returns the status.
        `association`: the open association it came on, which holds its study."""
        try:
            uids = tuple(check_uid(k, attr.uid(ds, k)) for k in
                         ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"))
            study_uid, series_uid, sop_uid, _ = uids
        except InvalidInstance as exc:
            log.warning("refused an instance from %s: %s (status 0xA900)", calling_aet, exc)
            return Status.DATASET_MISMATCH
        except Exception as exc:  # pydicom raises many types for malformed elements
            log.warning("refused an undecodable instance from %s: %s (status 0xC210)", calling_aet, exc)
            return Status.CANNOT_UNDERSTAND
        relative = self.store.instance_path(study_uid, series_uid, sop_uid)
        free = self.store.free_mb()
        if free < self.min_free_mb:
            log.error("refused %s of study %s: %.0f MiB free on the disk of %s, below storage.min_free_mb "
                      "= %d (status 0xA700)", sop_uid, study_uid, free, self.store.root, self.min_free_mb)
            return self._refuse(study_uid, len(encoded))
        try:
            size = self.store.write(relative, encoded)
            item = _received(ds, str(relative), size, calling_aet=calling_aet,
                             transfer_syntax_uid=transfer_syntax_uid, uids=uids)  # type: ignore[arg-type]
            with self.database.write() as session:
                now = utcnow()
                outcome = record_instance(session, item, now, reopen_failed=self.reopen_failed,
                                          held_until=None if association is None else now + self.hold)
        except StorageError as exc:
            log.error("could not store or record %s of study %s: %s (status 0xA700)", sop_uid, study_uid, exc)
            return self._refuse(study_uid, len(encoded))
        except Exception as exc:  # a header value pydicom cannot read (ImageType, …)
            log.warning("refused an undecodable instance from %s: %s (status 0xC210)", calling_aet, exc)
            return Status.CANNOT_UNDERSTAND
        self._log_outcome(ds, outcome, item)
        if association is not None:
            self._sent(association, study_uid)
        return Status.SUCCESS

    def association_ended(self, association: Hashable) -> None:
        """The association is over: the study it was sending is no longer held by it."""
        with self._sending_lock:
            study_uid = self._sending.pop(association, None)
            if study_uid is not None:
                self._release(study_uid)

    def renew_holds(self) -> None:
        """Hold what the open associations are sending for completion.resend_wait_seconds
        from now (every completion.check_interval_seconds, and before each completion
        check): an association that lasts longer keeps its hold, and a study this process
        is receiving too keeps it when another process's association ends. Studies with a
        refused instance are held for completion.stable_seconds from now; once a store
        would succeed again (the holds written, free space and inodes for the largest
        refused instance), that last hold is their whole quiet time and they are let go."""
        with self._refused_lock:
            refused = dict(self._refused)
        cause = None
        if refused:
            needed_mb = max(size for _, size in refused.values()) / 2**20
            cause = self.store.refusal(self.min_free_mb + needed_mb)
        with self._sending_lock:
            sending = set(self._sending.values())
            if sending or refused:
                now = utcnow()
                with self.database.write() as session:
                    hold_studies(session, set(refused) - sending, now + self.quiet)
                    hold_studies(session, sending, now + self.hold)
        if refused and cause is None:
            with self._refused_lock:
                for study_uid, latest in refused.items():
                    if self._refused.get(study_uid) == latest:  # none refused since
                        del self._refused[study_uid]
            log.info("stores succeed again: %d studies with refused instances wait completion.stable_seconds "
                     "(%g s) for their senders' re-sends", len(refused), self.quiet.total_seconds())

    def _refuse(self, study_uid: str, size: int) -> int:
        """Hold `study_uid` for its sender's re-send of the instance refused now."""
        with self._refused_lock:
            self._refused[study_uid] = (time.monotonic(), size)
        return Status.OUT_OF_RESOURCES

    def _sent(self, association: Hashable, study_uid: str) -> None:
        """The association's latest instance is of `study_uid`: a sender that moved on to
        another study has finished the one before, which is no longer held by it."""
        with self._sending_lock:
            previous = self._sending.get(association)
            self._sending[association] = study_uid
            if previous is not None and previous != study_uid:
                self._release(previous)

    def _release(self, study_uid: str) -> None:
        """Release the hold on `study_uid` unless another open association of this process
        is sending it, or one of its instances was refused (`renew_holds` lets it go); the
        caller holds the lock."""
        with self._refused_lock:
            refused = study_uid in self._refused
        if refused or study_uid in self._sending.values():
            return
        try:
            with self.database.write() as session:
                release_hold(session, study_uid, utcnow())
        except StorageError as exc:
            log.warning("study %s: its association ended, but its hold could not be released (%s); it waits at "
                        "most completion.resend_wait_seconds", study_uid, exc)

    def _log_outcome(self, ds: Dataset, outcome: RecordOutcome, item: ReceivedInstance) -> None:
        """Log what an admin should know; the instance is stored whatever happens here."""
        if outcome.sop_uid_also_in:
            log.warning("SOPInstanceUID %s of study %s also exists in study %s; both are kept, each in its "
                        "own study", item.sop_instance_uid, item.study_instance_uid, outcome.sop_uid_also_in)
        if not (outcome.new_study or outcome.reopened):
            return
        note = "new study"
        if outcome.reopened:
            note = "failed study re-opened by an instance sent again (completion.reopen_failed)" \
                if outcome.duplicate else "study re-opened by a new instance"
        try:
            self.triage_log.write(
                "received", item.study_instance_uid, item.accession_number, calling_aet=item.calling_aet,
                note=note,
                patient_name=attr.text(ds, "PatientName"), patient_id=attr.text(ds, "PatientID"),
                patient_birth_date=attr.text(ds, "PatientBirthDate"),
            )
        except OSError as exc:
            log.error("study %s stored, but its triage log event was not written: %s", item.study_instance_uid, exc)
