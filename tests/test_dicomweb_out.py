"""DICOMweb destinations: the node's results (SC, SR, KOS of a real analysis) go to a real
Orthanc by STOW-RS through the same retried deliveries as C-STORE; a destination that is
down, refuses the credentials or refuses parts is retried and named, never with its secret.

One Orthanc with its DICOMweb plugin and HTTP basic authentication serves the module;
bearer tokens and refused parts are shown by a small STOW-RS answerer on loopback
(Orthanc has no bearer sign-in and stores whatever it can parse).
"""

from __future__ import annotations

import base64
import http.server
import io
import json
import socket
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch

from starlette.testclient import TestClient

from node.analysis import AnalysisSettings, analyse
from node.config import Config, check_paths, load_config, parse_config
from node.dashboard import Dashboard, ModelInfo
from node.delivery import Deliveries, senders
from node.errors import ConfigError
from node.health import Readiness
from node.history import TriageHistory
from node.output import KosFor, ResultKind, encode
from node.status import print_status
from node.triagelog import TriageLog, read_events
from node.web import create_app
from node.worker import read_slice
from storage.db import Database, Delivery, DeliveryState, Study, StudyState, utcnow
from storage.store import InstanceStore
from tests.conftest import load_labels
from tests.peers import NodeProcess, Orthanc, free_port, node_config, storescu, wait_for
from training.inference.predictor import Predictor
from training.inference.settings import Device
from training.model.architectures import create_model
from training.model.checkpoint import Provenance, default_model_config, save_checkpoint
from training.model.rule import TriageRule
from training.model.series import read_header

USER, PASSWORD = "ichnode", "pacs-s3cret-word"
TOKEN = "bearer-t0ken-never-shown"
KINDS = ("sc", "sr", "kos")


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc with STOW-RS behind HTTP basic authentication."""
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True, settings={
        "AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}}).start()
    yield orthanc
    orthanc.stop()


def _rest(orthanc: Orthanc, path: str, *, method: str = "GET", signed_in: bool = True):
    """Orthanc's REST API, signed in as USER when it asks for it."""
    request = urllib.request.Request(f"{orthanc.url}{path}", method=method)
    if signed_in:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode())
    with urllib.request.urlopen(request, timeout=10) as response:
        body = response.read()
    return json.loads(body) if body else None


def _instances_in(orthanc: Orthanc, *, signed_in: bool = True) -> list[str]:
    """SOPInstanceUIDs of every instance the PACS holds."""
    return [_rest(orthanc, f"/instances/{i}", signed_in=signed_in)["MainDicomTags"]["SOPInstanceUID"]
            for i in _rest(orthanc, "/instances", signed_in=signed_in)]


def _empty(orthanc: Orthanc) -> None:
    for study in _rest(orthanc, "/studies"):
        _rest(orthanc, f"/studies/{study}", method="DELETE")


@pytest.fixture(scope="module")
def results(positive_study: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flagged study's SC, SR and KOS made by the node's own analysis, named as the
    worker names them (<kind>-NNNN.dcm)."""
    config = default_model_config("resnet18", Provenance(training_data="synthetic"))
    predictor = Predictor(create_model("resnet18"), config, device=Device("cpu"))
    settings = AnalysisSettings(rule=TriageRule(slice_threshold=0.0), min_slices=10, max_unusable_fraction=0.1,
                                key_slices=2, aug_smooth=False, objects=tuple(ResultKind), manufacturer="ichnode",
                                institution_name="Test Hospital", device_uid="1.2.826.0.1.3680043.8.498.78",
                                device_name="ICHNODE", kos_for=KosFor.FLAGGED)
    headers = [read_header(path) for path in sorted(positive_study.rglob("*.dcm"))]
    result = analyse(headers, read_slice, predictor, settings, series_number=9900)
    folder = tmp_path_factory.mktemp("results")
    for kind, datasets in result.objects.items():
        for ds in datasets:
            (folder / f"{kind}-{ds.InstanceNumber:04d}.dcm").write_bytes(encode(ds))
    assert {path.name.split("-")[0] for path in folder.iterdir()} == set(KINDS)
    return folder


def _sop_uids(folder: Path) -> list[str]:
    return sorted(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID for path in folder.glob("*.dcm"))


def _config_text(folder: Path, destination: str) -> str:
    """A node config with one [[destinations]] table and a back-off long enough that one
    `send_due` attempts each delivery once (`Node.back_off_passed` makes them due again)."""
    return node_config(folder, port=free_port(), checkpoint=None, overrides={
        "delivery": {"initial_backoff_seconds": 60, "max_backoff_seconds": 60, "max_attempts": 5,
                     "timeout_seconds": 10}}) + f"\n[[destinations]]\n{destination}"


def _dicomweb(url: str, auth: str = "none", credentials: Path | None = None) -> str:
    return (f'name = "web"\nkind = "dicomweb"\nurl = "{url}"\nauth = "{auth}"\n'
            + (f'credentials_file = "{credentials}"\n' if credentials else ""))


class Node:
    """The node's deliveries without a node: a database holding one done study whose SC,
    SR and KOS are due for the one destination, sent by the senders `serve` uses."""

    def __init__(self, folder: Path, destination: str, results: Path) -> None:
        path = folder / "node.toml"
        path.write_text(_config_text(folder, destination))
        self.config: Config = load_config(path)
        self.destination = self.config.destinations[0]
        self.database = Database(self.config.storage.database_url, create=True)
        self.store = InstanceStore(self.config.storage.root)
        result_folder = "results/1.2.3/1.2.3.9"
        (self.store.absolute(result_folder)).mkdir(parents=True)
        for path in results.iterdir():
            (self.store.absolute(result_folder) / path.name).write_bytes(path.read_bytes())
        with self.database.write() as session:
            study = Study(study_instance_uid="1.2.3", state=StudyState.DONE, first_received_at=utcnow(),
                          last_received_at=utcnow(), verdict="SUSPECTED - PRIORITY")
            session.add(study)
            session.flush()
            for kind in KINDS:
                session.add(Delivery(study_id=study.id, destination=self.destination.name, kind=kind,
                                     result_folder=result_folder, state=DeliveryState.PENDING,
                                     next_attempt_at=utcnow(), priority_high=True))
        self.deliveries = Deliveries(self.config, self.database, self.store, senders(self.config),
                                     TriageLog(self.config.log.path))

    def send_due(self) -> int:
        return self.deliveries.send_due(self.destination)

    def rows(self) -> list[Delivery]:
        with self.database.read() as session:
            return list(session.query(Delivery).order_by(Delivery.kind))

    def events(self, name: str) -> list[dict]:
        return [e for e in read_events(self.config.log.path) if e["event"] == name]

    def back_off_passed(self) -> None:
        """Pending deliveries due now, as they are once their back-off has passed."""
        with self.database.write() as session:
            for row in session.query(Delivery).filter(Delivery.state == DeliveryState.PENDING):
                row.next_attempt_at = utcnow()

    def all_sent(self) -> bool:
        return all(row.state == DeliveryState.SENT for row in self.rows())


def _credentials(folder: Path, secret: str) -> Path:
    path = folder / "pacs.secret"
    path.write_text(secret + "\n")
    path.chmod(0o600)
    return path


def test_results_go_to_orthanc_by_stow_rs_signed_in_with_basic_auth(pacs: Orthanc, results: Path,
                                                                     tmp_path: Path) -> None:
    _empty(pacs)
    node = Node(tmp_path, _dicomweb(pacs.dicomweb_url, "basic", _credentials(tmp_path, f"{USER}:{PASSWORD}")),
                results)
    assert node.send_due() == 3
    assert [row.state for row in node.rows()] == [DeliveryState.SENT] * 3
    assert sorted(_instances_in(pacs)) == _sop_uids(results)
    modalities = {_rest(pacs, f"/series/{s}")["MainDicomTags"]["Modality"] for s in _rest(pacs, "/series")}
    assert modalities == {"OT", "SR", "KO"}
    delivered = node.events("delivered")
    assert sorted(e["kind"] for e in delivered) == sorted(KINDS) and all(e["destination"] == "web" for e in delivered)
    assert node.send_due() == 0  # nothing is sent twice


def _pages(node: Node, *paths: str) -> list:
    """The node's web pages (and API) over its own database, as `serve` shows them."""
    config = node.config
    dashboard = Dashboard(config, node.database, node.store, TriageHistory(config.log.path), ModelInfo.of(config, None))
    readiness = Readiness(node.database, node.store, 0, model_loaded=False, model_configured=False,
                          scheduler_running=lambda: True, worker=None, worker_stale_seconds=120)
    web = TestClient(create_app(config, dashboard, readiness), base_url="http://127.0.0.1:8080")
    pages = [web.get(path) for path in paths]
    assert all(page.status_code == 200 for page in pages)
    return pages


def test_a_wrong_password_is_named_as_refused_credentials_retried_and_never_shown(pacs: Orthanc, results: Path,
                                                                                   tmp_path: Path) -> None:
    _empty(pacs)
    secret = _credentials(tmp_path, f"{USER}:wrong-{PASSWORD}")
    node = Node(tmp_path, _dicomweb(pacs.dicomweb_url, "basic", secret), results)
    assert node.send_due() == 3
    rows = node.rows()
    assert all(row.state == DeliveryState.PENDING and row.attempts == 1 for row in rows)  # to be retried
    assert "the destination refused the node's credentials (HTTP 401)" in rows[0].last_error
    assert pacs.dicomweb_url in rows[0].last_error
    out = io.StringIO()
    print_status(node.config, out)  # `ichnode status`
    assert f"destinations:  web {pacs.dicomweb_url}\n" in out.getvalue()
    print_status(node.config, out, as_json_text=True)
    assert "HTTP 401" in out.getvalue()
    pages = [page.text for page in _pages(node, "/studies/1.2.3", "/api/studies/1.2.3")]
    assert all(pacs.dicomweb_url in page and "credentials (HTTP 401)" in page for page in pages)
    for shown in (out.getvalue(), *pages, node.config.log.path.read_text(), *(row.last_error for row in rows)):
        assert PASSWORD not in shown
    assert _instances_in(pacs) == []

    secret.write_text(f"{USER}:{PASSWORD}\n")  # fixed without a restart: the file is read at each send
    node.back_off_passed()
    assert node.send_due() == 3 and node.all_sent()
    assert sorted(_instances_in(pacs)) == _sop_uids(results)
    assert [row.attempts for row in node.rows()] == [2, 2, 2]


def test_a_destination_down_then_up_gets_the_results_once(results: Path, tmp_path: Path) -> None:
    later = Orthanc(tmp_path / "orthanc", dicomweb=True)  # its port chosen, not started: down
    node = Node(tmp_path, _dicomweb(later.dicomweb_url), results)
    try:
        assert node.send_due() == 3
        rows = node.rows()
        assert all(row.state == DeliveryState.PENDING for row in rows)
        assert "could not be reached ([Errno 111] Connection refused)" in rows[0].last_error
        assert len(node.events("delivery_failed")) == 3
        later.start()
        node.back_off_passed()
        assert node.send_due() == 3 and node.all_sent()
        assert sorted(_instances_in(later, signed_in=False)) == _sop_uids(results)
        changes = [c for c in _rest(later, "/changes?limit=1000", signed_in=False)["Changes"]
                   if c["ChangeType"] == "NewInstance"]
        assert len(changes) == len(_sop_uids(results))  # each instance stored once
        assert sorted(e["kind"] for e in node.events("delivered")) == sorted(KINDS)
        assert node.send_due() == 0
    finally:
        later.stop()


def _read_body(request: http.server.BaseHTTPRequestHandler) -> None:
    """Read a request body to its end, whole or chunked (dicomweb-client chunks bodies over 1 MB)."""
    if "Content-Length" in request.headers:
        request.rfile.read(int(request.headers["Content-Length"]))
        return
    while size := int(request.rfile.readline().split(b";")[0], 16):
        request.rfile.read(size + 2)  # the chunk and its CRLF
    request.rfile.readline()  # the CRLF after the last, empty chunk


class StowAnswerer:
    """A STOW-RS endpoint on loopback that records each request's Authorization header and
    answers as told: `status` with the DICOM JSON `answer`."""

    def __init__(self, status: int, answer: dict) -> None:
        self.authorizations: list[str | None] = []
        answerer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                _read_body(self)
                answerer.authorizations.append(self.headers.get("Authorization"))
                body = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/dicom+json")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        threading.Thread(target=self.server.serve_forever, daemon=True, name="stow-answerer").start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_a_bearer_token_is_sent_and_an_unconfirmed_store_is_retried(results: Path, tmp_path: Path) -> None:
    answerer = StowAnswerer(200, {})  # 200 with no Referenced SOP Sequence: nothing confirmed
    try:
        node = Node(tmp_path, _dicomweb(answerer.url, "bearer", _credentials(tmp_path, TOKEN)), results)
        assert node.send_due() == 3
    finally:
        answerer.stop()
    assert answerer.authorizations == [f"Bearer {TOKEN}"] * 3
    rows = node.rows()
    assert all(row.state == DeliveryState.PENDING for row in rows)
    assert "did not confirm" in rows[0].last_error and "Referenced SOP Sequence" in rows[0].last_error
    assert all(TOKEN not in row.last_error for row in rows) and TOKEN not in node.config.log.path.read_text()


REFUSED = {"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": ["1.2.3.4.5"]},
                                                "00081197": {"vr": "US", "Value": [0xA700]}}]}}


@pytest.mark.parametrize(("status", "answer", "said"), [
    (409, REFUSED, "stored none of the results (HTTP 409), refused: 1.2.3.4.5: 0xA700 (Failure: Refused: Out of"),
    (202, REFUSED, "refused part of the results: 1.2.3.4.5: 0xA700 (Failure: Refused: Out of"),
    (503, {}, "answered the STOW-RS request with HTTP 503 Service Unavailable"),
])
def test_refused_parts_and_server_errors_are_named_and_retried(status: int, answer: dict, said: str, results: Path,
                                                               tmp_path: Path) -> None:
    answerer = StowAnswerer(status, answer)
    try:
        node = Node(tmp_path, _dicomweb(answerer.url), results)
        assert node.send_due() == 3
    finally:
        answerer.stop()
    rows = node.rows()
    assert said in rows[0].last_error and answerer.url in rows[0].last_error
    assert all(row.state == DeliveryState.PENDING and row.attempts == 1 for row in rows)


def test_a_destination_that_never_answers_is_cut_off_at_its_timeout(results: Path, tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0), backlog=8) as silent:  # connects, never accepts or answers
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/dicom-web"
        node = Node(tmp_path, _dicomweb(url) + "timeout_seconds = 1\n", results)
        assert node.send_due() == 3
    rows = node.rows()
    assert "did not answer the STOW-RS request within 1 s" in rows[0].last_error
    assert all(row.state == DeliveryState.PENDING for row in rows)


def test_a_vanished_credentials_file_fails_the_attempt_with_its_name(results: Path, tmp_path: Path) -> None:
    secret = _credentials(tmp_path, TOKEN)
    node = Node(tmp_path, _dicomweb("http://127.0.0.1:1/dicom-web", "bearer", secret), results)
    secret.unlink()
    assert node.send_due() == 3
    row = node.rows()[0]
    assert row.state == DeliveryState.PENDING and "credentials_file" in row.last_error and str(secret) in row.last_error


DIMSE = {"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": 4242}
WEB = {"name": "web", "kind": "dicomweb", "url": "https://pacs.example.org/dicom-web"}


@pytest.mark.parametrize(("table", "key"), [
    ({"name": "web", "kind": "dicomweb"}, "destinations[0].url"),
    ({**WEB, "ae_title": "PACS"}, "destinations[0].ae_title"),
    ({**WEB, "port": 104}, "destinations[0].port"),
    ({**DIMSE, "url": "https://pacs.example.org/dicom-web"}, "destinations[0].url"),
    ({**DIMSE, "auth": "basic"}, "destinations[0].auth"),
    ({**DIMSE, "credentials_file": "pacs.secret"}, "destinations[0].credentials_file"),
    ({**DIMSE, "timeout_seconds": 5}, "destinations[0].timeout_seconds"),
    ({**WEB, "timeout_seconds": 0}, "destinations[0].timeout_seconds"),
    ({**WEB, "auth": "bearer"}, "destinations[0].credentials_file"),
    ({**WEB, "url": "https://user:pass@pacs.example.org/dicom-web"}, "destinations[0].url"),
    ({**WEB, "kind": "fhir"}, "destinations[0].kind"),
    ({"name": "pacs", "host": "127.0.0.1", "port": 4242}, "destinations[0].ae_title"),
])
def test_a_destination_of_the_wrong_shape_is_refused_naming_the_key(table: dict, key: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({"destinations": [table]}, tmp_path)
    assert key in str(error.value)
    assert "pass" not in str(error.value).replace("password", "")  # the URL's secret is not repeated


def test_a_missing_credentials_file_stops_start_up_naming_the_key(tmp_path: Path) -> None:
    config = parse_config({"storage": {"root": str(tmp_path / "store")}, "log": {"path": str(tmp_path / "t.log")},
                           "destinations": [{**WEB, "auth": "basic", "credentials_file": "gone.secret"}]}, tmp_path)
    assert config.destinations[0].described == "https://pacs.example.org/dicom-web"
    with pytest.raises(ConfigError, match=r"destinations\[0\]\.credentials_file .*gone\.secret does not exist"):
        check_paths(config)


def test_a_flagged_study_sent_to_a_real_node_arrives_in_orthanc_by_stow_rs(
        pacs: Orthanc, positive_study: Path, tmp_path: Path) -> None:
    _empty(pacs)
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "resnet18.pt", create_model("resnet18"), default_model_config("resnet18"))
    port = free_port()
    text = node_config(tmp_path, port=port, checkpoint=checkpoint, overrides={"output": {"kos_for": "all"}})
    text += "\n[[destinations]]\n" + _dicomweb(pacs.dicomweb_url, "basic",
                                               _credentials(tmp_path, f"{USER}:{PASSWORD}"))
    node = NodeProcess(tmp_path, text, port).start()
    try:
        files = sorted(positive_study.glob("*/*.dcm"))
        assert storescu(port, files).returncode == 0
        study_uid = load_labels(positive_study)["study_instance_uid"]
        wait_for(lambda: [e["event"] for e in read_events(tmp_path / "triage.log")
                          if e["study_instance_uid"] == study_uid].count("delivered") == 3,
                 timeout=300, what="SC, SR and KOS delivered")
        assert f"destinations: web={pacs.dicomweb_url}" in node.output()
        assert PASSWORD not in node.output()
    finally:
        node.stop()
    (study,) = [s for s in _rest(pacs, "/studies?expand")]
    assert study["MainDicomTags"]["StudyInstanceUID"] == study_uid
    modalities = sorted(_rest(pacs, f"/series/{s}")["MainDicomTags"]["Modality"] for s in study["Series"])
    assert modalities == ["KO", "OT", "SR"]
