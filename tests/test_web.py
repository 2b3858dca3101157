"""The web pages, /metrics, /healthz, /readyz and the JSON API, in process.

Two synthetic studies go through the real ingest and worker with the demonstration model
(one with bleeds, one without); the app is then asked over HTTP as a browser or
Prometheus would ask it. Where the answer depends on the server (request bodies, slow and
surplus connections, descriptors running out) the app is served by uvicorn, as `ichnode
serve` serves it, on a free loopback port in a thread of this process. The real browser
and the retry against a real PACS are in tests/test_web_browser.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import io
import json
import logging
import os
import re
import resource
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import httpx
import pydicom
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from node.config import Config, parse_config
from node.dashboard import Dashboard, ModelInfo
from node.errors import ConfigError
from node.health import Liveness, Readiness
from node.history import TriageHistory
from node.ingest import Ingest, Status
from node.service import complete_quiet_studies
from node.triagelog import TriageLog, read_events
from training.model.rule import POSITIVE_LABEL
from node.web import FORM_LIMIT, Sessions, create_app
from node.webserver import OncePerInterval, WebServer
from node.worker import Worker
from storage.db import Database, Delivery, DeliveryState, Study, StudyState
from storage.store import InstanceStore
from tests.peers import free_port, wait_for
from training.inference.predictor import Predictor
from training.inference.settings import Backend, Device

REPO = Path(__file__).resolve().parents[1]
DEMO_MODEL = REPO / "models" / "effclass-synthetic-demo.pt"
TOKEN = "a-web-token-for-the-tests-0123456789"
HTML = {"accept": "text/html"}


@dataclasses.dataclass
class Analysed:
    config: Config
    database: Database
    store: InstanceStore
    predictor: Predictor
    sent: dict[str, int]  # accession → instances sent
    patients: list[str]  # names and IDs that must never show

    def app(self, alerts: dict[str, object] | None = None, **web: object) -> TestClient:
        config = dataclasses.replace(self.config, web=dataclasses.replace(self.config.web, **web),
                                     alerts=dataclasses.replace(self.config.alerts, **(alerts or {})))
        return TestClient(create_app(config, *self.parts(config)), base_url="http://127.0.0.1:8080")

    def parts(self, config: Config) -> tuple[Dashboard, Readiness]:
        dashboard = Dashboard(config, self.database, self.store, TriageHistory(config.log.path),
                              ModelInfo.of(config, self.predictor))
        readiness = Readiness(self.database, self.store, config.storage.min_free_mb, model_loaded=True,
                              model_configured=True, scheduler_running=lambda: True, worker=Liveness(),
                              worker_stale_seconds=config.worker.stale_after_seconds, alerts=config.alerts)
        return dashboard, readiness


def _config(folder: Path, **web: object) -> Config:
    return parse_config({
        "storage": {"root": str(folder / "store"), "database_url": f"sqlite:///{folder / 'node.db'}",
                    "min_free_mb": 0},
        "completion": {"stable_seconds": 0.01},
        "model": {"checkpoint": str(DEMO_MODEL), "device": "cpu", "backend": "torch"},
        "explain": {"key_slices": 2},
        "log": {"path": str(folder / "triage.log")},
        "web": {"token": TOKEN, **web},
        "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 9}],
    }, folder)


@pytest.fixture(scope="module")
def analysed(tmp_path_factory: pytest.TempPathFactory, positive_study: Path, negative_study: Path) -> Analysed:
    folder = tmp_path_factory.mktemp("web")
    config = _config(folder)
    store = InstanceStore(config.storage.root)
    store.ensure()
    database = Database(config.storage.database_url, create=True)
    log = TriageLog(config.log.path)
    ingest = Ingest(store, database, log)
    sent, patients = {}, []
    for study in (positive_study, negative_study):
        files = sorted(study.rglob("*.dcm"))
        for path in files:
            ds = pydicom.dcmread(path)
            assert ingest.receive(ds, path.read_bytes(), calling_aet="SCANNER",
                                  transfer_syntax_uid=ds.file_meta.TransferSyntaxUID) == Status.SUCCESS
        sent[str(ds.AccessionNumber)] = len(files)
        patients += [str(ds.PatientName), str(ds.PatientID)]
    ready = []
    wait_for(lambda: ready.append(complete_quiet_studies(config, database, log)) or sum(ready) == 2,
             timeout=10, what="both studies to be quiet", every=0.02)
    predictor = Predictor.from_checkpoint(DEMO_MODEL, device=Device("cpu"), backend=Backend.TORCH)
    worker = Worker(config, database, store, predictor, log)
    assert worker.run_once() and worker.run_once()
    return Analysed(config, database, store, predictor, sent, patients)


def test_the_queue_lists_each_study_with_its_verdict_and_filters(analysed: Analysed) -> None:
    client = analysed.app()
    page = client.get("/", headers=HTML)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for accession in analysed.sent:
        assert accession in page.text
    assert page.text.count('class="flagged"') == 1  # the study with bleeds stands out
    assert "SUSPECTED - PRIORITY" in page.text and "not detected" in page.text
    assert 'http-equiv="refresh"' in page.text

    queue = client.get("/api/queue").json()
    assert queue["studies_by_state"]["done"] == 2
    rows = {row["accession_number"]: row for row in queue["studies"]}
    assert set(rows) == set(analysed.sent)
    assert sorted(row["positive"] for row in rows.values()) == [False, True]
    for row in rows.values():
        assert set(row["timings_s"]) == {"scope", "load", "preprocess", "inference", "gradcam", "encode"}
        sets = 3 if row["positive"] else 2  # SC, SR, and a KOS for the flagged study only (output.kos_for)
        assert [(d["target"], d["state"]) for d in row["deliveries"]] == [("pacs", "pending")] * sets

    positives = client.get("/api/queue?verdict=positive").json()["studies"]
    assert [row["positive"] for row in positives] == [True]
    assert client.get("/api/queue?state=failed").json()["studies"] == []
    bad = client.get("/?verdict=maybe", headers=HTML)
    assert bad.status_code == 400 and "verdict must be one of positive, negative, not_triaged, none" in bad.text


def test_the_study_page_shows_its_timeline_choices_and_the_pictures_sent(analysed: Analysed) -> None:
    client = analysed.app()
    uid = next(row["study_instance_uid"] for row in client.get("/api/queue").json()["studies"] if row["positive"])
    page = client.get(f"/studies/{uid}", headers=HTML)
    assert page.status_code == 200
    for event in ("received", "ready", "analysed"):
        assert f"<td>{event}</td>" in page.text
    assert "another qualifying series was preferred" in page.text or "series passed over" in page.text
    view = client.get(f"/api/studies/{uid}").json()
    assert view["analysis"]["series_reason"] and view["images"]
    assert [e["event"] for e in view["timeline"]][:3] == ["received", "ready", "analysed"]
    assert f'action="/studies/{uid}/reanalyse"' in page.text  # a done study can be re-run
    for name in view["images"]:
        assert f'/studies/{uid}/images/{name}.png' in page.text
        picture = client.get(f"/studies/{uid}/images/{name}.png")
        assert picture.headers["content-type"] == "image/png"
        assert Image.open(io.BytesIO(picture.content)).size[0] >= 256
    assert client.get(f"/studies/{uid}/images/../../node.db.png").status_code == 404
    assert client.get(f"/studies/{uid}/images/sc-9999.png").status_code == 404
    assert client.get("/studies/1.2.3.4", headers=HTML).status_code == 404


def test_metrics_parse_and_count_what_was_sent(analysed: Analysed) -> None:
    text = analysed.app().get("/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    assert samples[("ichnode_instances_received_total", ())] == sum(analysed.sent.values())
    assert samples[("ichnode_analyses_total", (("verdict", "positive"),))] == 1
    assert samples[("ichnode_analyses_total", (("verdict", "negative"),))] == 1
    assert samples[("ichnode_studies", (("state", "done"),))] == 2
    assert samples[("ichnode_analysis_stage_seconds_count", (("stage", "inference"),))] == 2
    assert samples[("ichnode_analysis_stage_seconds_bucket", (("le", "+Inf"), ("stage", "inference")))] == 2
    assert samples[("ichnode_queue_depth", (("queue", "delivery"),))] == 5  # SC and SR each, a KOS for the flagged
    assert samples[("ichnode_queue_depth", (("queue", "analysis"),))] == 0
    assert samples[("ichnode_storage_free_bytes", ())] > 0
    (info, value), = [(dict(labels), v) for (name, labels), v in samples.items() if name == "ichnode_model_info"]
    assert value == 1 and info["checkpoint"] == str(DEMO_MODEL) and info["training_data"] == "synthetic"
    assert info["architecture"] == "effclass" and info["device"] == "cpu"


def test_the_model_page_plots_the_window(analysed: Analysed) -> None:
    client = analysed.app()
    page = client.get("/model", headers=HTML)
    assert page.status_code == 200 and "synthetic" in page.text
    assert "DEMO MODEL" in page.text  # the model's warning is on every page
    # The demonstration checkpoint ships calibrated, and the rule in force is its own.
    assert "for study sensitivity ≥ 0.95" in page.text and "seed 5" in page.text
    assert "recommended operating point)" in page.text  # the rule in force, and where it comes from
    for name in ("studies-per-day", "positive-rate", "scores"):
        plot = client.get(f"/model/{name}.png")
        assert plot.status_code == 200 and Image.open(io.BytesIO(plot.content)).format == "PNG"
    assert client.get("/model/anything.png").status_code == 404


def test_no_page_shows_the_patient_by_default(analysed: Analysed) -> None:
    client = analysed.app()
    uids = [row["study_instance_uid"] for row in client.get("/api/queue").json()["studies"]]
    pages = ["/", "/failures", "/model", "/metrics", "/api/queue", "/readyz",
             *(f"/studies/{uid}" for uid in uids), *(f"/api/studies/{uid}" for uid in uids)]
    for path in pages:
        text = client.get(path, headers=HTML).text
        for identifier in analysed.patients:
            assert identifier not in text, f"{identifier} on {path}"


def test_every_answer_carries_the_security_headers(analysed: Analysed) -> None:
    client = analysed.app()
    for path in ("/", "/metrics", "/healthz", "/login", "/static/style.css"):
        headers = client.get(path).headers
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert headers["x-content-type-options"] == "nosniff" and headers["x-frame-options"] == "DENY"
        assert headers["cache-control"] == "no-store"


def test_retry_needs_the_token(analysed: Analysed) -> None:
    client = analysed.app()
    assert client.post("/failures/retry").status_code == 401
    assert client.post("/failures/retry", data={"token": "not-the-token-at-all"}).status_code == 403
    assert client.post("/failures/retry", headers={"authorization": "Bearer wrong"}).status_code == 403
    done = client.post("/failures/retry", headers={"authorization": f"Bearer {TOKEN}", "accept": "application/json"})
    assert done.status_code == 200 and done.json() == {"deliveries": 0, "notifications": 0}
    with_form = client.post("/failures/retry", data={"token": TOKEN}, follow_redirects=False)
    assert with_form.status_code == 303 and with_form.headers["location"] == "/failures?retried=0,0"

    without = analysed.app(token="")
    refused = without.post("/failures/retry")
    assert refused.status_code == 403 and "web.token is not set" in refused.text
    assert without.get("/failures", headers=HTML).status_code == 200  # reads stay open on loopback


@pytest.fixture
def changed(analysed: Analysed, tmp_path: Path) -> Iterator[Analysed]:
    """The analysed node with a database and triage log of this test's own, to change."""
    with closing(sqlite3.connect(analysed.database.url.database)) as source, \
            closing(sqlite3.connect(tmp_path / "node.db")) as copy:
        source.backup(copy)
    config = analysed.config
    config = dataclasses.replace(
        config, storage=dataclasses.replace(config.storage, database_url=f"sqlite:///{tmp_path / 'node.db'}"),
        log=dataclasses.replace(config.log, path=tmp_path / "triage.log"))
    database = Database(config.storage.database_url)
    yield dataclasses.replace(analysed, config=config, database=database)
    database.dispose()


def _study_states(node: Analysed) -> dict[str, StudyState]:
    with node.database.read() as session:
        return {s.study_instance_uid: s.state for s in session.query(Study)}


def _fail_every_study(node: Analysed) -> list[str]:
    with node.database.write() as session:
        session.query(Study).update({Study.state: StudyState.FAILED, Study.last_error: "RuntimeError: boom"})
    return sorted(_study_states(node))


def test_reanalyse_needs_the_token_and_puts_the_study_back_in_the_queue(changed: Analysed) -> None:
    client = changed.app()
    uid = sorted(_study_states(changed))[0]
    assert client.post(f"/studies/{uid}/reanalyse").status_code == 401
    assert client.post(f"/studies/{uid}/reanalyse", data={"token": "not-the-token-at-all"}).status_code == 403
    refused = changed.app(token="").post(f"/studies/{uid}/reanalyse")
    assert refused.status_code == 403 and "`ichnode reanalyse` on the node" in refused.text
    assert _study_states(changed)[uid] == StudyState.DONE

    done = client.post(f"/studies/{uid}/reanalyse", data={"token": TOKEN}, follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"] == f"/studies/{uid}?reanalysed=queued"
    assert _study_states(changed)[uid] == StudyState.READY
    page = client.get(done.headers["location"], headers=HTML)
    assert "Re-analyse: queued to be analysed again" in page.text
    assert f'action="/studies/{uid}/reanalyse"' not in page.text  # no button while it waits in the queue
    (event,) = [e for e in read_events(changed.config.log.path) if e["event"] == "reanalyse"]
    assert (event["study_instance_uid"], event["by"], event["previous_state"]) == (uid, "web", "done")

    again = client.post(f"/studies/{uid}/reanalyse", headers={"authorization": f"Bearer {TOKEN}",
                                                             "accept": "application/json"})
    assert again.json() == {"study_instance_uid": uid, "accession_number": again.json()["accession_number"],
                            "state": "ready", "outcome": "busy"}
    missing = client.post("/studies/1.2.3.4/reanalyse", data={"token": TOKEN})
    assert missing.status_code == 404 and "no study 1.2.3.4" in missing.text


def test_reanalyse_needs_the_csrf_value_besides_the_session(changed: Analysed) -> None:
    client = changed.app(host="0.0.0.0")
    client.post("/login", data={"token": TOKEN})
    uid = _fail_every_study(changed)[0]
    page = client.get(f"/studies/{uid}", headers=HTML)
    assert f'action="/studies/{uid}/reanalyse"' in page.text
    assert client.post(f"/studies/{uid}/reanalyse").status_code == 403  # the cookie alone changes nothing
    assert client.post("/failures/reanalyse").status_code == 403
    assert set(_study_states(changed).values()) == {StudyState.FAILED}
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    done = client.post(f"/studies/{uid}/reanalyse", data={"csrf": csrf}, follow_redirects=False)
    assert done.status_code == 303 and _study_states(changed)[uid] == StudyState.READY


def test_the_failures_page_re_analyses_one_or_every_failed_study(changed: Analysed) -> None:
    client = changed.app()
    first, second = _fail_every_study(changed)
    page = client.get("/failures", headers=HTML)
    for uid in (first, second):
        assert f'action="/studies/{uid}/reanalyse"' in page.text
    assert 'action="/failures/reanalyse"' in page.text and "ichnode reanalyse --failed" in page.text
    assert "sent again" not in page.text and "Sending" not in page.text  # re-sending does nothing here

    one = client.post(f"/studies/{first}/reanalyse", data={"token": TOKEN}, follow_redirects=False)
    assert one.status_code == 303 and _study_states(changed) == {first: StudyState.READY, second: StudyState.FAILED}
    every = client.post("/failures/reanalyse", data={"token": TOKEN}, follow_redirects=False)
    assert every.status_code == 303 and every.headers["location"] == "/failures?reanalysed=1"
    assert set(_study_states(changed).values()) == {StudyState.READY}
    assert "Queued to be analysed again: 1 failed study." in client.get(every.headers["location"], headers=HTML).text
    none = client.post("/failures/reanalyse", headers={"authorization": f"Bearer {TOKEN}",
                                                       "accept": "application/json"})
    assert none.json() == {"queued": 0}
    assert 'action="/failures/reanalyse"' not in client.get("/failures", headers=HTML).text  # nothing failed


def test_the_failures_page_names_a_re_send_only_when_reopen_failed_is_on(changed: Analysed) -> None:
    _fail_every_study(changed)
    config = changed.config
    reopening = dataclasses.replace(config, completion=dataclasses.replace(config.completion, reopen_failed=True))
    client = TestClient(create_app(reopening, *changed.parts(reopening)), base_url="http://127.0.0.1:8080")
    page = client.get("/failures", headers=HTML)
    assert "images again also re-opens it (completion.reopen_failed)" in page.text


def test_on_loopback_only_this_machine_s_names_are_answered(analysed: Analysed) -> None:
    client = analysed.app()
    assert client.get("/", headers={"host": "localhost:8080"}).status_code == 200
    # A page elsewhere that points its own DNS name at 127.0.0.1 reads nothing.
    assert client.get("/api/queue", headers={"host": "rebound.example.org"}).status_code == 400


def test_a_web_port_in_use_stops_start_up_before_the_model_loads(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = tmp_path / "node.toml"
        config.write_text(f'[web]\nport = {port}\n[node]\nport = {free_port()}\n[storage]\nroot = "{tmp_path / "store"}"\n'
                          f'[model]\ncheckpoint = "{DEMO_MODEL}"\n')
        done = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                              capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert f"cannot listen on web.host 127.0.0.1 web.port {port}" in done.stderr
    assert "model effclass" not in done.stderr  # refused before the model was loaded


def test_off_loopback_every_page_needs_the_token(analysed: Analysed) -> None:
    client = analysed.app(host="0.0.0.0")
    login = client.get("/", headers=HTML, follow_redirects=False)
    assert login.status_code == 303 and login.headers["location"] == "/login?next=%2F"
    assert client.get("/metrics").status_code == 401
    assert client.get("/api/queue").status_code == 401
    assert client.get("/healthz").status_code == 200  # probes stay open
    assert client.get("/metrics", headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200

    assert client.post("/login", data={"token": "not-the-token-at-all"}).status_code == 403
    signed_in = client.post("/login?next=/failures", data={"token": TOKEN}, follow_redirects=False)
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/failures"
    for elsewhere in ("//evil.example/", "/\\evil.example/", "https://evil.example/"):  # never sent off-site
        away = client.post("/login", params={"next": elsewhere}, data={"token": TOKEN}, follow_redirects=False)
        assert away.headers["location"] == "/"
    cookie = signed_in.cookies["ichnode_session"]
    assert TOKEN not in cookie and "httponly" in signed_in.headers["set-cookie"].lower()
    assert "samesite=strict" in signed_in.headers["set-cookie"].lower()
    page = client.get("/failures", headers=HTML)
    assert page.status_code == 200 and 'name="csrf"' in page.text
    # The session cookie alone does not change anything: a form from this page carries its CSRF value.
    assert client.post("/failures/retry").status_code == 403
    csrf = page.text.split('name="csrf" value="')[1].split('"')[0]
    assert client.post("/failures/retry", data={"csrf": csrf}, follow_redirects=False).status_code == 303


def test_off_loopback_without_a_token_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="web.host 0.0.0.0 lets other machines reach the node's pages: set web.token"):
        _config(tmp_path, host="0.0.0.0", token="")
    with pytest.raises(ConfigError, match="web.token must be at least 16"):
        _config(tmp_path, token="short")
    with pytest.raises(ConfigError, match="web.tls uses node.tls_certificate"):
        _config(tmp_path, tls=True)
    config = tmp_path / "node.toml"
    config.write_text(f'[web]\nhost = "0.0.0.0"\n[storage]\nroot = "{tmp_path / "store"}"\n')
    done = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "web.host 0.0.0.0 lets other machines reach the node's pages: set web.token" in done.stderr
    assert "Traceback" not in done.stderr


def test_healthz_and_readyz(analysed: Analysed) -> None:
    client = analysed.app()
    assert client.get("/healthz").json() == {"status": "alive"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["failing"] == []
    assert set(ready.json()["checks"]) == {"database", "storage", "model", "scheduler", "worker", "deliveries"}
    assert ready.json()["status"] == "ready" and ready.json()["degraded"] == []


def test_readyz_names_a_missing_database_and_recovers(analysed: Analysed) -> None:
    client = analysed.app()
    database = Path(analysed.database.url.database)
    aside = database.with_name("node.db.aside")
    database.rename(aside)
    try:
        gone = client.get("/readyz")
        assert gone.status_code == 503 and gone.json()["failing"] == ["database"]
        assert "deleted or replaced" in gone.json()["checks"]["database"]["detail"]
    finally:
        aside.rename(database)
    assert client.get("/readyz").status_code == 200


def test_readyz_names_a_read_only_storage_root_and_recovers(analysed: Analysed) -> None:
    root = str(analysed.store.root)
    done = subprocess.run(["mount", "--bind", root, root], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"a read-only bind mount needs root: {done.stderr.strip()}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", root], check=True)
        client = analysed.app()
        refused = client.get("/readyz")
        assert refused.status_code == 503 and refused.json()["failing"] == ["storage"]
        assert "cannot be written" in refused.json()["checks"]["storage"]["detail"]
    finally:
        subprocess.run(["umount", root], check=True)
    assert client.get("/readyz").status_code == 200


def _fail_deliveries(node: Analysed, *, positive: bool) -> str:
    """Every delivery of the flagged (or the other) study failed, as if the PACS refused it; its UID."""
    with node.database.write() as session:
        study = session.query(Study).filter((Study.verdict == POSITIVE_LABEL) == positive).one()
        session.query(Delivery).filter(Delivery.study_id == study.id).update(
            {Delivery.state: DeliveryState.FAILED, Delivery.attempts: 8, Delivery.last_error: "PACS said no"})
        return study.study_instance_uid


def _banner(text: str) -> str:
    return text.split('class="banner undelivered"')[1].split("</div>")[0] if "banner undelivered" in text else ""


def test_a_flagged_study_whose_results_were_not_delivered_stands_out_everywhere(changed: Analysed) -> None:
    client = changed.app()
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["degraded"] == []
    assert "banner undelivered" not in client.get("/", headers=HTML).text  # pending for seconds: on its way

    _fail_deliveries(changed, positive=False)  # a study not flagged: on the failures page only
    assert "banner undelivered" not in client.get("/", headers=HTML).text
    uid = _fail_deliveries(changed, positive=True)
    accession = next(a for a in changed.sent if a in client.get(f"/studies/{uid}", headers=HTML).text)
    for path in ("/", "/failures", "/model", f"/studies/{uid}", "/login"):
        banner = _banner(client.get(path, headers=HTML).text)
        assert "RESULTS NOT DELIVERED: 1 flagged study" in banner, path
        assert f'href="/studies/{uid}"' in banner and accession in banner and "pacs sc failed" in banner
    queue = client.get("/", headers=HTML).text
    (flagged,) = re.findall(r'<tr class="flagged">.*?</tr>', queue, re.S)
    assert "results not delivered" in flagged and queue.count("results not delivered") == 1
    failures = client.get("/failures", headers=HTML).text
    rows = re.findall(r"<tr( class=\"flagged\")?>(.*?)</tr>", failures.split("<h2>Failed notifications")[0], re.S)
    verdicts = sorted((bool(css), "SUSPECTED - PRIORITY" in row, "not detected" in row) for css, row in rows[1:])
    # SC and SR for the study not flagged; SC, SR and KOS for the flagged one (output.kos_for)
    assert verdicts == [(False, False, True)] * 2 + [(True, True, False)] * 3

    degraded = client.get("/readyz")
    body = degraded.json()
    assert degraded.status_code == 200 and body["status"] == "degraded" and body["degraded"] == ["deliveries"]
    assert body["failing"] == [] and body["checks"]["deliveries"]["ok"] is True
    assert body["checks"]["deliveries"]["detail"].startswith("1 flagged study with results not delivered")
    assert uid not in degraded.text and accession not in degraded.text  # /readyz is open: no identifiers
    assert changed.app(alerts={"undelivered_http_status": 503}).get("/readyz").status_code == 503


def test_a_flagged_study_pending_longer_than_the_alert_age_counts_as_undelivered(changed: Analysed) -> None:
    with changed.database.read() as session:
        age = (dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
               - min(d.created_at for d in session.query(Delivery))).total_seconds()
    assert "banner undelivered" not in changed.app(alerts={"undelivered_after_seconds": age + 3600}).get(
        "/", headers=HTML).text
    client = changed.app(alerts={"undelivered_after_seconds": age / 2})
    assert "pacs sc pending" in _banner(client.get("/", headers=HTML).text)
    assert client.get("/readyz").json()["status"] == "degraded"


def test_a_study_without_an_accession_number_is_named_by_date_modality_description_and_uid(
        changed: Analysed) -> None:
    with changed.database.write() as session:
        named = {s.study_instance_uid: (s.study_date, s.modality, s.study_description)
                 for s in session.query(Study)}
        session.query(Study).update({Study.accession_number: ""})
    uid = _fail_deliveries(changed, positive=True)
    date, modality, description = named[uid]
    assert re.fullmatch(r"[0-9]{8}", date) and modality == "CT" and description  # as the real ingest kept them
    shown = f"{date[:4]}-{date[4:6]}-{date[6:]} · CT · {description} · …{uid[-12:]}"
    client = changed.app()
    for path in ("/", f"/studies/{uid}", "/failures"):
        text = client.get(path, headers=HTML).text
        assert shown in text and "(none)" not in text, path
    assert f"<h1>Study {shown}" in client.get(f"/studies/{uid}", headers=HTML).text
    (row,) = [r for r in client.get("/api/queue").json()["studies"] if r["study_instance_uid"] == uid]
    assert row["name"]["study_date"] == date and row["undelivered"] is True


def test_the_model_page_counts_alike_with_failures_relative_paths_and_rounded_figures(
        analysed: Analysed, changed: Analysed) -> None:
    shutil.copy(analysed.config.log.path, changed.config.log.path)
    TriageLog(changed.config.log.path).write("failed", "1.2.826.0.1.3", "", reason="RuntimeError: boom")
    config = dataclasses.replace(changed.config, source=REPO / "config.toml")  # the checkpoint is in its folder
    node = dataclasses.replace(changed, config=config)
    page = node.app().get("/model", headers=HTML).text
    assert "In the window: 3 studies ended, 2 analysed (2 given a verdict, 1 of them flagged; 0 not triaged) " \
           "and 1 failed." in page
    (total,) = re.findall(r"<tfoot>(.*?)</tfoot>", page, re.S)
    assert re.findall(r"<th>(\d+)</th>", total) == ["3", "2", "0", "1", "1"]  # ended, analysed, not triaged, ...
    assert "<dd>models/effclass-synthetic-demo.pt</dd>" in page
    # What the checkpoint recorded of its training may name folders of the machine that trained it.
    own = re.sub(r"<dt>(trained on|its own figures)</dt><dd>.*?</dd>", "", page, flags=re.S)
    assert str(REPO) not in own
    figures = re.findall(r"<div>(val_[a-z_]+): ([^<]*)</div>", page)
    assert figures and all(re.fullmatch(r"-?[0-9]+\.[0-9]{3}", value) for _, value in figures), figures


def test_a_refused_change_is_a_page_with_a_way_to_sign_in(analysed: Analysed) -> None:
    client = analysed.app()
    refused = client.post("/failures/retry", data={"token": "not-the-token-at-all"}, headers=HTML)
    assert refused.status_code == 403 and refused.headers["content-type"].startswith("text/html")
    assert "<header>" in refused.text and "wrong token" in refused.text  # the pages' own look
    assert 'href="/login?next=%2Ffailures"' in refused.text and 'href="/failures">Back' in refused.text
    uid = client.get("/api/queue").json()["studies"][0]["study_instance_uid"]
    gone = analysed.app()
    gone.cookies.set("ichnode_session", "gone")
    expired = gone.post(f"/studies/{uid}/reanalyse", headers=HTML)
    assert expired.status_code == 403 and "sign in again" in expired.text
    assert f'href="/login?next=%2Fstudies%2F{uid}"' in expired.text
    unset = analysed.app(token="").post("/failures/retry", headers=HTML)
    assert unset.status_code == 403 and "web.token is not set" in unset.text and "/login?" not in unset.text
    script = client.post("/failures/retry", data={"token": "not-the-token-at-all"})
    assert script.status_code == 403 and script.text == "wrong token"  # scripts still get one line


def test_status_json_is_the_queue_the_page_shows(analysed: Analysed, tmp_path: Path) -> None:
    config = analysed.config.source or tmp_path / "node.toml"
    text = "\n".join([
        "[storage]", f'root = "{analysed.store.root}"', f'database_url = "{analysed.config.storage.database_url}"',
        "[log]", f'path = "{analysed.config.log.path}"', ""])
    config = tmp_path / "node.toml"
    config.write_text(text)
    done = subprocess.run([sys.executable, "-m", "node.cli", "status", "--json", "--config", str(config)],
                          capture_output=True, text=True, timeout=120, env={**os.environ})
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    page = analysed.app().get("/api/queue").json()
    assert status["studies_by_state"] == page["studies_by_state"]
    assert [s["study_instance_uid"] for s in status["studies"]] == [s["study_instance_uid"] for s in page["studies"]]


def _session(client: TestClient) -> tuple[str, str]:
    """Sign in: the session cookie and the CSRF value of the page that follows."""
    client.post("/login", data={"token": TOKEN})
    page = client.get("/failures", headers=HTML)
    return client.cookies["ichnode_session"], page.text.split('name="csrf" value="')[1].split('"')[0]


def test_every_sign_in_gets_a_session_of_its_own_and_sign_out_ends_it(analysed: Analysed) -> None:
    app = analysed.app(host="0.0.0.0").app
    first, second, again, stolen = (TestClient(app, base_url="http://127.0.0.1:8080") for _ in range(4))
    first_cookie, first_csrf = _session(first)
    second_cookie, second_csrf = _session(second)
    assert first_cookie != second_cookie and first_csrf != second_csrf
    assert TOKEN not in first_cookie and first_csrf not in (first_cookie, TOKEN)
    assert _session(again)[0] not in (first_cookie, second_cookie)  # the same token, a new session
    # One session's CSRF value is worth nothing in another.
    assert second.post("/failures/retry", data={"csrf": first_csrf}).status_code == 403

    stolen.cookies.set("ichnode_session", first_cookie)  # a copy of the cookie, kept from before the sign-out
    assert stolen.get("/api/queue").status_code == 200
    signed_out = first.post("/logout", follow_redirects=False)
    assert signed_out.status_code == 303 and 'ichnode_session=""' in signed_out.headers["set-cookie"]
    assert stolen.get("/api/queue").status_code == 401
    assert stolen.get("/", headers=HTML, follow_redirects=False).headers["location"] == "/login?next=%2F"
    assert stolen.post("/failures/retry", data={"csrf": first_csrf}).status_code == 403
    assert second.get("/api/queue").status_code == 200  # the other sign-in goes on
    assert second.post("/failures/retry", data={"csrf": second_csrf}, follow_redirects=False).status_code == 303


def test_the_session_cookie_is_http_only_strict_and_secure_over_tls(analysed: Analysed) -> None:
    for tls in (False, True):
        signed_in = analysed.app(host="0.0.0.0", tls=tls).post("/login", data={"token": TOKEN},
                                                                follow_redirects=False)
        flags = {flag.strip().lower() for flag in signed_in.headers["set-cookie"].split(";")[1:]}
        assert {"httponly", "samesite=strict", f"max-age={12 * 3600}"} <= flags
        assert ("secure" in flags) == tls


def test_an_expired_session_is_refused(analysed: Analysed) -> None:
    client = analysed.app(host="0.0.0.0", session_hours=1 / 3600)  # a second
    signed_in = client.post("/login", data={"token": TOKEN}, follow_redirects=False)
    client.cookies.clear()
    client.cookies.set("ichnode_session", signed_in.cookies["ichnode_session"])  # kept past its Max-Age
    wait_for(lambda: client.get("/api/queue").status_code == 401, timeout=30, what="the session to expire",
             every=0.1)
    assert client.get("/", headers=HTML, follow_redirects=False).headers["location"] == "/login?next=%2F"


def test_a_session_ends_after_its_lifetime_or_when_idle_whichever_comes_first() -> None:
    now = [0.0]
    sessions = Sessions(lifetime=100, idle=30, clock=lambda: now[0])
    used, idle = sessions.begin(), sessions.begin()
    for now[0] in (20, 40, 60, 80, 99):  # used every 20 s: the idle limit never comes
        assert sessions.find(used) is not None
    assert sessions.find(idle) is None  # 99 s without a request
    now[0] = 100
    assert sessions.find(used) is None  # its lifetime is over, however busy
    assert sessions.find("guessed") is None
    sessions.begin()
    assert len(sessions.open) == 1  # the ended ones are forgotten


def test_a_form_larger_than_the_limit_is_refused(analysed: Analysed) -> None:
    client = analysed.app()
    too_long = {"token": TOKEN, "padding": "x" * FORM_LIMIT}
    assert client.post("/login", data=too_long).status_code == 413
    assert client.post("/failures/retry", data=too_long).status_code == 413
    assert client.post("/failures/retry", data={"token": TOKEN}, follow_redirects=False).status_code == 303


@contextmanager
def _served(node: Analysed, **web: object) -> Iterator[int]:
    """The pages of `node` served by uvicorn as `ichnode serve` serves them; yields the port."""
    config = dataclasses.replace(node.config, web=dataclasses.replace(node.config.web, port=free_port(), **web))
    server = WebServer(config, create_app(config, *node.parts(config)))
    server.start()
    try:
        yield config.web.port
    finally:
        server.stop()


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _post_10_mb(port: int, path: str, *, chunked: bool) -> str:
    """POST a 10 MB form without credentials (160 fields of 64 KiB, each below the size
    Starlette refuses a field at), sent a field at a time so that this process holds no copy
    of it; the status line of the answer."""
    chunk = b"&f=" + b"x" * 65533
    framed = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n" if chunked else chunk
    length = "transfer-encoding: chunked" if chunked else f"content-length: {160 * len(chunk) + 6}"
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:

        def send() -> None:
            try:
                sock.sendall(f"POST {path} HTTP/1.1\r\nhost: 127.0.0.1\r\n{length}\r\n"
                             "content-type: application/x-www-form-urlencoded\r\n\r\n".encode())
                sock.sendall(b"6\r\ntoken=\r\n" if chunked else b"token=")
                for _ in range(160):
                    sock.sendall(framed)
                sock.sendall(b"0\r\n\r\n" if chunked else b"")
            except OSError:
                pass  # the node closed the connection: it reads no more

        sender = threading.Thread(target=send)
        sender.start()
        answer = sock.recv(4096)
        sender.join()
    return answer.split(b"\r\n")[0].decode()


def test_ten_megabyte_forms_without_credentials_are_refused_unread(analysed: Analysed) -> None:
    uid = sorted(_study_states(analysed))[0]
    targets = ["/login", "/failures/retry", f"/studies/{uid}/reanalyse"]
    with _served(analysed) as port:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM is now VmRSS: the peak from here on
        except OSError as exc:
            pytest.skip(f"the peak memory cannot be reset here: {exc}")
        before = _status_kb("VmRSS")
        answers: dict[tuple[str, bool], str] = {}
        senders = [threading.Thread(target=lambda p=path, c=chunked: answers.update({(p, c): _post_10_mb(port, p,
                                                                                                        chunked=c)}))
                   for path in targets for chunked in (False, True)]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        peak = _status_kb("VmHWM")
    assert set(answers.values()) == {"HTTP/1.1 413 Request Entity Too Large"}, answers
    assert peak - before < 50 * 1024, f"the node grew by {(peak - before) / 1024:.0f} MB"


def _until_closed(sock: socket.socket, *, within: float, trickle: bytes = b"") -> bytes:
    """What the node sends before it closes the connection; fails if it is still open
    `within` seconds from now. With `trickle`, one byte of it is sent at every look."""
    sock.settimeout(0.2)
    received, deadline = b"", time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if trickle:
                sock.send(trickle[:1])
                trickle = trickle[1:]
            data = sock.recv(4096)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            return received
        if not data:
            return received
        received += data
    pytest.fail(f"the node kept a connection open for {within} s (it sent {received!r})")


def test_connections_that_never_finish_their_request_are_closed(analysed: Analysed) -> None:
    partial = [b"", b"GET /healthz HT", b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n",
               b"POST /login HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: 100\r\n\r\ntoken="]
    with _served(analysed, request_timeout_seconds=1) as port:
        peers = [socket.create_connection(("127.0.0.1", port)) for _ in range(len(partial) + 2)]
        for sock, sent in zip(peers, partial):
            sock.sendall(sent)
        slow_loris, kept_alive = peers[-2:]
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        first = b""
        while b'"alive"' not in first:
            first += kept_alive.recv(4096)
        kept_alive.sendall(b"GET /healthz HT")  # uvicorn stops its keep-alive timer at the first byte
        for sock in peers[:-2]:
            assert _until_closed(sock, within=30) == b""
        assert _until_closed(slow_loris, within=30, trickle=b"GET /healthz HTTP/1.1\r\n" + b"x" * 1000) == b""
        assert _until_closed(kept_alive, within=30) == b""
        for sock in peers:
            sock.close()
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_connections_beyond_max_connections_are_refused_at_once_and_idle_ones_time_out(analysed: Analysed) -> None:
    with _served(analysed, max_connections=4, request_timeout_seconds=2) as port:
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(4 + 3)]
        answers = [_until_closed(sock, within=30) for sock in idle]
        for sock in idle:
            sock.close()
        assert sorted(answers) == [b""] * 4 + [b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n"
                                               b"connection: close\r\n\r\n"] * 3
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200


def test_a_repeated_warning_is_logged_once_per_interval() -> None:
    now = [0.0]
    once = OncePerInterval(60, clock=lambda: now[0])

    def record(name: str = "asyncio", level: int = logging.ERROR) -> logging.LogRecord:
        return logging.makeLogRecord({"name": name, "levelno": level, "msg": "socket.accept() out of system resource"})

    assert once.filter(record())
    assert not any(once.filter(record()) for _ in range(999))
    assert once.filter(record("uvicorn.error"))  # another logger's line is its own
    assert once.filter(record(level=logging.INFO))  # information is never held back
    now[0] = 60
    next_one = record()
    assert once.filter(next_one)
    assert next_one.getMessage().endswith("(999 more like this in the last 60 s, not logged)")


def test_accepts_failing_for_want_of_descriptors_are_logged_once_per_interval(
        analysed: Analysed, caplog: pytest.LogCaptureFixture) -> None:
    """What filled the log in the incident: asyncio logs every failed accept, up to the listen
    backlog's worth a second."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    failed_accepts: list[logging.LogRecord] = []

    def count(record: logging.LogRecord) -> bool:  # ahead of the node's filter: sees every one
        if "out of system resource" in record.getMessage():
            failed_accepts.append(record)
        return True

    logging.getLogger("asyncio").addFilter(count)
    with _served(analysed) as port:
        peers = [socket.socket() for _ in range(3)]
        fillers: list[int] = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(map(int, os.listdir("/proc/self/fd"))) + 1, hard))
        try:
            with contextlib.suppress(OSError):
                while True:  # every descriptor number below the limit in use: the node can accept nothing
                    fillers.append(os.open(os.devnull, os.O_RDONLY))
            for sock in peers:
                sock.connect(("127.0.0.1", port))  # the kernel completes these; the node cannot accept them
            wait_for(lambda: len(failed_accepts) >= 3, timeout=30, what="three failed accepts")
        finally:
            logging.getLogger("asyncio").removeFilter(count)
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
            for sock in peers:
                sock.close()
    failed = [r for r in caplog.records if r.getMessage().startswith("socket.accept() out of system resource")]
    assert len(failed) == 1 and "Too many open files" in caplog.text
