"""Receiving one instance: file on disk, row in the database, then the status to answer.

The SCP's C-STORE handler only calls `Ingest.receive`; every failure becomes a DICOM
status here, so no exception reaches pynetdicom.
"""

from __future__ import annotations

import logging

from pydicom.dataset import Dataset
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import sessionmaker

from node.errors import InvalidInstance, StorageError
from node.triagelog import TriageLog
from storage.db import utcnow
from storage.state import ReceivedInstance, record_instance
from storage.store import InstanceStore, check_uid

__all__ = ["Status", "ANALYSABLE_SOP_CLASSES", "Ingest"]

log = logging.getLogger(__name__)

# CT Image Storage, Enhanced CT Image Storage: the objects that can be analysed.
ANALYSABLE_SOP_CLASSES = frozenset({"1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1"})


class Status:
    """C-STORE status codes the node answers (PS3.4 Annex B)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # the instance could not be stored
    DATASET_MISMATCH = 0xA900  # required identifiers missing or invalid
    CANNOT_UNDERSTAND = 0xC210  # the dataset could not be decoded


class Ingest:
    """Stores received instances durably and keeps the study state up to date."""

    def __init__(self, store: InstanceStore, sessions: sessionmaker, triage_log: TriageLog,
                 *, min_free_mb: float = 0.0) -> None:
        self.store = store
        self.sessions = sessions
        self.triage_log = triage_log
        self.min_free_mb = min_free_mb

    def receive(self, ds: Dataset, encoded: bytes, *, calling_aet: str, transfer_syntax_uid: str) -> int:
        """Store `encoded` (the file as received) and record it; returns the status."""
        try:
            study_uid = check_uid("StudyInstanceUID", ds.get("StudyInstanceUID"))
            series_uid = check_uid("SeriesInstanceUID", ds.get("SeriesInstanceUID"))
            sop_uid = check_uid("SOPInstanceUID", ds.get("SOPInstanceUID"))
            sop_class = check_uid("SOPClassUID", ds.get("SOPClassUID"))
            accession = str(ds.get("AccessionNumber", "") or "")[:16]
            modality = str(ds.get("Modality", "") or "")[:16]
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
        except StorageError as exc:
            log.error("could not store %s of study %s: %s (status 0xA700)", sop_uid, study_uid, exc)
            return Status.OUT_OF_RESOURCES
        item = ReceivedInstance(
            study_instance_uid=study_uid, series_instance_uid=series_uid, sop_instance_uid=sop_uid,
            sop_class_uid=sop_class, modality=modality, accession_number=accession,
            transfer_syntax_uid=str(transfer_syntax_uid), path=str(relative), size=size,
            calling_aet=calling_aet, analysable=sop_class in ANALYSABLE_SOP_CLASSES,
        )
        try:
            with self.sessions.begin() as session:
                outcome = record_instance(session, item, utcnow())
        except SQLAlchemyError as exc:
            log.error("could not record %s of study %s: %s (status 0xA700)", sop_uid, study_uid, exc)
            return Status.OUT_OF_RESOURCES
        if outcome.new_study or outcome.reopened:
            self.triage_log.write(
                "received", study_uid, accession, calling_aet=calling_aet,
                note="study re-opened by a new instance" if outcome.reopened else "new study",
                patient_name=str(ds.get("PatientName", "")), patient_id=str(ds.get("PatientID", "")),
                patient_birth_date=str(ds.get("PatientBirthDate", "")),
            )
        return Status.SUCCESS
