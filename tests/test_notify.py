"""Notifications to real webhook receivers on loopback: one per positive study, retried
while the receiver answers 500 (across a node restart), arriving exactly once, without
patient identifiers; the message bodies, with DICOM text escaped per chat format;
hostile receivers (one that trickles its answer, one that answers 1.5 GiB) that delay no
other webhook, cost no memory and cannot hold the node's stop; and webhook URLs whose
secret shows on no page, API, log or status."""

from __future__ import annotations

import io
import itertools
import json
import logging
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.testclient import TestClient

from node.config import ChatFormat, Config, NotifyOn, NotifyTarget, parse_config, redact_url
from node.dashboard import Dashboard, ModelInfo
from node.health import Readiness
from node.history import TriageHistory
from node.notify import Notifier, analysed_message, failed_message, messages_for, post, webhooks
from node.status import print_status
from node.triagelog import TriageLog, print_events, read_events
from node.web import create_app
from storage.db import Database, DeliveryState, Notification, utcnow
from storage.state import ReceivedInstance, queue_notifications, record_instance
from storage.store import InstanceStore
from tests.conftest import load_labels
from tests.peers import NodeProcess, WebhookReceiver, free_port, node_config, storescu, wait_for
from training.model.architectures import create_model
from training.model.checkpoint import default_model_config, save_checkpoint

FIELDS = {"verdict": "AI ICH TRIAGE: SUSPECTED - PRIORITY", "positive": True, "study_score": 0.97,
          "positive_slices": 4, "total_slices": 30, "required_slices": 2, "slice_threshold": 0.8,
          "model": "effclass", "model_training_data": "synthetic",
          "warnings": ["DEMO MODEL - SYNTHETIC DATA - NOT FOR CLINICAL USE"]}
TARGETS = (NotifyTarget("http://a/", NotifyOn.POSITIVE), NotifyTarget("http://b/", NotifyOn.ALL),
           NotifyTarget("http://c/", NotifyOn.FAILED))


def test_each_outcome_reaches_the_webhooks_that_asked_for_it() -> None:
    positive = analysed_message("1.2.3", "ACC1", FIELDS)
    negative = analysed_message("1.2.3", "ACC1", {**FIELDS, "positive": False})
    assert [url for url, _ in messages_for(TARGETS, positive)] == ["http://a/", "http://b/"]
    assert [url for url, _ in messages_for(TARGETS, negative)] == ["http://b/"]
    failed = failed_message("1.2.3", "", "no head series")
    assert [url for url, _ in messages_for(TARGETS, failed)] == ["http://b/", "http://c/"]


def test_the_message_is_a_chat_line_and_names_no_patient_unless_allowed() -> None:
    (_, body), _ = messages_for(TARGETS, analysed_message("1.2.3", "ACC1", FIELDS))
    message = json.loads(body)
    assert message["text"] == ("ICH triage: SUSPECTED ICH - PRIORITY | accession ACC1 | 4 of 30 slices with "
                               "P(ICH) > 0.8, max 0.97 | study 1.2.3 [DEMO MODEL - SYNTHETIC DATA - NOT FOR "
                               "CLINICAL USE]")
    assert not {"patient_name", "patient_id", "patient_birth_date"} & set(message)
    named = analysed_message("1.2.3", "ACC1", FIELDS, patient={"patient_name": "DOE^JANE"})
    assert named["patient_name"] == "DOE^JANE"


def test_a_webhook_that_fails_gets_the_message_once_it_is_back_even_across_a_restart(
        tmp_path: Path, positive_study: Path) -> None:
    receiver = WebhookReceiver().start()
    receiver.failing.set()
    checkpoint = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18"), default_model_config("resnet18"))
    port = free_port()
    # Every slice above a threshold of 0: the study is flagged, whatever the random model says.
    config = node_config(tmp_path, port=port, checkpoint=checkpoint, stable_seconds=1,
                         notify=[(receiver.url, "positive")], overrides={"triage": {"source": "config", "slice_threshold": 0.0}})
    node = NodeProcess(tmp_path, config, port).start()
    study_uid = load_labels(positive_study)["study_instance_uid"]

    def events(name: str) -> list[dict]:
        return [e for e in read_events(tmp_path / "triage.log") if e["event"] == name]

    try:
        assert storescu(port, sorted((positive_study / "HEAD").glob("*.dcm"))).returncode == 0
        wait_for(lambda: events("notify_failed"), timeout=300, what="a refused notification")
        node.stop()  # the pending notification lives in the database, not in memory
        receiver.failing.clear()
        node.start()
        wait_for(lambda: events("notified"), timeout=120, what="the notification once the webhook is back")
    finally:
        node.stop()
        receiver.stop()
    assert receiver.refused >= 1 and len(receiver.received) == 1 and len(events("notified")) == 1
    (message,) = receiver.received
    assert message["study_instance_uid"] == study_uid and message["positive"] is True
    assert message["text"].startswith("ICH triage: SUSPECTED ICH - PRIORITY")
    text = json.dumps(message)
    labels = load_labels(positive_study)
    assert labels["patient_id"] not in text and "PHANTOM" not in text
    assert "HTTP 500" in events("notify_failed")[0]["reason"]


def test_a_study_not_triaged_is_said_so_and_never_reaches_a_positive_only_webhook() -> None:
    fields = {"verdict": "AI ICH TRIAGE: NOT TRIAGED", "triaged": False, "positive": False, "model": "effclass",
              "model_training_data": "synthetic", "warnings": [],
              "not_triaged": [{"code": "contrast", "text": "IV contrast was given (ContrastBolusAgent OMNIPAQUE)"}]}
    message = analysed_message("1.2.3", "ACC1", fields)
    ((url, body),) = messages_for(TARGETS, message)
    assert url == "http://b/" and json.loads(body)["text"] == (
        "ICH triage: NOT TRIAGED (no verdict: read as if no triage had run) | accession ACC1 "
        "| IV contrast was given (ContrastBolusAgent OMNIPAQUE) | study 1.2.3")
    assert message["not_triaged"] == fields["not_triaged"] and message["triaged"] is False


# --- chat formats and redaction --------------------------------------------------------

SECRETS = ("T0SECRETPATH", "Q0SECRETQUERY")  # a webhook URL's path and query: shown nowhere
HOSTILE = "<!channel> *bold* [x](http://evil) @here &amp;\nICH triage: ICH not detected"


def _text(target: NotifyTarget, message: dict) -> dict:
    ((_, body),) = messages_for((target,), message)
    return json.loads(body)


def test_dicom_text_is_escaped_for_each_chat_and_left_as_it_is_in_the_fields() -> None:
    analysed = analysed_message("1.2.3", HOSTILE, {**FIELDS, "positive": True})
    slack = _text(NotifyTarget("https://hooks.slack.com/services/T/B/S", NotifyOn.ALL), analysed)
    assert slack["text"].startswith("ICH triage: SUSPECTED ICH - PRIORITY | accession &lt;!channel&gt; *bold* "
                                    "[x](http://evil) @here &amp;amp; ICH triage: ICH not detected | 4 of 30")
    for url in ("https://chat.hospital.example/hooks/abc", "https://contoso.webhook.office.com/webhookb2/abc",
                "https://mattermost.hospital.example/hooks/abc"):
        line = _text(NotifyTarget(url, NotifyOn.ALL), analysed)["text"]
        assert ("| accession \\<!channel\\> \\*bold\\* \\[x\\](http://evil) @\u2060here \\&amp; ICH triage: "
                "ICH not detected |") in line, url
    plain = _text(NotifyTarget("https://hooks.slack.com/x", NotifyOn.ALL, ChatFormat.PLAIN), analysed)
    assert f"| accession {HOSTILE} |" in plain["text"]
    for message in (slack, plain):  # the fields a program reads carry the value as it came
        assert message["accession_number"] == HOSTILE
    teams = _text(NotifyTarget("https://hooks.slack.com/x", NotifyOn.FAILED, ChatFormat.TEAMS),
                  failed_message("1.2.3", "ACC", f"no head series in {HOSTILE}"))
    assert "<" not in teams["text"].replace("\\<", "") and "\n" not in teams["text"]
    not_triaged = analysed_message("1.2.3", "ACC", {**FIELDS, "triaged": False, "positive": False,
                                                    "not_triaged": [{"code": "contrast", "text": HOSTILE}]})
    assert "&lt;!channel&gt;" in _text(NotifyTarget("https://x/", NotifyOn.ALL, ChatFormat.SLACK), not_triaged)["text"]


@pytest.mark.parametrize(("url", "shown"), [
    ("https://hooks.slack.com/services/T000/B000/XXXXSECRET", "https://hooks.slack.com/…"),
    ("https://contoso.webhook.office.com/webhookb2/abc@def/IncomingWebhook/SECRET",
     "https://contoso.webhook.office.com/…"),
    ("http://user:password@[::1]:8065/hooks/SECRET?token=SECRET", "http://[::1]:8065/…"),
    ("https://chat.example.org:99999/hooks/SECRET", "https://chat.example.org/…"),
])
def test_a_webhook_url_is_shown_as_scheme_and_host(url: str, shown: str) -> None:
    assert redact_url(url) == shown


# --- hostile receivers -------------------------------------------------------------------


def _read_request(sock: socket.socket) -> None:
    """Read one HTTP request (headers, then Content-Length bytes of body), at most 1 MiB."""
    data = b""
    while b"\r\n\r\n" not in data and len(data) < 2**20:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < min(length, 2**20):
        chunk = sock.recv(65536)
        if not chunk:
            return
        body += chunk


class _Peer:
    """A TCP server on loopback whose `answer(sock)` answers each connection after the
    request was read; `closed` tells every answer to end."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        peer = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                _read_request(self.request)
                peer.answer(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True, name=type(self).__name__).start()

    def answer(self, sock: socket.socket) -> None:
        raise NotImplementedError

    def __enter__(self) -> "_Peer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.closed.set()
        self.server.shutdown()
        self.server.server_close()


class Trickler(_Peer):
    """Answers one byte every `every` seconds and never finishes (a status line, then a
    header without end), so each read succeeds long before any per-read timeout. Bounded:
    it ends after `limit` seconds, once the node hangs up, or when closed."""

    def __init__(self, every: float = 0.2, limit: float = 120.0) -> None:
        super().__init__()
        self.every, self.limit = every, limit
        self.stalled = threading.Event()  # a POST arrived and is being answered
        self.hung_up = threading.Event()  # the node closed the connection

    def answer(self, sock: socket.socket) -> None:
        self.stalled.set()
        deadline = time.monotonic() + self.limit
        for byte in itertools.chain(b"HTTP/1.1 200 OK\r\nX-Slow: ", itertools.repeat(ord("a"))):
            if self.closed.wait(self.every) or time.monotonic() > deadline:
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                self.hung_up.set()
                return


class HugeAnswer(_Peer):
    """Answers `status` with a 1.5 GiB body, made as it is sent (64 KiB at a time, never
    held), until the node hangs up; counts the bytes it got out."""

    SIZE = 3 * 2**29

    def __init__(self, status: int) -> None:
        super().__init__()
        self.status = status
        self.sent = 0

    def answer(self, sock: socket.socket) -> None:
        chunk = b"x" * 65536
        try:
            sock.sendall(f"HTTP/1.1 {self.status} Whatever\r\nContent-Length: {self.SIZE}\r\n\r\n".encode())
            while self.sent < self.SIZE and not self.closed.is_set():
                sock.sendall(chunk)
                self.sent += len(chunk)
        except OSError:  # the node hung up: what it did not read was never made
            pass


def _peak_rss_mib() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def test_the_whole_post_has_a_deadline_however_the_receiver_trickles() -> None:
    with Trickler() as trickler, httpx.Client(timeout=1.5) as client:
        failure = post(client, trickler.url, b"{}", timeout=1.5, stop=threading.Event())
        wait_for(trickler.hung_up.is_set, timeout=30, what="the trickler to see the node hang up")
    assert failure == f"{redact_url(trickler.url)} gave no complete answer within 1.5 s"


def test_a_huge_answer_is_not_read_and_its_status_decides() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # the peak resident memory starts again from here
    before = _peak_rss_mib()
    with HugeAnswer(200) as accepted, HugeAnswer(500) as refused, httpx.Client(timeout=30) as client:
        assert post(client, accepted.url, b"{}", timeout=30, stop=threading.Event()) is None
        failure = post(client, refused.url, b"{}", timeout=30, stop=threading.Event())
    assert failure == f"{redact_url(refused.url)} answered HTTP 500: {'x' * 200}"
    assert _peak_rss_mib() - before < 64, "the answer's body was read"
    assert accepted.sent < HugeAnswer.SIZE and refused.sent < HugeAnswer.SIZE


# --- the notifier in process: its threads, its stop, what it shows ---------------------------


def _config(folder: Path, notify: list[dict], **delivery: object) -> Config:
    return parse_config({
        "storage": {"root": str(folder / "store"), "database_url": f"sqlite:///{folder / 'node.db'}",
                    "min_free_mb": 0},
        "log": {"path": str(folder / "triage.log")},
        "delivery": {"initial_backoff_seconds": 1, "max_backoff_seconds": 2, **delivery},
        "notify": notify,
    }, folder)


def _queue(database: Database, url: str, study: str = "1.2.3.4", accession: str = "ACC1") -> int:
    """A received study with one pending notification to `url`; returns the notification's id."""
    item = ReceivedInstance(study, f"{study}.1", f"{study}.1.1", "1.2.840.10008.5.1.4.1.1.2", "CT", accession,
                            "1.2.840.10008.1.2.1", f"instances/{study}/1.dcm", 1000, "SCANNER", True)
    with database.write() as session:
        study_id = record_instance(session, item, utcnow()).study_id
        queue_notifications(session, study_id, [(url, json.dumps({"text": "ICH triage"}))], utcnow())
        return max(n.id for n in session.query(Notification).all())


def _notification(database: Database, notification_id: int) -> Notification:
    with database.read() as session:
        row = session.get(Notification, notification_id)
        session.expunge(row)
        return row


@pytest.fixture()
def database(tmp_path: Path) -> Iterator[Database]:
    db = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    yield db
    db.dispose()


def test_a_trickling_webhook_delays_no_other_and_cannot_hold_the_stop(tmp_path: Path, database: Database) -> None:
    receiver = WebhookReceiver().start()
    with Trickler() as trickler:
        config = _config(tmp_path, [{"url": trickler.url, "timeout_seconds": 60}, {"url": receiver.url}])
        notifier = Notifier(config, database, TriageLog(config.log.path))
        stalled = _queue(database, trickler.url)
        _queue(database, receiver.url, study="1.2.3.5")
        stop = threading.Event()
        threads = notifier.start(stop)
        try:
            wait_for(trickler.stalled.is_set, timeout=30, what="the trickler to be posted to")
            wait_for(lambda: receiver.received, timeout=30, what="the other webhook's message")
            assert not trickler.hung_up.is_set(), "the other message waited for the trickler"
        finally:
            stop.set()
            notifier.join()
            receiver.stop()
        wait_for(lambda: not any(t.is_alive() for t in threads), timeout=10, what="the sending threads to stop")
    row = _notification(database, stalled)
    assert (row.state, row.claimed_by, row.attempts) == (DeliveryState.PENDING, None, 0)
    assert [e["url"] for e in read_events(config.log.path)] == [redact_url(receiver.url)]


def test_serve_stops_within_bounds_with_a_trickling_webhook_and_keeps_its_message(tmp_path: Path) -> None:
    port = free_port()
    refusing = WebhookReceiver().start()
    refusing.failing.set()
    secret = f"{refusing.url}/{SECRETS[0]}?token={SECRETS[1]}"
    with Trickler() as trickler:
        config = node_config(tmp_path, port=port, checkpoint=None, notify=[(secret, "positive"),
                                                                           (trickler.url, "positive")],
                             overrides={"worker": {"enabled_in_serve": False}})
        node = NodeProcess(tmp_path, config + "timeout_seconds = 300\n", port).start()  # a key of the last [[notify]]
        try:
            database = Database(f"sqlite:///{tmp_path / 'node.db'}")
            notification_id = _queue(database, trickler.url)
            _queue(database, secret, study="1.2.3.5")
            wait_for(lambda: trickler.stalled.is_set() and refusing.refused, timeout=60,
                     what="the node to post to both webhooks")
            node.process.send_signal(signal.SIGTERM)
            # The issue asks for 10 s; a loaded test machine gets more.
            wait_for(lambda: node.process.poll() is not None, timeout=30, what="the node to stop after SIGTERM")
        finally:
            node.stop()
            refusing.stop()
    output = node.output()
    assert node.process.returncode == 0, output[-3000:]
    assert "it stays queued" in output and f"{redact_url(secret)} answered HTTP 500" in output
    assert not any(part in output for part in SECRETS)
    row = _notification(database, notification_id)
    assert (row.state, row.claimed_by, row.attempts) == (DeliveryState.PENDING, None, 0)
    database.dispose()


def test_a_webhook_secret_shows_on_no_page_api_log_or_status(tmp_path: Path, database: Database,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    receiver = WebhookReceiver().start()
    receiver.failing.set()
    refusing = f"http://127.0.0.1:{free_port()}/hooks/{SECRETS[0]}?token={SECRETS[1]}"
    answering = f"{receiver.url}/{SECRETS[0]}?token={SECRETS[1]}"
    config = _config(tmp_path, [{"url": answering}, {"url": refusing}], max_attempts=1)
    notifier = Notifier(config, database, TriageLog(config.log.path))
    _queue(database, answering)
    _queue(database, refusing, study="1.2.3.5")
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.WARNING, logger="httpx")  # as `ichnode` sets it; the serve test checks its output
    try:
        with httpx.Client(timeout=10) as client:
            stop = threading.Event()
            assert [notifier.send_due(client, webhook, stop) for webhook in webhooks(config.notify)] == [1, 1]
    finally:
        receiver.stop()
    assert receiver.refused == 1
    logged = io.StringIO()
    print_events(read_events(config.log.path), logged, as_json=False, color=False)
    print_events(read_events(config.log.path), logged, as_json=True, color=False)
    # What a release that did not redact URLs left behind: a log line and an error of a row.
    legacy = _queue(database, answering, study="1.2.3.6")
    with database.write() as session:
        row = session.get(Notification, legacy)
        row.state, row.attempts, row.last_error = DeliveryState.FAILED, 1, f"{answering} answered HTTP 500"
    TriageLog(config.log.path).write("notify_failed", "1.2.3.6", "ACC1", url=answering,
                                     reason=f"{answering} answered HTTP 500", attempts=1, final=True)
    status = io.StringIO()
    print_status(config, status)
    print_status(config, status, as_json_text=True)
    dashboard = Dashboard(config, database, InstanceStore(config.storage.root), TriageHistory(config.log.path),
                          ModelInfo.of(config, None))
    readiness = Readiness(database, InstanceStore(config.storage.root), 0, model_loaded=False, model_configured=False,
                          scheduler_running=lambda: True, worker=None, worker_stale_seconds=120)
    web = TestClient(create_app(config, dashboard, readiness), base_url="http://127.0.0.1:8080")
    pages = [web.get(path) for path in ("/", "/api/queue", "/failures", *(f"{prefix}/studies/{uid}" for prefix in (
        "", "/api") for uid in ("1.2.3.4", "1.2.3.5", "1.2.3.6")))]
    assert all(page.status_code == 200 for page in pages)
    shown = "\n".join([logged.getvalue(), status.getvalue(), caplog.text, *(page.text for page in pages)])
    for secret in SECRETS:
        assert secret not in shown
    assert "HTTP 500" in shown and "ConnectError" in shown and redact_url(answering) in pages[-1].text
