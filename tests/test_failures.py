"""What a stalled or rejecting PACS, a vanished database and a bad start-up setting do to
the node: each is bounded, named and kept from spreading. Real peers on loopback: Orthanc,
pynetdicom peers that reject, refuse or stall, and the node as a subprocess."""

from __future__ import annotations

import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, evt

from node.config import Destination
from node.delivery import DicomSender
from node.errors import DeliveryError
from node.triagelog import read_events
from tests.peers import NodeProcess, Orthanc, c_store_status, free_port, node_config, storescu, wait_for
from training.model.architectures import create_model
from training.model.checkpoint import default_model_config, save_checkpoint


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


def _result_file(folder: Path) -> Path:
    """A minimal Secondary Capture object, as the node sends."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = generate_uid(), generate_uid(), "OT"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "0001.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


class _Peer:
    """A pynetdicom storage SCP on loopback that accepts only `calling`, answers `status`,
    or never answers while `stall` is set."""

    def __init__(self, *, calling: str | None = None, status: int = 0x0000) -> None:
        self.stall = threading.Event()
        self.release = threading.Event()
        self.status = status
        self.ae = AE(ae_title="PEER")
        self.ae.add_supported_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian])
        if calling:
            self.ae.require_calling_aet = [calling]
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, _event: evt.Event) -> int:
        if self.stall.is_set():
            self.release.wait(60)
        return self.status

    def destination(self) -> Destination:
        return Destination("peer", "PEER", "127.0.0.1", self.port)

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A port that accepts TCP connections and never says a word."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(listener.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield listener.getsockname()[1]
    stop.set()
    thread.join()
    for connection in held:
        connection.close()
    listener.close()


# --- what a failed delivery says -----------------------------------------------------


def test_a_rejecting_pacs_is_named_with_its_reason(tmp_path: Path) -> None:
    peer = _Peer(calling="SOMEONE")
    try:
        with pytest.raises(DeliveryError, match=r"rejected the association \(rejected permanent by the "
                                                r"service user: Calling AE title not recognised\)"):
            DicomSender("ICHNODE", 5).send(peer.destination(), [_result_file(tmp_path)], priority_high=True)
    finally:
        peer.close()


def test_a_refused_object_is_named_with_its_status(tmp_path: Path) -> None:
    peer = _Peer(status=0xA700)
    try:
        with pytest.raises(DeliveryError, match=r"refused 0001.dcm: status 0xA700 \(Refused: Out of Resources\)"):
            DicomSender("ICHNODE", 5).send(peer.destination(), [_result_file(tmp_path)], priority_high=False)
    finally:
        peer.close()


def test_a_pacs_that_stalls_mid_association_is_given_up_after_the_timeout(tmp_path: Path) -> None:
    peer = _Peer()
    peer.stall.set()
    try:
        with pytest.raises(DeliveryError, match=r"did not store 0001.dcm: no response within 1 s"):
            DicomSender("ICHNODE", 1).send(peer.destination(), [_result_file(tmp_path)], priority_high=False)
    finally:
        peer.close()


def test_a_silent_or_absent_pacs_is_bounded_in_time(tmp_path: Path, silent_listener: int) -> None:
    files = [_result_file(tmp_path)]
    for port in (silent_listener, free_port()):
        with pytest.raises(DeliveryError, match=r"could not be reached, or did not answer the association "
                                                r"request within 1 s"):
            DicomSender("ICHNODE", 1).send(Destination("x", "X", "127.0.0.1", port), files, priority_high=False)


# --- a stalled PACS beside a real one ---------------------------------------------------


def test_a_stalled_pacs_delays_only_its_own_results(tmp_path: Path, positive_study: Path,
                                                     negative_study: Path) -> None:
    """While one destination holds every send until its timeout, the other gets its
    results, ingest answers Success, and the database's write lock stays free."""
    stalled = _Peer()
    stalled.stall.set()
    pacs = Orthanc(tmp_path / "orthanc").start()
    port = free_port()
    checkpoint = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18"), default_model_config("resnet18"))
    config = node_config(tmp_path, port=port, checkpoint=checkpoint, stable_seconds=1,
                         destinations=[("stalled", "PEER", stalled.port), ("pacs", "PACS", pacs.dicom_port)],
                         overrides={"delivery": {"timeout_seconds": 20}})
    node = NodeProcess(tmp_path, config, port).start()
    try:
        assert storescu(port, sorted((positive_study / "HEAD").glob("*.dcm"))).returncode == 0

        def delivered(uid: str) -> bool:
            return any(e["event"] == "delivered" and e["destination"] == "pacs" and e["study_instance_uid"] == uid
                       for e in read_events(tmp_path / "triage.log"))

        first = pydicom.dcmread(next((positive_study / "HEAD").glob("*.dcm"))).StudyInstanceUID
        wait_for(lambda: delivered(first), timeout=180, what="the result at the working PACS")
        # The stalled destination is being sent to now (its send waits up to 20 s).
        assert not any(e["event"] == "delivered" and e["destination"] == "stalled"
                       for e in read_events(tmp_path / "triage.log"))
        with sqlite3.connect(tmp_path / "node.db", timeout=1.0) as database:
            database.execute("BEGIN IMMEDIATE")  # nobody holds the write lock across the network
            database.rollback()
        assert storescu(port, sorted((negative_study / "HEAD").glob("*.dcm"))).returncode == 0
        status = _run_cli("status", "--config", str(tmp_path / "node.toml"))
        assert status.returncode == 0 and "studies:" in status.stdout, status.stderr
        second = pydicom.dcmread(next((negative_study / "HEAD").glob("*.dcm"))).StudyInstanceUID
        wait_for(lambda: delivered(second), timeout=180, what="the second result at the working PACS")
        failures = wait_for(lambda: [e for e in read_events(tmp_path / "triage.log")
                                     if e["event"] == "delivery_failed" and e["destination"] == "stalled"],
                            timeout=60, what="the stalled destination's failure")
        assert "no response within 20 s" in failures[0]["reason"]
    finally:
        node.stop()
        pacs.stop()
        stalled.close()


# --- a database that vanishes -------------------------------------------------------------


def test_a_deleted_database_is_noticed_not_replaced(tmp_path: Path, negative_study: Path) -> None:
    port = free_port()
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=None, stable_seconds=3600), port)
    node.start()
    files = sorted((negative_study / "HEAD").glob("*.dcm"))
    try:
        assert c_store_status(port, files[0]) == 0x0000
        for name in ("node.db", "node.db-wal", "node.db-shm"):
            (tmp_path / name).unlink(missing_ok=True)
        assert c_store_status(port, files[1]) == 0xA700  # refused: it could not be recorded
        assert not (tmp_path / "node.db").exists()  # and no new, empty database was made
        wait_for(lambda: "was deleted or replaced while the node ran" in node.output(), timeout=30,
                 what="the error in the node's log")
    finally:
        node.stop()
    status = _run_cli("status", "--config", str(tmp_path / "node.toml"))
    assert status.returncode == 1 and f"database {tmp_path / 'node.db'} does not exist" in status.stderr
    restart = _run_cli("serve", "--config", str(tmp_path / "node.toml"), timeout=120)
    assert restart.returncode == 1
    assert "already holds received instances, so this is not a first start" in restart.stderr
    assert not (tmp_path / "node.db").exists()


# --- start-up settings, checked before the model loads --------------------------------------


def _config_file(tmp_path: Path, **node: object) -> Path:
    path = tmp_path / "bad.toml"
    path.write_text(node_config(tmp_path, port=free_port(), checkpoint=tmp_path / "absent.pt",
                                overrides={"node": node}))
    return path


def test_an_unresolvable_host_stops_start_up_before_the_model(tmp_path: Path) -> None:
    result = _run_cli("serve", "--config", str(_config_file(tmp_path, host="no-such-host.invalid")))
    assert result.returncode == 1 and "node.host 'no-such-host.invalid' cannot be resolved" in result.stderr
    assert "absent.pt" not in result.stderr  # the missing checkpoint was never reached


def test_a_port_in_use_stops_start_up_before_the_model(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = _run_cli("serve", "--config", str(_config_file(tmp_path, port=port)))
    assert result.returncode == 1 and f"cannot listen on node.host 127.0.0.1 node.port {port}" in result.stderr
    assert "absent.pt" not in result.stderr


def test_a_tls_key_that_is_not_a_key_is_named(tmp_path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    result = _run_cli("serve", "--config", str(_config_file(tmp_path, tls_certificate=tmp_path / "cert.pem",
                                                             tls_private_key=tmp_path / "key.pem")))
    assert result.returncode == 1
    assert "node.tls_certificate" in result.stderr and "PEM" in result.stderr and "[SSL]" not in result.stderr


def test_a_database_url_the_node_cannot_use_is_named(tmp_path: Path) -> None:
    config = tmp_path / "pg.toml"
    config.write_text('[storage]\ndatabase_url = "postgresql+psycopg2://ich@127.0.0.1/ich"\n')
    result = _run_cli("status", "--config", str(config))
    assert result.returncode == 1, result.stderr
    assert "postgresql+psycopg2://…: ichnode runs on SQLite" in result.stderr and "internal error" not in result.stderr
    config.write_text(f'[storage]\ndatabase_url = "postgresql+psycopg://ich@127.0.0.1:{free_port()}/ich"\n')
    result = _run_cli("status", "--config", str(config))
    assert result.returncode == 1 and "cannot open the database" in result.stderr and "Traceback" not in result.stderr


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    from node.triagelog import TriageLog

    log = TriageLog(tmp_path / "triage.log")
    for i in range(3000):  # far more than a pipe holds
        log.write("ready", f"1.2.{i}", "", instances=1, series=1)
    (tmp_path / "node.toml").write_text(f'[log]\npath = "{tmp_path / "triage.log"}"\n')
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c",
         f"{sys.executable} -m node.cli log --config {tmp_path / 'node.toml'} | head -1"],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and len(result.stdout.splitlines()) == 1
    assert "Broken pipe" not in result.stderr and "Error" not in result.stderr


def test_following_a_log_that_does_not_exist_yet_says_so(tmp_path: Path) -> None:
    (tmp_path / "node.toml").write_text(f'[log]\npath = "{tmp_path / "later.log"}"\n')
    follower = subprocess.Popen([sys.executable, "-m", "node.cli", "log", "--follow", "--config",
                                 str(tmp_path / "node.toml")], stderr=subprocess.PIPE, text=True)
    deadline = threading.Timer(60, follower.kill)  # a silent follower must not hang the suite
    deadline.start()
    try:
        line = follower.stderr.readline()
    finally:
        deadline.cancel()
        follower.kill()
        follower.wait()
    assert line.strip() == f"waiting for the triage log at {tmp_path / 'later.log'} to appear"
