"""STOW-RS receive: real HTTP clients (dicomweb-client, httpx, raw sockets) against the
node's web server, in this process for the refusals and limits, and a whole node (serve)
with Orthanc as the PACS for a study that arrives by STOW-RS and is analysed."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import generate_uid

from node.config import Config, DicomwebPeer, HttpAuth, parse_config
from node.dashboard import Dashboard, ModelInfo
from node.dicomweb import open_client
from node.errors import ConfigError
from node.health import Liveness, Readiness
from node.history import TriageHistory
from node.ingest import Ingest, Status
from node.stow_in import CALLING_AET, StowReceiver
from node.triagelog import TriageLog, read_events
from node.web import create_app
from node.webserver import WebServer
from storage.db import Database, Instance
from storage.store import InstanceStore
from tests.conftest import load_labels
from training.model import attributes as attr
from tests.peers import NodeProcess, Orthanc, free_port, node_config, port_open, wait_for

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "data" / "corpus"  # real scanner CT, sources and licences in tests/data/README.md
DEMO_MODEL = REPO / "models" / "effclass-synthetic-demo.pt"
WEB_TOKEN = "web-token-0123456789abcdef"
STOW_TOKEN = "stow-token-0123456789abcdef"
BOUNDARY = "stow-test-boundary-7d3f"
MULTIPART = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


@dataclass
class Receiving:
    """A node's store, database and ingest, with its web server answering STOW-RS."""

    config: Config
    database: Database
    store: InstanceStore
    ingest: Ingest

    @contextlib.contextmanager
    def served(self, spool_folder: Path | None = None, **dicomweb: object) -> Iterator[str]:
        """The web server with STOW-RS on a free port; yields its base URL."""
        config = dataclasses.replace(self.config, web=dataclasses.replace(self.config.web, port=free_port()),
                                     dicomweb=dataclasses.replace(self.config.dicomweb, **dicomweb))
        dashboard = Dashboard(config, self.database, self.store, TriageHistory(config.log.path),
                              ModelInfo.of(config, None))
        readiness = Readiness(self.database, self.store, 0, model_loaded=False, model_configured=False,
                              scheduler_running=lambda: True, worker=Liveness(),
                              worker_stale_seconds=config.worker.stale_after_seconds, alerts=config.alerts)
        stow = StowReceiver(config.dicomweb, config.web.token, self.ingest, spool_folder or config.storage.root)
        server = WebServer(config, create_app(config, dashboard, readiness, stow))
        server.start()
        try:
            yield f"http://127.0.0.1:{config.web.port}"
        finally:
            server.stop()

    def stored(self) -> set[str]:
        """SOP Instance UIDs in the database whose file is on disk, all from STOW-RS."""
        with self.database.read() as session:
            rows = session.query(Instance).all()
            assert all(row.calling_aet == CALLING_AET for row in rows)
            return {row.sop_instance_uid for row in rows if (self.store.root / row.path).is_file()}

    def spooled(self) -> list[Path]:
        return list(self.store.root.glob(".stow-*"))


def _config(folder: Path, **dicomweb: object) -> Config:
    return parse_config({
        "storage": {"root": str(folder / "store"), "database_url": f"sqlite:///{folder / 'node.db'}",
                    "min_free_mb": 0},
        "log": {"path": str(folder / "triage.log")},
        "web": {"token": WEB_TOKEN},
        "dicomweb": {"enabled": True, **dicomweb},
    }, folder)


@pytest.fixture
def receiving(tmp_path: Path) -> Receiving:
    config = _config(tmp_path, token=STOW_TOKEN)
    store = InstanceStore(config.storage.root)
    store.ensure()
    database = Database(config.storage.database_url, create=True)
    return Receiving(config, database, store, Ingest(store, database, TriageLog(config.log.path)))


def _files(study: Path) -> list[Path]:
    return sorted(study.rglob("*.dcm"))


def _multipart(*parts: bytes, content_type: str = "application/dicom") -> bytes:
    body = b"".join(f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + part + b"\r\n"
                    for part in parts)
    return body + f"--{BOUNDARY}--\r\n".encode()


def _encoded(ds: pydicom.Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _post(url: str, body: bytes, *, token: str | None = STOW_TOKEN, path: str = "/dicomweb/studies",
          content_type: str = MULTIPART) -> httpx.Response:
    headers = {"content-type": content_type, "accept": "application/dicom+json"}
    if token is not None:
        headers["authorization"] = f"Bearer {token}"
    return httpx.post(url + path, content=body, headers=headers, timeout=60)


def _failures(answer: httpx.Response) -> list[tuple[str | None, int]]:
    """(Referenced SOP Instance UID or None, Failure Reason) of each Failed SOP Sequence item."""
    items = answer.json().get("00081198", {}).get("Value", [])
    return [(item.get("00081155", {}).get("Value", [None])[0], item["00081197"]["Value"][0]) for item in items]


def _references(answer: httpx.Response) -> set[str]:
    items = answer.json().get("00081199", {}).get("Value", [])
    return {item["00081155"]["Value"][0] for item in items}


def test_a_study_stored_by_dicomweb_client_is_on_disk_and_in_the_database(
        receiving: Receiving, positive_study: Path, tmp_path: Path) -> None:
    datasets = [pydicom.dcmread(path) for path in _files(positive_study)]
    credentials = tmp_path / "stow.token"
    credentials.write_text(STOW_TOKEN + "\n")
    with receiving.served() as url:
        client = open_client(DicomwebPeer(f"{url}/dicomweb", auth=HttpAuth.BEARER, credentials_file=credentials),
                             "test")
        answer = client.store_instances(datasets)
    sent = {str(ds.SOPInstanceUID) for ds in datasets}
    referenced = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
    assert referenced == sent and "FailedSOPSequence" not in answer
    assert receiving.stored() == sent
    # What is on disk is the file as sent, byte for byte.
    with receiving.database.read() as session:
        row = session.query(Instance).filter_by(sop_instance_uid=str(datasets[0].SOPInstanceUID)).one()
        assert (receiving.store.root / row.path).read_bytes() == _files(positive_study)[0].read_bytes()
    assert receiving.spooled() == []


def test_real_scanner_ct_is_stored_as_sent(receiving: Receiving) -> None:
    """The conformance corpus (tests/data/corpus: five vendors, JPEG Lossless, JPEG 2000,
    JPEG-LS, RLE, Enhanced CT, a Japanese character set, missing attributes) by STOW-RS:
    every file stored, byte for byte, one study per request."""
    studies = sorted({path.parent for path in CORPUS.rglob("*.dcm")})
    sent: dict[str, bytes] = {}
    with receiving.served() as url:
        for study in studies:
            files = {attr.uid(pydicom.dcmread(path, stop_before_pixels=True), "SOPInstanceUID"): path.read_bytes()
                     for path in sorted(study.glob("*.dcm"))}
            answer = _post(url, _multipart(*files.values()))
            assert answer.status_code == 200, (study.name, answer.text)
            assert _failures(answer) == [] and _references(answer) == set(files)
            sent.update(files)
    assert len(sent) == len(list(CORPUS.rglob("*.dcm"))) and receiving.stored() == set(sent)
    with receiving.database.read() as session:
        for row in session.query(Instance).all():
            assert (receiving.store.root / row.path).read_bytes() == sent[row.sop_instance_uid]


def test_refused_parts_are_listed_while_the_good_ones_are_stored(receiving: Receiving, positive_study: Path) -> None:
    good, other, no_uid = (pydicom.dcmread(path) for path in _files(positive_study)[:3])
    study_uid = str(good.StudyInstanceUID)
    other.StudyInstanceUID = generate_uid()  # of another study than the URL names
    del no_uid.SOPInstanceUID
    body = _multipart(_encoded(good), b"this is not a DICOM file at all", _encoded(other), _encoded(no_uid))
    with receiving.served() as url:
        answer = _post(url, body, path=f"/dicomweb/studies/{study_uid}")
    assert answer.status_code == 202, answer.text
    assert answer.headers["content-type"].startswith("application/dicom+json")
    assert _references(answer) == {str(good.SOPInstanceUID)}
    assert _failures(answer) == [(None, Status.CANNOT_UNDERSTAND), (str(other.SOPInstanceUID), Status.DATASET_MISMATCH),
                                 (None, Status.DATASET_MISMATCH)]
    assert receiving.stored() == {str(good.SOPInstanceUID)}


def test_a_request_whose_parts_all_fail_is_answered_409(receiving: Receiving) -> None:
    with receiving.served() as url:
        answer = _post(url, _multipart(b"\x00" * 200, b"DICM"))
        wrong_type = _post(url, _multipart(b"{}", content_type="application/dicom+json"))
    assert answer.status_code == 409 and _failures(answer) == [(None, Status.CANNOT_UNDERSTAND)] * 2
    assert wrong_type.status_code == 409 and _failures(wrong_type) == [(None, Status.CANNOT_UNDERSTAND)]
    assert receiving.stored() == set()


def test_a_part_over_max_instance_mb_is_a_failed_part(receiving: Receiving, positive_study: Path) -> None:
    small, large = (pydicom.dcmread(path) for path in _files(positive_study)[:2])
    large.add_new(0x00091010, "OB", b"\x00" * (1 << 20))  # a private element: the file is over 1 MiB
    with receiving.served(max_instance_mb=1) as url:
        answer = _post(url, _multipart(_encoded(large), _encoded(small)))
    assert answer.status_code == 202
    assert _failures(answer) == [(None, Status.OUT_OF_RESOURCES)]
    assert receiving.stored() == {str(small.SOPInstanceUID)}


@pytest.mark.parametrize("token", [None, "wrong-token-0123456789abcdef", WEB_TOKEN])
def test_without_the_dicomweb_token_nothing_is_stored(receiving: Receiving, positive_study: Path,
                                                      token: str | None) -> None:
    body = _multipart(_files(positive_study)[0].read_bytes())
    with receiving.served() as url:
        answer = _post(url, body, token=token)
    assert answer.status_code == 401 and answer.headers["www-authenticate"] == "Bearer"
    assert "dicomweb.token" in answer.text
    assert receiving.stored() == set() and receiving.spooled() == []


def test_the_web_token_protects_stow_rs_when_dicomweb_token_is_empty(tmp_path: Path, positive_study: Path) -> None:
    config = _config(tmp_path)
    store = InstanceStore(config.storage.root)
    store.ensure()
    database = Database(config.storage.database_url, create=True)
    receiving = Receiving(config, database, store, Ingest(store, database, TriageLog(config.log.path)))
    body = _multipart(_files(positive_study)[0].read_bytes())
    with receiving.served() as url:
        assert _post(url, body, token=STOW_TOKEN).status_code == 401
        assert _post(url, body, token=WEB_TOKEN).status_code == 200
    assert len(receiving.stored()) == 1


def test_other_content_types_and_malformed_bodies_are_refused(receiving: Receiving, positive_study: Path) -> None:
    part = _files(positive_study)[0].read_bytes()
    whole = _multipart(part)
    with receiving.served() as url:
        assert _post(url, part, content_type="application/dicom").status_code == 415
        assert _post(url, whole, content_type=f"multipart/related; type=\"application/dicom+json\"; "
                                              f"boundary={BOUNDARY}").status_code == 415
        assert _post(url, whole, content_type='multipart/related; type="application/dicom"').status_code == 400
        truncated = _post(url, whole[: len(whole) // 2])
        not_multipart = _post(url, b"hello")
    assert truncated.status_code == 400 and "closing boundary" in truncated.text
    assert not_multipart.status_code == 400
    assert receiving.stored() == set() and receiving.spooled() == []


def test_a_body_that_cannot_be_spooled_is_answered_503(receiving: Receiving, positive_study: Path,
                                                        tmp_path: Path) -> None:
    with receiving.served(spool_folder=tmp_path / "gone") as url:
        answer = _post(url, _multipart(_files(positive_study)[0].read_bytes()))
    assert answer.status_code == 503 and "could not spool" in answer.text
    assert receiving.stored() == set()


def _status_kb(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def _answer_to(url: str, head: str, body: Iterator[bytes]) -> str:
    """Send `head` and then `body` on a raw connection, stopping when the node closes it;
    the status line of the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:

        def send() -> None:
            try:
                sock.sendall(head.encode())
                for chunk in body:
                    sock.sendall(chunk)
            except OSError:
                pass  # the node closed the connection: it reads no more

        sender = threading.Thread(target=send)
        sender.start()
        answer = sock.recv(4096)
        with contextlib.suppress(OSError):  # already closed by the node
            sock.shutdown(socket.SHUT_RDWR)  # the sender stops at once
        sender.join()
    return answer.split(b"\r\n")[0].decode()


def test_a_two_gigabyte_body_is_refused_without_memory_growth(receiving: Receiving) -> None:
    """Declared: refused unread. Chunked (2 GiB offered as fast as loopback takes it): read
    up to dicomweb.max_request_mb (64 MiB here), spooled to disk, then refused; this
    process (server and client) must not grow by anything near the 64 MiB it read."""
    megabyte = b"x" * (1 << 20)
    framed = f"{len(megabyte):x}\r\n".encode() + megabyte + b"\r\n"
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {STOW_TOKEN}\r\n"
            f"content-type: {MULTIPART}\r\n")
    with receiving.served(max_request_mb=64) as url:
        try:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM is now VmRSS: the peak from here on
        except OSError as exc:
            pytest.skip(f"the peak memory cannot be reset here: {exc}")
        before = _status_kb("VmRSS")
        declared = _answer_to(url, head + f"content-length: {2 * 2**30 + 1}\r\n\r\n", iter([megabyte] * 2048))
        chunked = _answer_to(url, head + "transfer-encoding: chunked\r\n\r\n", iter([framed] * 2049))
        peak = _status_kb("VmHWM")
    assert declared == chunked == "HTTP/1.1 413 Request Entity Too Large"
    assert peak - before < 24 * 1024, f"grew by {(peak - before) / 1024:.0f} MiB"
    assert receiving.stored() == set() and receiving.spooled() == []


def test_a_stow_body_gets_dicomweb_request_timeout_not_the_pages_one(receiving: Receiving,
                                                                      positive_study: Path) -> None:
    body = _multipart(_files(positive_study)[0].read_bytes())
    receiving.config = dataclasses.replace(receiving.config, web=dataclasses.replace(
        receiving.config.web, request_timeout_seconds=0.5))
    head = (f"POST /dicomweb/studies HTTP/1.1\r\nhost: 127.0.0.1\r\nauthorization: Bearer {STOW_TOKEN}\r\n"
            f"content-type: {MULTIPART}\r\ncontent-length: {len(body)}\r\n\r\n")

    def slowly() -> Iterator[bytes]:
        yield body[:100]
        time.sleep(1.5)  # past web.request_timeout_seconds, well within dicomweb.request_timeout_seconds
        yield body[100:]

    with receiving.served(request_timeout_seconds=30) as url:
        assert _answer_to(url, head, slowly()) == "HTTP/1.1 200 OK"
    assert len(receiving.stored()) == 1


@pytest.mark.parametrize(("dicomweb", "web", "key"), [
    ({"enabled": True}, {}, "dicomweb.token or web.token"),
    ({"enabled": True, "token": STOW_TOKEN}, {"enabled": False}, "web.enabled"),
    ({"token": "short"}, {}, "dicomweb.token"),
    ({"max_request_mb": 0}, {}, "dicomweb.max_request_mb"),
    ({"max_instance_mb": 4096}, {}, "dicomweb.max_instance_mb"),
    ({"request_timeout_seconds": 0}, {}, "dicomweb.request_timeout_seconds"),
])
def test_config_errors_name_the_key(tmp_path: Path, dicomweb: dict, web: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(key)):
        parse_config({"storage": {"root": str(tmp_path)}, "web": web, "dicomweb": dicomweb}, tmp_path)


def test_a_study_sent_by_stow_rs_is_analysed_and_its_results_delivered(tmp_path: Path, positive_study: Path) -> None:
    orthanc = Orthanc(tmp_path / "orthanc").start()
    port, web_port = free_port(), free_port()
    node = NodeProcess(tmp_path, node_config(
        tmp_path, port=port, checkpoint=DEMO_MODEL, destinations=[("pacs", "PACS", orthanc.dicom_port)],
        overrides={"web": {"enabled": True, "port": web_port, "token": WEB_TOKEN},
                   "dicomweb": {"enabled": True}}), port)
    study_uid = load_labels(positive_study)["study_instance_uid"]
    node.start()
    try:
        wait_for(lambda: port_open(web_port), timeout=60, what="the node's web server")
        credentials = tmp_path / "web.token"
        credentials.write_text(WEB_TOKEN)
        client = open_client(DicomwebPeer(f"http://127.0.0.1:{web_port}/dicomweb", auth=HttpAuth.BEARER,
                                          credentials_file=credentials), "test")
        files = _files(positive_study)
        client.store_instances([pydicom.dcmread(path) for path in files], study_instance_uid=study_uid)

        def events() -> list[str]:
            return [e["event"] for e in read_events(tmp_path / "triage.log") if e.get("study_instance_uid") == study_uid]

        wait_for(lambda: "analysed" in events() and "delivered" in events(), timeout=300,
                 what="the study analysed and a result delivered")
        (pacs_study,) = orthanc.get("/studies?expand")
    finally:
        node.stop()
        orthanc.stop()
    assert pacs_study["MainDicomTags"]["StudyInstanceUID"] == study_uid
    assert events()[:3] == ["received", "ready", "analysed"]
    assert f"STOW-RS from 127.0.0.1: {len(files)} stored, 0 refused" in node.output()
