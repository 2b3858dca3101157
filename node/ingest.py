"""Receiving one instance: file on disk, row in the database, then the status to answer.

The SCP's C-STORE handler only calls `Ingest.receive`; every failure becomes a DICOM
status here, so no exception reaches pynetdicom. Success means the instance is on disk
and recorded in its study, so it will be analysed; anything less is 0xA700, and the
sender keeps the instance and tries again.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset

from node.triagelog import TriageLog
from storage.db import Database, utcnow
from storage.errors import InvalidInstance, StorageError
from storage.state import ReceivedInstance, RecordOutcome, record_instance
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
        transfer_syntax_uid=str(transfer_syntax_uid), path=relative, size=size,
        calling_aet=calling_aet, analysable=could_be_analysed(sop_class, image_type),
    )


class Ingest:
    """Stores received instances durably and keeps the study state up to date."""

    def __init__(self, store: InstanceStore, database: Database, triage_log: TriageLog,
                 *, min_free_mb: float = 0.0, reopen_failed: bool = False) -> None:
        self.store = store
        self.database = database
        self.triage_log = triage_log
        self.min_free_mb = min_free_mb
        self.reopen_failed = reopen_failed  # completion.reopen_failed: a re-send re-opens a failed study

    def receive(self, ds: Dataset, encoded: bytes, *, calling_aet: str, transfer_syntax_uid: str) -> int:
        """Store `encoded` (the file as received) and record it; returns the status."""
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
            return Status.OUT_OF_RESOURCES
        try:
            size = self.store.write(relative, encoded)
            item = _received(ds, str(relative), size, calling_aet=calling_aet,
                             transfer_syntax_uid=transfer_syntax_uid, uids=uids)  # type: ignore[arg-type]
            with self.database.write() as session:
                outcome = record_instance(session, item, utcnow(), reopen_failed=self.reopen_failed)
        except StorageError as exc:
            log.error("could not store or record %s of study %s: %s (status 0xA700)", sop_uid, study_uid, exc)
            return Status.OUT_OF_RESOURCES
        except Exception as exc:  # a header value pydicom cannot read (ImageType, …)
            log.warning("refused an undecodable instance from %s: %s (status 0xC210)", calling_aet, exc)
            return Status.CANNOT_UNDERSTAND
        self._log_outcome(ds, outcome, item)
        return Status.SUCCESS

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
