"""Notifications: a JSON message to each `[[notify]]` webhook when a study's outcome is
one it asked for, retried like a delivery.

The message is fixed when the outcome is recorded (a row in the same transaction), so a
restart loses none and each is sent once: the process posting it holds a claim on its
row (node.lease), so several `serve` processes never post the same message. Its `text`
line is what Slack-, Mattermost- and Teams-style incoming webhooks display as it is. It
names no patient unless `log.include_patient_identifiers` is set.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
from collections.abc import Mapping

import httpx

from node.config import Config, NotifyOn, NotifyTarget
from node.errors import StorageError
from node.lease import claimant_id, work_claimed
from node.triagelog import PATIENT_KEYS, TriageLog
from storage.db import Database, DeliveryState, utcnow
from storage.state import (
    DueNotification,
    claim_notification,
    notification_attempt_failed,
    notification_sent,
    renew_notification,
)

__all__ = ["analysed_message", "failed_message", "messages_for", "Notifier"]

log = logging.getLogger(__name__)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def analysed_message(study_uid: str, accession: str, fields: Mapping[str, object], *,
                     patient: Mapping[str, str] | None = None) -> dict:
    """The message for an analysed study, from the `analysed` event's fields; `patient`
    (PatientName, PatientID, PatientBirthDate) only when identifiers may be sent. A study
    the model did not answer for says NOT TRIAGED and why, never "not detected"."""
    warnings = "".join(f" [{w}]" for w in fields.get("warnings", []))
    if fields.get("triaged", True):
        flag = "SUSPECTED ICH - PRIORITY" if fields["positive"] else "ICH not detected"
        detail = (f"{fields['positive_slices']} of {fields['total_slices']} slices with P(ICH) > "
                  f"{fields['slice_threshold']}, max {float(fields['study_score']):.2f}")
        keys = ("verdict", "triaged", "positive", "study_score", "positive_slices", "total_slices", "required_slices",
                "slice_threshold", "model", "model_training_data", "warnings")
    else:
        flag = "NOT TRIAGED (no verdict: read as if no triage had run)"
        detail = "; ".join(str(reason["text"]) for reason in fields["not_triaged"])  # type: ignore[index, union-attr]
        keys = ("verdict", "triaged", "positive", "not_triaged", "model", "model_training_data", "warnings")
    text = f"ICH triage: {flag} | accession {accession or '-'} | {detail} | study {study_uid}{warnings}"
    return {"event": "analysed", "time": _now(), "study_instance_uid": study_uid, "accession_number": accession,
            **{key: fields.get(key) for key in keys}, **(patient or {}), "text": text}


def failed_message(study_uid: str, accession: str, reason: str) -> dict:
    """The message for a study that could not be analysed."""
    text = f"ICH triage: NOT ANALYSED | accession {accession or '-'} | {reason} | study {study_uid}"
    return {"event": "failed", "time": _now(), "study_instance_uid": study_uid, "accession_number": accession,
            "reason": reason, "text": text}


def messages_for(targets: tuple[NotifyTarget, ...], message: dict) -> list[tuple[str, str]]:
    """(url, JSON body) for each webhook that asked for this outcome."""
    if message["event"] == "failed":
        wanted = {NotifyOn.FAILED}
    else:
        wanted = {NotifyOn.ALL, NotifyOn.POSITIVE} if message["positive"] else {NotifyOn.ALL}
    body = json.dumps(message, ensure_ascii=False)
    return [(target.url, body) for target in targets if target.on in wanted]


def patient_fields(include: bool, name: str, patient_id: str, birth_date: str) -> dict[str, str] | None:
    return dict(zip(PATIENT_KEYS, (name, patient_id, birth_date))) if include else None


class Notifier:
    """Posts due notifications from a thread of its own, recording each attempt."""

    def __init__(self, config: Config, database: Database, triage_log: TriageLog, owner: str | None = None) -> None:
        self.config = config
        self.database = database
        self.triage_log = triage_log
        self.owner = owner or claimant_id()  # names this process's claims on notifications
        self._due = threading.Event()

    def wake(self) -> None:
        """An outcome was recorded in this process: look now, not at the next poll."""
        self._due.set()

    def start(self, stop: threading.Event) -> threading.Thread:
        thread = threading.Thread(target=self._run, args=[stop], daemon=True, name="notify")
        thread.start()
        return thread

    def _run(self, stop: threading.Event) -> None:
        with httpx.Client(timeout=self.config.delivery.timeout_seconds, follow_redirects=False) as client:
            while not stop.is_set():
                self._due.clear()
                try:
                    sent = self.send_due(client)
                except StorageError as exc:  # unreachable or busy: Database logged the outage
                    if not exc.retryable:
                        log.exception("notifications")
                    sent = 0
                except Exception:  # keep the thread alive whatever happened
                    log.exception("notifications")
                    sent = 0
                if not sent:  # idle: poll each second for outcomes other processes recorded
                    self._due.wait(1.0)

    def send_due(self, client: httpx.Client, *, limit: int = 16) -> int:
        """Claim and post notifications while any is due (at most `limit`); returns how many."""
        def claim() -> DueNotification | None:
            with self.database.write() as session:
                return claim_notification(session, self.owner, utcnow(),
                                          stale_seconds=self.config.worker.stale_after_seconds)

        return work_claimed(claim, self._renew, lambda notification: self._attempt(client, notification),
                            every=self.config.worker.heartbeat_seconds, what="notification", limit=limit)

    def _renew(self, notification_id: int) -> bool:
        with self.database.write() as session:
            return renew_notification(session, notification_id, self.owner, utcnow())

    def _attempt(self, client: httpx.Client, notification: DueNotification) -> None:
        try:
            response = client.post(notification.url, content=notification.payload.encode("utf-8"),
                                   headers={"Content-Type": "application/json"})
            failure = None if response.is_success else f"{notification.url} answered HTTP {response.status_code}"
        except httpx.HTTPError as exc:
            failure = f"{notification.url}: {type(exc).__name__}: {exc or 'no answer'}"
        settings = self.config.delivery
        with self.database.write() as session:
            if failure is None:
                row = notification_sent(session, notification.id, self.owner, utcnow())
            else:
                row = notification_attempt_failed(
                    session, notification.id, self.owner, failure, max_attempts=settings.max_attempts,
                    initial_backoff=settings.initial_backoff_seconds, max_backoff=settings.max_backoff_seconds,
                    now=utcnow())
            if row is None:
                log.warning("notification %d: another process had taken it over meanwhile; it records the outcome",
                            notification.id)
                return
            attempts, final, next_at = row.attempts, row.state == DeliveryState.FAILED, row.next_attempt_at
        if failure is None:
            self.triage_log.write("notified", notification.study_instance_uid, notification.accession_number,
                                  url=notification.url, attempts=attempts)
            return
        log.warning("notification %d: %s (attempt %d)", notification.id, failure, attempts)
        self.triage_log.write(
            "notify_failed", notification.study_instance_uid, notification.accession_number, url=notification.url,
            reason=failure, attempts=attempts, final=final,
            next_attempt_at=None if final else next_at.isoformat(timespec="seconds") + "Z")
