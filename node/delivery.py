"""Sending result series to the configured PACS, with retries that survive restarts.

Each destination has a sending thread of its own, so a PACS that stalls delays only its
own results, never another destination's or ingest. No database transaction is open
while a result is on the wire: a due delivery is claimed in one short transaction, sent
while the claim is kept alive (node.lease), and its outcome recorded in another. Several
`serve` processes on one database each send only what they claimed, so a result goes
out once; one that dies mid-send is taken over when its claim goes stale (the PACS then
gets the same objects, same SOPInstanceUIDs, a second time if the first send had reached
it). Every step of a send is bounded by `delivery.timeout_seconds` (TCP connect,
association, each PDU, each response; for a DICOMweb destination the connect and each
read of the answer, by its own `timeout_seconds` when set).

`Sender` is the seam: `DicomSender` speaks C-STORE, `node.stow_out.DicomwebSender`
STOW-RS, and `senders(config)` routes each destination to the one its `kind` names;
tests may pass any object with the same `send` method. A DIMSE destination with
commitment = true is then asked to commit what it stored (node.commitment), and the
delivery counts as sent only once it has.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Protocol

import pydicom
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
from pynetdicom.sop_class import (
    Comprehensive3DSRStorage,
    KeyObjectSelectionDocumentStorage,
    SecondaryCaptureImageStorage,
)
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from node.commitment import Commitments, new_transaction_uid
from node.config import Config, Destination, DestinationKind
from node.errors import DeliveryError, StorageError
from node.lease import claimant_id, work_claimed
from node.stow_out import DicomwebSender
from node.triagelog import TriageLog
from storage.db import Database, DeliveryState, utcnow
from storage.state import (
    DueDelivery,
    claim_delivery,
    delivery_attempt_failed,
    delivery_committing,
    delivery_sent,
    renew_delivery,
)
from storage.store import InstanceStore

__all__ = ["Sender", "DicomSender", "SenderByKind", "senders", "Deliveries"]

log = logging.getLogger(__name__)

PRIORITY_MEDIUM, PRIORITY_HIGH = 0, 1  # C-STORE Priority (PS3.7 9.1.1.1)
BATCH = 16  # deliveries one sending thread attempts before it looks at `stop` again
# Success, and the warnings that still mean "stored" (coercion, elements discarded).
_STORED = {0x0000, 0xB000, 0xB006, 0xB007}


class Sender(Protocol):
    def send(self, destination: Destination, files: list[Path], *, priority_high: bool) -> None:
        """Store every file at `destination` or raise DeliveryError."""


def _peer_said(primitive: object) -> str:
    """What an A-ASSOCIATE-RJ or A-ABORT from the peer said, in words."""
    if isinstance(primitive, A_ASSOCIATE) and primitive.result in (0x01, 0x02):
        return f"{primitive.result_str.lower()} by the {primitive.source_str.lower()}: {primitive.reason_str}"
    if isinstance(primitive, A_P_ABORT):
        return f"provider abort (reason {primitive.provider_reason})"
    if isinstance(primitive, A_ABORT):
        return f"abort from the {'acceptor' if primitive.abort_source == 0x02 else 'peer'}"
    return ""


class DicomSender:
    """C-STORE SCU: one association per delivery, every wait bounded."""

    def __init__(self, calling_ae_title: str, timeout_seconds: float) -> None:
        self.calling_ae_title = calling_ae_title
        self.timeout_seconds = timeout_seconds

    def send(self, destination: Destination, files: list[Path], *, priority_high: bool) -> None:
        ae = AE(ae_title=self.calling_ae_title)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_seconds
        for sop_class in (SecondaryCaptureImageStorage, Comprehensive3DSRStorage, KeyObjectSelectionDocumentStorage):
            ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        where = f"{destination.name} ({destination.described})"
        heard: list[object] = []  # the peer's last association-control message

        def remember(event: Event) -> None:
            heard.append(event.primitive)

        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[(evt.EVT_ACSE_RECV, remember)])
        if not assoc.is_established:
            said = _peer_said(heard[-1]) if heard else ""
            if assoc.is_rejected:
                raise DeliveryError(f"{where} rejected the association ({said})")
            if said:
                raise DeliveryError(f"{where} ended the association request ({said})")
            raise DeliveryError(f"{where} could not be reached, or did not answer the association request "
                                f"within {self.timeout_seconds:g} s")
        try:
            self._store_all(assoc, where, files, priority_high, heard)
        finally:
            if assoc.is_established:
                assoc.release()

    def _store_all(self, assoc, where: str, files: list[Path], priority_high: bool, heard: list[object]) -> None:
        try:
            for path in files:
                status = assoc.send_c_store(
                    pydicom.dcmread(path), priority=PRIORITY_HIGH if priority_high else PRIORITY_MEDIUM
                )
                code = getattr(status, "Status", None)
                if code is None:
                    said = _peer_said(heard[-1]) if heard else ""
                    why = (f"the association was aborted ({said})" if assoc.is_aborted and said else
                           f"no response within {self.timeout_seconds:g} s")
                    raise DeliveryError(f"{where} did not store {path.name}: {why}")
                if code not in _STORED:
                    meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))[1]
                    raise DeliveryError(f"{where} refused {path.name}: status 0x{code:04X} ({meaning})")
        except (OSError, RuntimeError, ValueError) as exc:  # connection lost, unreadable file
            raise DeliveryError(f"{where}: {type(exc).__name__}: {exc}") from exc


class SenderByKind:
    """A Sender that hands each send to the sender for its destination's kind."""

    def __init__(self, by_kind: dict[DestinationKind, Sender]) -> None:
        self.by_kind = by_kind

    def send(self, destination: Destination, files: list[Path], *, priority_high: bool) -> None:
        self.by_kind[destination.kind].send(destination, files, priority_high=priority_high)


def senders(config: Config) -> SenderByKind:
    """C-STORE for kind "dimse" destinations, STOW-RS for kind "dicomweb", each bounded by
    `delivery.timeout_seconds` (a DICOMweb destination's own timeout_seconds wins)."""
    timeout = config.delivery.timeout_seconds
    return SenderByKind({DestinationKind.DIMSE: DicomSender(config.calling_ae_title, timeout),
                         DestinationKind.DICOMWEB: DicomwebSender(timeout)})


class Deliveries:
    """Sends due results, one thread per destination, and records each attempt."""

    def __init__(self, config: Config, database: Database, store: InstanceStore, sender: Sender,
                 triage_log: TriageLog, owner: str | None = None, commitments: Commitments | None = None) -> None:
        self.config = config
        self.database = database
        self.store = store
        self.sender = sender
        self.triage_log = triage_log
        self.commitments = commitments or Commitments(config, database, triage_log)
        self.owner = owner or claimant_id()  # names this process's claims on deliveries
        self._due = {d.name: threading.Event() for d in config.destinations}

    def wake(self) -> None:
        """Something new may be due (a result recorded in this process): look now, not at
        the next poll."""
        for event in self._due.values():
            event.set()

    def start(self, stop: threading.Event) -> list[threading.Thread]:
        """One sending thread per destination, running until `stop` is set."""
        threads = [threading.Thread(target=self._run, args=[destination, stop], daemon=True,
                                    name=f"deliver-{destination.name}")
                   for destination in self.config.destinations]
        for thread in threads:
            thread.start()
        return threads

    def _run(self, destination: Destination, stop: threading.Event) -> None:
        due = self._due[destination.name]
        while not stop.is_set():
            due.clear()
            try:
                sent = self.send_due(destination)
            except StorageError as exc:  # unreachable or busy: Database logged the outage
                if not exc.retryable:
                    log.exception("delivery to %s", destination.name)
                sent = 0
            except Exception:  # keep the thread alive whatever happened
                log.exception("delivery to %s", destination.name)
                sent = 0
            if not sent:  # idle: poll each second for results other processes recorded
                due.wait(1.0)

    def send_due(self, destination: Destination) -> int:
        """Claim and attempt deliveries to `destination` while any is due (at most BATCH);
        returns how many."""
        return self._work(destination, destination=destination.name)

    def fail_orphans(self) -> int:
        """Deliveries to a destination no longer in the config get the usual retries and
        then fail, so `ichnode retry` can send them once it is back."""
        return self._work(None, other_than=[d.name for d in self.config.destinations])

    def _work(self, to: Destination | None, **which: object) -> int:
        """Claim deliveries `which` selects and send each to `to` (None: no longer configured)."""
        def claim() -> DueDelivery | None:
            with self.database.write() as session:
                return claim_delivery(session, self.owner, utcnow(),
                                      stale_seconds=self.config.worker.stale_after_seconds, **which)

        return work_claimed(claim, self._renew, lambda delivery: self._attempt(delivery, to),
                            every=self.config.worker.heartbeat_seconds, what="delivery", limit=BATCH)

    def _renew(self, delivery_id: int) -> bool:
        with self.database.write() as session:
            return renew_delivery(session, delivery_id, self.owner, utcnow())

    def _attempt(self, delivery: DueDelivery, destination: Destination | None) -> None:
        files = sorted(self.store.absolute(delivery.result_folder).glob(f"{delivery.kind}-*.dcm"))
        try:
            if destination is None:
                raise DeliveryError(f"destination {delivery.destination!r} is no longer in the config")
            if not files:
                raise DeliveryError(f"result folder {delivery.result_folder} holds no {delivery.kind} objects")
            self.sender.send(destination, files, priority_high=delivery.priority_high)
        except DeliveryError as exc:
            self._failed(delivery, str(exc))
            return
        if destination.commitment:
            self._ask_commitment(delivery, destination, files)
            return
        with self.database.write() as session:
            row = delivery_sent(session, delivery.id, self.owner, utcnow())
            attempts = row.attempts if row is not None else None
        if attempts is None:
            log.warning("delivery %d was sent, but another process had taken it over meanwhile (this one stopped "
                        "renewing its claim); that process records it", delivery.id)
            return
        self.triage_log.write(
            "delivered", delivery.study_instance_uid, delivery.accession_number,
            destination=delivery.destination, kind=delivery.kind, objects=len(files),
            priority="HIGH" if delivery.priority_high else "MEDIUM", attempts=attempts,
            result_series_uid=delivery.result_series_uid,
        )

    def _ask_commitment(self, delivery: DueDelivery, destination: Destination, files: list[Path]) -> None:
        """Stored: record the delivery as awaiting commitment, then ask for it (recorded
        first, so that a report arriving at once finds its transaction)."""
        transaction_uid = new_transaction_uid()
        with self.database.write() as session:
            row = delivery_committing(session, delivery.id, self.owner, transaction_uid, utcnow())
        if row is None:
            log.warning("delivery %d was stored, but another process had taken it over meanwhile (this one stopped "
                        "renewing its claim); that process asks for its commitment", delivery.id)
            return
        self.triage_log.write(
            "awaiting_commitment", delivery.study_instance_uid, delivery.accession_number,
            destination=delivery.destination, kind=delivery.kind, objects=len(files),
            transaction_uid=transaction_uid, result_series_uid=delivery.result_series_uid,
        )
        try:
            self.commitments.request(destination, transaction_uid, files)
        except DeliveryError as exc:
            self.commitments.resolve(transaction_uid, str(exc))

    def _failed(self, delivery: DueDelivery, reason: str) -> None:
        settings = self.config.delivery
        with self.database.write() as session:
            row = delivery_attempt_failed(
                session, delivery.id, self.owner, reason, max_attempts=settings.max_attempts,
                initial_backoff=settings.initial_backoff_seconds, max_backoff=settings.max_backoff_seconds,
                now=utcnow(),
            )
            if row is None:
                log.warning("delivery %d: %s; another process had taken it over meanwhile", delivery.id, reason)
                return
            final, attempts, next_at = row.state == DeliveryState.FAILED, row.attempts, row.next_attempt_at
        log.warning("delivery %d: %s (attempt %d)", delivery.id, reason, attempts)
        self.triage_log.write(
            "delivery_failed", delivery.study_instance_uid, delivery.accession_number,
            destination=delivery.destination, kind=delivery.kind, reason=reason, attempts=attempts, final=final,
            next_attempt_at=None if final else next_at.isoformat(timespec="seconds") + "Z",
        )
