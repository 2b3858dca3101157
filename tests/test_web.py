"""The web pages, /metrics, /healthz, /readyz and the JSON API, in process.

Two synthetic studies go through the real ingest and worker with the demonstration model
(one with bleeds, one without); the app is then asked over HTTP as a browser or
Prometheus would ask it. The real browser and the retry against a real PACS are in
tests/test_web_browser.py.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import socket
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

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
from node.web import create_app
from node.worker import Worker
from storage.db import Database, Study, StudyState
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

    def app(self, **web: object) -> TestClient:
        config = dataclasses.replace(self.config, web=dataclasses.replace(self.config.web, **web))
        return TestClient(create_app(config, *self.parts(config)), base_url="http://127.0.0.1:8080")

    def parts(self, config: Config) -> tuple[Dashboard, Readiness]:
        dashboard = Dashboard(config, self.database, self.store, TriageHistory(config.log.path),
                              ModelInfo.of(config, self.predictor))
        readiness = Readiness(self.database, self.store, config.storage.min_free_mb, model_loaded=True,
                              model_configured=True, scheduler_running=lambda: True, worker=Liveness(),
                              worker_stale_seconds=config.worker.stale_after_seconds)
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
        assert [(d["target"], d["state"]) for d in row["deliveries"]] == [("pacs", "pending")] * 3

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
    assert samples[("ichnode_queue_depth", (("queue", "delivery"),))] == 6
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
    assert set(ready.json()["checks"]) == {"database", "storage", "model", "scheduler", "worker"}


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
