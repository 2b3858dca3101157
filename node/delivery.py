"""Sending result series to the configured PACS, with retries that survive restarts.

`Sender` is the seam: `DicomSender` speaks C-STORE; tests may pass any object with the
same `send` method.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Protocol

import pydicom
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from sqlalchemy.orm import sessionmaker

from node.config import Config, Destination
from node.errors import DeliveryError
from node.triagelog import TriageLog
from storage.db import utcnow
from storage.state import delivery_attempt_failed, delivery_sent, due_deliveries
from storage.store import InstanceStore

__all__ = ["Sender", "DicomSender", "deliver_due"]

log = logging.getLogger(__name__)

PRIORITY_MEDIUM, PRIORITY_HIGH = 0, 1  # C-STORE Priority (PS3.7 9.1.1.1)
# Success, and the warnings that still mean "stored" (coercion, elements discarded).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class Sender(Protocol):
    def send(self, destination: Destination, files: list[Path], *, priority_high: bool) -> None:
        """Store every file at `destination` or raise DeliveryError."""


class DicomSender:
    """C-STORE SCU: one association per delivery."""

    def __init__(self, calling_ae_title: str, timeout_seconds: float) -> None:
        self.calling_ae_title = calling_ae_title
        self.timeout_seconds = timeout_seconds

    def send(self, destination: Destination, files: list[Path], *, priority_high: bool) -> None:
        ae = AE(ae_title=self.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_seconds
        ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
        if not assoc.is_established:
            state = "rejected the association" if assoc.is_rejected else "could not be reached"
            raise DeliveryError(f"{where} {state}")
        try:
            self._store_all(assoc, where, files, priority_high)
        finally:
            if assoc.is_established:
                assoc.release()

    @staticmethod
    def _store_all(assoc, where: str, files: list[Path], priority_high: bool) -> None:
        try:
            for path in files:
                status = assoc.send_c_store(
                    pydicom.dcmread(path), priority=PRIORITY_HIGH if priority_high else PRIORITY_MEDIUM
                )
                code = getattr(status, "Status", None)
                if code not in _STORED:
                    shown = "no response" if code is None else f"status 0x{code:04X}"
                    raise DeliveryError(f"{where} did not store {path.name}: {shown}")
        except (OSError, RuntimeError, ValueError) as exc:  # connection lost, unreadable file
            raise DeliveryError(f"{where}: {type(exc).__name__}: {exc}") from exc


def deliver_due(
    config: Config, sessions: sessionmaker, store: InstanceStore, sender: Sender, triage_log: TriageLog
) -> int:
    """Attempt every delivery that is due; returns how many were attempted."""
    destinations = {d.name: d for d in config.destinations}
    settings = config.delivery
    with sessions() as session:
        due = due_deliveries(session, utcnow())
        for delivery in due:
            study = delivery.study
            destination = destinations.get(delivery.destination)
            files = sorted(store.absolute(delivery.result_folder).glob("*.dcm"))
            try:
                if destination is None:
                    raise DeliveryError(f"destination {delivery.destination!r} is no longer in the config")
                if not files:
                    raise DeliveryError(f"result folder {delivery.result_folder} holds no objects")
                sender.send(destination, files, priority_high=delivery.priority_high)
            except DeliveryError as exc:
                failed = delivery_attempt_failed(
                    session, delivery, str(exc), max_attempts=settings.max_attempts,
                    initial_backoff=settings.initial_backoff_seconds,
                    max_backoff=settings.max_backoff_seconds, now=utcnow(),
                )
                log.warning("delivery %d: %s (attempt %d)", delivery.id, exc, delivery.attempts)
                triage_log.write(
                    "delivery_failed", study.study_instance_uid, study.accession_number,
                    destination=delivery.destination, reason=str(exc), attempts=delivery.attempts,
                    final=failed,
                    next_attempt_at=None if failed else delivery.next_attempt_at.isoformat(timespec="seconds") + "Z",
                )
                continue
            delivery_sent(session, delivery, utcnow())
            triage_log.write(
                "delivered", study.study_instance_uid, study.accession_number,
                destination=delivery.destination, objects=len(files),
                priority="HIGH" if delivery.priority_high else "MEDIUM", attempts=delivery.attempts,
                result_series_uid=study.result_series_uid,
            )
        return len(due)
