"""Notifications: a JSON message to each `[[notify]]` webhook when a study's outcome is
one it asked for, retried like a delivery.

The message is fixed when the outcome is recorded (a row in the same transaction), so a
restart loses none and each is sent once: the process posting it holds a claim on its
row (node.lease), so several `serve` processes never post the same message. Its `text`
line is what Slack-, Mattermost- and Teams-style incoming webhooks display, with the
text that came from DICOM headers escaped for that chat's format (`format`); the other
fields carry the values as they are. It names no patient unless
`log.include_patient_identifiers` is set.

Each webhook URL has a sending thread of its own, so a receiver that stalls delays only
its own messages. A POST ends within the webhook's `timeout_seconds` in all, whatever
the receiver does (httpx's timeouts bound each read, not the exchange), and at once when
the node stops: the message then stays queued, unclaimed, with no attempt counted. Only
the status decides; at most EXCERPT_BYTES of a refusal's body are read, to say why. A
webhook URL is shown only as `redact_url` shows it: its path is often its secret.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import socket
import threading
import time
import unicodedata
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from node.config import ChatFormat, Config, NotifyOn, NotifyTarget, redact_url
from node.errors import StorageError
from node.lease import claimant_id, work_claimed
from node.triagelog import PATIENT_KEYS, TriageLog
from storage.db import Database, DeliveryState, utcnow
from storage.state import (
    DueNotification,
    claim_notification,
    notification_attempt_failed,
    notification_sent,
    release_notification,
    renew_notification,
)

__all__ = ["analysed_message", "failed_message", "messages_for", "chat_format", "escape", "Webhook", "webhooks",
           "Stopped", "post", "Notifier"]

log = logging.getLogger(__name__)

BATCH = 16  # notifications one sending thread attempts before it looks at `stop` again
CHECK_SECONDS = 0.2  # how often a POST in flight looks at its deadline and at `stop`
EXCERPT_BYTES = 512  # of a refusal's body, to say why (Slack answers `no_service`, `invalid_token`, …)
STOP_SECONDS = 5.0  # stopping waits this long for the sending threads (systemd allows 90 s for all of it)
SLACK_HOSTS = ("hooks.slack.com",)


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def analysed_message(study_uid: str, accession: str, fields: Mapping[str, object], *,
                     patient: Mapping[str, str] | None = None) -> dict:
    """The message for an analysed study, from the `analysed` event's fields; `patient`
    (PatientName, PatientID, PatientBirthDate) only when identifiers may be sent. A study
    the model did not answer for says NOT TRIAGED and why, never "not detected". Its
    `text` is written per webhook (messages_for)."""
    if fields.get("triaged", True):
        keys = ("verdict", "triaged", "positive", "study_score", "positive_slices", "total_slices", "required_slices",
                "slice_threshold", "model", "model_training_data", "warnings")
    else:
        keys = ("verdict", "triaged", "positive", "not_triaged", "model", "model_training_data", "warnings")
    return {"event": "analysed", "time": _now(), "study_instance_uid": study_uid, "accession_number": accession,
            **{key: fields.get(key) for key in keys}, **(patient or {})}


def failed_message(study_uid: str, accession: str, reason: str) -> dict:
    """The message for a study that could not be analysed."""
    return {"event": "failed", "time": _now(), "study_instance_uid": study_uid, "accession_number": accession,
            "reason": reason}


def _chat_line(message: Mapping[str, Any], chat: ChatFormat) -> str:
    """The line a chat shows, with every value that came from DICOM (accession, UID,
    reasons, warnings) escaped for `chat`."""
    def text(value: object) -> str:
        return escape(str(value), chat)

    accession, uid = text(message["accession_number"]) or "-", text(message["study_instance_uid"])
    if message["event"] == "failed":
        return f"ICH triage: NOT ANALYSED | accession {accession} | {text(message['reason'])} | study {uid}"
    warnings = "".join(f" [{text(w)}]" for w in message.get("warnings") or [])
    if message.get("triaged") is False:
        flag = "NOT TRIAGED (no verdict: read as if no triage had run)"
        detail = "; ".join(text(reason["text"]) for reason in message["not_triaged"])
    else:
        flag = "SUSPECTED ICH - PRIORITY" if message["positive"] else "ICH not detected"
        detail = (f"{message['positive_slices']} of {message['total_slices']} slices with P(ICH) > "
                  f"{message['slice_threshold']}, max {float(message['study_score']):.2f}")
    return f"ICH triage: {flag} | accession {accession} | {detail} | study {uid}{warnings}"


# Line and paragraph breaks, other control characters and invisible format characters
# (bidirectional overrides among them): in a chat line they would start a forged line
# or reorder what is shown.
_BREAKING = {"Cc", "Cf", "Zl", "Zp"}
_SLACK = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})
# Markdown's inline controls (emphasis, code, links, autolinks, HTML, entities) lose
# their meaning behind a backslash; a word joiner after "@" keeps @channel/@all text.
_MARKDOWN = str.maketrans({**{c: "\\" + c for c in "\\`*_~[]<>&"}, "@": "@\u2060"})


def chat_format(target: NotifyTarget) -> ChatFormat:
    """The format `target` asked for; for "auto", Slack's from its host, else Markdown,
    which Mattermost, Teams and most other chats render."""
    if target.format != ChatFormat.AUTO:
        return target.format
    host = urllib.parse.urlsplit(target.url).hostname or ""
    return ChatFormat.SLACK if host in SLACK_HOSTS else ChatFormat.MARKDOWN


def escape(text: str, chat: ChatFormat) -> str:
    """`text` as `chat` shows it literally, on one line; PLAIN leaves it as it is."""
    if chat == ChatFormat.PLAIN:
        return text
    line = "".join(" " if unicodedata.category(c) in _BREAKING else c for c in text)
    return line.translate(_SLACK if chat == ChatFormat.SLACK else _MARKDOWN)


def messages_for(targets: tuple[NotifyTarget, ...], message: dict) -> list[tuple[str, str]]:
    """(url, JSON body) for each webhook that asked for this outcome, its `text` line
    escaped for that webhook's chat format."""
    if message["event"] == "failed":
        wanted = {NotifyOn.ALL, NotifyOn.FAILED}
    else:
        wanted = {NotifyOn.ALL, NotifyOn.POSITIVE} if message["positive"] else {NotifyOn.ALL}
    return [(target.url, json.dumps({**message, "text": _chat_line(message, chat_format(target))}, ensure_ascii=False))
            for target in targets if target.on in wanted]


def patient_fields(include: bool, name: str, patient_id: str, birth_date: str) -> dict[str, str] | None:
    return dict(zip(PATIENT_KEYS, (name, patient_id, birth_date))) if include else None


@dataclass(frozen=True)
class Webhook:
    """One webhook URL, however many [[notify]] entries name it."""

    url: str
    timeout_seconds: float


def webhooks(targets: tuple[NotifyTarget, ...]) -> tuple[Webhook, ...]:
    """Each URL once, with the longest timeout its entries set."""
    timeouts: dict[str, float] = {}
    for target in targets:
        timeouts[target.url] = max(timeouts.get(target.url, 0.0), target.timeout_seconds)
    return tuple(Webhook(url, seconds) for url, seconds in timeouts.items())


class Stopped(Exception):
    """The node stopped before the webhook answered: no attempt was made."""


class _Cutoff:
    """Ends a POST at its deadline or once `stop` is set, whatever the receiver does: a
    guard thread shuts the connection's socket down, which wakes a read blocked in the
    sending thread. The socket comes from httpcore's `trace` hook (a duplicate handle, as
    TLS takes the original over)."""

    def __init__(self, seconds: float, stop: threading.Event) -> None:
        self._deadline = time.monotonic() + seconds
        self._stop = stop
        self._finished = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self.why: str | None = None  # "deadline" or "stop", once it cut
        self._guard = threading.Thread(target=self._watch, daemon=True, name="notify-cutoff")

    def trace(self, event: str, info: dict[str, Any]) -> None:
        if event != "connection.connect_tcp.complete":
            return
        sock = info["return_value"].get_extra_info("socket").dup()
        with self._lock:
            self._sockets.append(sock)
            if self.why is not None:  # cut while connecting
                _shut(sock)

    def _watch(self) -> None:
        while not self._finished.wait(max(0.0, min(CHECK_SECONDS, self._deadline - time.monotonic()))):
            why = "stop" if self._stop.is_set() else "deadline" if time.monotonic() >= self._deadline else None
            if why is not None:
                with self._lock:
                    self.why = why
                    for sock in self._sockets:
                        _shut(sock)
                return

    def __enter__(self) -> "_Cutoff":
        self._guard.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._finished.set()
        self._guard.join()
        for sock in self._sockets:
            sock.close()


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # already closed by the other side
        pass


def post(client: httpx.Client, url: str, body: bytes, *, timeout: float, stop: threading.Event) -> str | None:
    """POST `body` to `url`: None when it answered 2xx, else why not (the URL redacted).
    Ends within `timeout` s in all; raises Stopped when `stop` cut it off before an
    answer."""
    shown = redact_url(url)
    with _Cutoff(timeout, stop) as cutoff:
        try:
            with client.stream("POST", url, content=body, extensions={"trace": cutoff.trace},
                               headers={"Content-Type": "application/json", "Accept-Encoding": "identity"}) as answer:
                if answer.is_success:
                    return None
                return f"{shown} answered HTTP {answer.status_code}{_excerpt(answer)}"
        except httpx.HTTPError as exc:
            if cutoff.why == "stop":
                raise Stopped from exc
            if cutoff.why == "deadline":
                return f"{shown} gave no complete answer within {timeout:g} s"
            return f"{shown}: {type(exc).__name__}: {str(exc).replace(url, shown) or 'no answer'}"


def _excerpt(answer: httpx.Response) -> str:
    """': ' and the start of a refusal's body on one line, read no further than
    EXCERPT_BYTES (each read takes at most 64 KiB); the status is the answer, so a body
    that breaks off is no error."""
    head = b""
    try:
        for chunk in answer.iter_raw():
            head += chunk
            if len(head) >= EXCERPT_BYTES:
                break
    except httpx.HTTPError:
        pass
    text = " ".join("".join(c for c in head[:EXCERPT_BYTES].decode("utf-8", "replace")
                            if c.isprintable() or c.isspace()).split())
    return f": {text[:200]}" if text else ""


class Notifier:
    """Posts due notifications, one thread per webhook URL, recording each attempt."""

    def __init__(self, config: Config, database: Database, triage_log: TriageLog, owner: str | None = None) -> None:
        self.config = config
        self.database = database
        self.triage_log = triage_log
        self.owner = owner or claimant_id()  # names this process's claims on notifications
        self.webhooks = webhooks(config.notify)
        self._due = {webhook.url: threading.Event() for webhook in self.webhooks}
        self._threads: list[threading.Thread] = []

    def wake(self) -> None:
        """An outcome was recorded in this process: look now, not at the next poll."""
        for event in self._due.values():
            event.set()

    def start(self, stop: threading.Event) -> list[threading.Thread]:
        """One sending thread per webhook URL, running until `stop` is set. Their names
        number the webhooks: a URL is no thread name."""
        self._threads = [threading.Thread(target=self._run, args=[webhook, stop], daemon=True, name=f"notify-{i}")
                         for i, webhook in enumerate(self.webhooks)]
        for thread in self._threads:
            thread.start()
        return self._threads

    def join(self, timeout: float = STOP_SECONDS) -> None:
        """Wait, once `stop` is set, at most `timeout` s in all for the sending threads. One
        still connecting is left behind (it is a daemon): its claim goes stale, and the
        message is sent after the restart."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        left = sum(thread.is_alive() for thread in self._threads)
        if left:
            log.warning("%d webhook sending threads did not stop within %g s; their messages stay queued", left,
                        timeout)

    def _run(self, webhook: Webhook, stop: threading.Event) -> None:
        due = self._due[webhook.url]
        # A connection per POST: the cut-off needs each one's socket from its connect.
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=webhook.timeout_seconds, follow_redirects=False, limits=limits) as client:
            while not stop.is_set():
                due.clear()
                try:
                    sent = self.send_due(client, webhook, stop)
                except StorageError as exc:  # unreachable or busy: Database logged the outage
                    if not exc.retryable:
                        log.exception("notifications to %s", redact_url(webhook.url))
                    sent = 0
                except Exception:  # keep the thread alive whatever happened
                    log.exception("notifications to %s", redact_url(webhook.url))
                    sent = 0
                if not sent:  # idle: poll each second for outcomes other processes recorded
                    due.wait(1.0)

    def send_due(self, client: httpx.Client, webhook: Webhook, stop: threading.Event) -> int:
        """Claim and post notifications to `webhook` while any is due (at most BATCH) and
        `stop` is not set; returns how many."""
        def claim() -> DueNotification | None:
            if stop.is_set():
                return None
            with self.database.write() as session:
                return claim_notification(session, self.owner, utcnow(),
                                          stale_seconds=self.config.worker.stale_after_seconds, url=webhook.url)

        return work_claimed(claim, self._renew, lambda notification: self._attempt(client, webhook, notification, stop),
                            every=self.config.worker.heartbeat_seconds, what="notification", limit=BATCH)

    def fail_orphans(self) -> int:
        """Notifications to a URL no longer in the config get the usual retries and then
        fail, so `ichnode retry` sends them once it is back."""
        def claim() -> DueNotification | None:
            with self.database.write() as session:
                return claim_notification(session, self.owner, utcnow(),
                                          stale_seconds=self.config.worker.stale_after_seconds,
                                          other_than=[webhook.url for webhook in self.webhooks])

        return work_claimed(
            claim, self._renew,
            lambda n: self._record(n, f"{redact_url(n.url)} is no longer the url of a [[notify]] entry"),
            every=self.config.worker.heartbeat_seconds, what="notification", limit=BATCH)

    def _renew(self, notification_id: int) -> bool:
        with self.database.write() as session:
            return renew_notification(session, notification_id, self.owner, utcnow())

    def _attempt(self, client: httpx.Client, webhook: Webhook, notification: DueNotification,
                 stop: threading.Event) -> None:
        try:
            failure = post(client, notification.url, notification.payload.encode("utf-8"),
                           timeout=webhook.timeout_seconds, stop=stop)
        except Stopped:
            with self.database.write() as session:
                release_notification(session, notification.id, self.owner)
            log.info("notification %d to %s: cut off as the node stops; it stays queued", notification.id,
                     redact_url(notification.url))
            return
        self._record(notification, failure)

    def _record(self, notification: DueNotification, failure: str | None) -> None:
        """The outcome of an attempt (`failure` None: sent), in the database and the triage log."""
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
        shown = redact_url(notification.url)
        if failure is None:
            self.triage_log.write("notified", notification.study_instance_uid, notification.accession_number,
                                  url=shown, attempts=attempts)
            return
        log.warning("notification %d: %s (attempt %d)", notification.id, failure, attempts)
        self.triage_log.write(
            "notify_failed", notification.study_instance_uid, notification.accession_number, url=shown,
            reason=failure, attempts=attempts, final=final,
            next_attempt_at=None if final else next_at.isoformat(timespec="seconds") + "Z")
