"""Storage Commitment (Push Model, PS3.4 Annex J) for destinations with commitment = true.

A C-STORE Success says only that a PACS received an object; its Storage Commitment says
it took responsibility for keeping it. After the C-STOREs of a result to such a
destination, the sender records the delivery as `committing` under a new Transaction
UID and asks the destination to commit every object it sent (N-ACTION). The destination
answers with an N-EVENT-REPORT, usually on an association of its own to the node's SCP
(it must know the node's AE title, host and port), sometimes on the requesting one:
either way `Commitments.report` records it. All committed: the delivery is sent, with
committed_at. Some failed, or no report within `delivery.commitment_timeout_seconds`
(`fail_overdue`, a scheduled job), or the N-ACTION refused: a failed attempt, and the
usual back-off sends the objects again and asks again under a new Transaction UID.

Several `serve` processes may share one database, and a report may reach any of them:
it is recorded by one database update keyed by its Transaction UID, nothing is kept in
memory. A report naming a transaction no delivery awaits (unknown, or one that timed
out) is answered, logged, and changes nothing.
"""

from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import StorageCommitmentPushModel
from pynetdicom.status import GENERAL_STATUS

from node.config import Config, Destination
from node.errors import DeliveryError, StorageError
from node.triagelog import TriageLog
from storage.db import Database, DeliveryState, utcnow
from storage.state import commitment_resolved, overdue_commitments
from training.model import attributes as attr

__all__ = ["STORAGE_COMMITMENT_INSTANCE", "REQUEST_COMMITMENT", "ALL_COMMITTED", "SOME_FAILED",
           "new_transaction_uid", "commitment_request", "Commitments"]

log = logging.getLogger(__name__)

STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP Instance (PS3.4 J.3.2)
REQUEST_COMMITMENT = 1  # N-ACTION Action Type ID: Request Storage Commitment
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3)
SUCCESS, PROCESSING_FAILURE, NO_SUCH_EVENT_TYPE, INVALID_ARGUMENT = 0x0000, 0x0110, 0x0113, 0x0115

# Failure Reason (0008,1197) values of a FailedSOPSequence item (PS3.4 J.3.3.1.1).
FAILURE_REASONS = {
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class-instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


def new_transaction_uid() -> str:
    return generate_uid()


def commitment_request(transaction_uid: str, files: list[Path]) -> Dataset:
    """The N-ACTION's Action Information: the Transaction UID and each object sent."""
    request = Dataset()
    request.TransactionUID = transaction_uid
    request.ReferencedSOPSequence = []
    for path in files:
        sent = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        item = Dataset()
        item.ReferencedSOPClassUID = sent.SOPClassUID
        item.ReferencedSOPInstanceUID = sent.SOPInstanceUID
        request.ReferencedSOPSequence.append(item)
    return request


def _failures(report: Dataset) -> str:
    """What a report of event type 2 says was not committed, in words."""
    failed = attr.items(report, "FailedSOPSequence")
    committed = len(attr.items(report, "ReferencedSOPSequence"))
    named = []
    for item in failed[:3]:
        code = attr.integer(item, "FailureReason")
        reason = FAILURE_REASONS.get(code, "unknown reason") if code is not None else "no reason given"
        what = f"0x{code:04X} {reason}" if code is not None else reason
        named.append(f"{attr.uid(item, 'ReferencedSOPInstanceUID') or '?'} ({what})")
    more = f" and {len(failed) - 3} more" if len(failed) > 3 else ""
    return (f"storage commitment refused for {len(failed)} of {len(failed) + committed} objects: "
            f"{'; '.join(named)}{more}")


class Commitments:
    """Asks destinations to commit (N-ACTION) and records what they report, in the database."""

    def __init__(self, config: Config, database: Database, triage_log: TriageLog) -> None:
        self.config = config
        self.database = database
        self.triage_log = triage_log

    def request(self, destination: Destination, transaction_uid: str, files: list[Path]) -> None:
        """Ask `destination` to commit `files` under `transaction_uid` on an association of
        its own, every wait bounded by delivery.timeout_seconds; DeliveryError when it does
        not accept the request. A report sent on this association is recorded too."""
        timeout = self.config.delivery.timeout_seconds
        where = f"{destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"
        try:
            request = commitment_request(transaction_uid, files)
        except (OSError, ValueError, AttributeError) as exc:  # a result file unreadable since it was sent
            raise DeliveryError(f"{where}: the storage commitment request cannot name the objects sent: {exc}") from exc
        ae = AE(ae_title=self.config.calling_ae_title)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
        ae.add_requested_context(StorageCommitmentPushModel, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                             evt_handlers=[(evt.EVT_N_EVENT_REPORT, self.report)])
        if not assoc.is_established:
            raise DeliveryError(f"{where} did not accept an association for Storage Commitment (rejected, "
                                f"unreachable, or no answer within {timeout:g} s)")
        try:
            if not assoc.accepted_contexts:
                raise DeliveryError(f"{where} does not support Storage Commitment (it refused the Push Model SOP "
                                    "Class): enable it at the PACS, or set commitment = false for this destination")
            status, _ = assoc.send_n_action(request, REQUEST_COMMITMENT, StorageCommitmentPushModel,
                                            STORAGE_COMMITMENT_INSTANCE)
            code = getattr(status, "Status", None)
            if code is None:
                raise DeliveryError(f"{where} gave no answer to the storage commitment request (it ended the "
                                    f"association, or did not answer within {timeout:g} s): a PACS refuses the "
                                    f"request of a node it does not know as a modality; give it AE title "
                                    f"{self.config.calling_ae_title}, this host and node.port")
            if code != SUCCESS:
                meaning = GENERAL_STATUS.get(code, ("", "unknown status"))[1]
                raise DeliveryError(f"{where} refused the storage commitment request: status 0x{code:04X} ({meaning})")
        except (OSError, RuntimeError, ValueError) as exc:  # connection lost
            raise DeliveryError(f"{where}: storage commitment request: {type(exc).__name__}: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()

    def report(self, event: Event) -> tuple[int, None]:
        """An N-EVENT-REPORT (on the node's SCP or on a requesting association): record it
        and answer with its status."""
        peer = event.assoc.requestor.ae_title if event.assoc.is_acceptor else event.assoc.acceptor.ae_title
        try:
            report = event.event_information
        except Exception as exc:  # an Event Information pydicom cannot parse
            log.warning("storage commitment report from %s could not be decoded: %s", peer, exc)
            return INVALID_ARGUMENT, None
        event_type = event.request.EventTypeID
        uid = attr.uid(report, "TransactionUID")
        if event_type not in (ALL_COMMITTED, SOME_FAILED):
            log.warning("storage commitment report from %s has event type %s, not 1 or 2; ignored", peer, event_type)
            return NO_SUCH_EVENT_TYPE, None
        if not uid:
            log.warning("storage commitment report from %s has no TransactionUID; ignored", peer)
            return INVALID_ARGUMENT, None
        error = None if event_type == ALL_COMMITTED else _failures(report)
        try:
            known = self.resolve(uid, error, objects=len(attr.items(report, "ReferencedSOPSequence")))
        except StorageError as exc:  # the database is down: the timeout retries the delivery
            log.error("storage commitment report %s from %s could not be recorded: %s", uid, peer, exc)
            return PROCESSING_FAILURE, None
        if not known:
            log.warning("storage commitment report from %s names transaction %s, which no delivery awaits "
                        "(unknown, or already timed out); ignored", peer, uid)
        return SUCCESS, None

    def resolve(self, transaction_uid: str, error: str | None, *, objects: int | None = None) -> bool:
        """End the attempt awaiting `transaction_uid`: committed when `error` is None, else
        failed and retried; False when no delivery awaits it."""
        settings = self.config.delivery
        with self.database.write() as session:
            row = commitment_resolved(session, transaction_uid, error, max_attempts=settings.max_attempts,
                                      initial_backoff=settings.initial_backoff_seconds,
                                      max_backoff=settings.max_backoff_seconds, now=utcnow())
            if row is None:
                return False
            study = row.study
            uid, accession, series = study.study_instance_uid, study.accession_number, study.result_series_uid
            final, attempts, next_at = row.state == DeliveryState.FAILED, row.attempts, row.next_attempt_at
            destination, kind, priority_high = row.destination, row.kind, row.priority_high
        if error is None:
            log.info("%s result of %s committed by %s (transaction %s)", kind, uid, destination, transaction_uid)
            self.triage_log.write("delivered", uid, accession, destination=destination, kind=kind, objects=objects,
                                  priority="HIGH" if priority_high else "MEDIUM", attempts=attempts,
                                  result_series_uid=series, committed=True, transaction_uid=transaction_uid)
            return True
        log.warning("delivery of %s %s to %s: %s (attempt %d)", uid, kind, destination, error, attempts)
        self.triage_log.write(
            "delivery_failed", uid, accession, destination=destination, kind=kind, reason=error, attempts=attempts,
            final=final, next_attempt_at=None if final else next_at.isoformat(timespec="seconds") + "Z",
        )
        return True

    def fail_overdue(self) -> int:
        """Deliveries whose destination has not reported within
        delivery.commitment_timeout_seconds become failed attempts (retried); returns how many."""
        timeout = self.config.delivery.commitment_timeout_seconds
        with self.database.read() as session:
            overdue = overdue_commitments(session, utcnow() - dt.timedelta(seconds=timeout))
        return sum(self.resolve(o.transaction_uid, f"no storage commitment from {o.destination} within {timeout:g} s")
                   for o in overdue)
