"""Storage Commitment: with commitment = true a result counts as delivered only once the
destination reports it committed. Orthanc is the real Storage Commitment SCP (it reports
back on an association of its own to the node's SCP, which it knows as a modality); a
small pynetdicom PACS plays the destinations Orthanc cannot: one that never reports and
one that reports failures on an association of its own."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import SecondaryCaptureImageStorage, StorageCommitmentPushModel
from starlette.testclient import TestClient

from node.commitment import STORAGE_COMMITMENT_INSTANCE, Commitments
from node.config import Config, parse_config
from node.dashboard import Dashboard, ModelInfo
from node.delivery import Deliveries, DicomSender
from node.health import Liveness, Readiness
from node.history import TriageHistory
from node.ingest import Ingest
from node.scp import start_scp
from node.triagelog import TriageLog, read_events
from node.web import create_app
from storage.db import Database, Delivery, DeliveryState, Study, StudyState, utcnow
from storage.state import claim_purge, undelivered_flagged
from storage.store import InstanceStore
from tests.conftest import add_delivery
from tests.peers import NodeProcess, Orthanc, free_port, node_config, wait_for

NODE_AET = "ICHNODE"
COMMITMENT_TIMEOUT = 1.0


@dataclasses.dataclass
class Node:
    config: Config
    database: Database
    store: InstanceStore
    triage_log: TriageLog
    commitments: Commitments
    deliveries: Deliveries
    pacs: Orthanc

    def destination(self, name: str):
        return next(d for d in self.config.destinations if d.name == name)

    def delivery(self, study_uid: str) -> Delivery:
        with self.database.read() as session:
            return session.query(Delivery).join(Study).filter(Study.study_instance_uid == study_uid).one()

    def events(self, study_uid: str) -> list[dict]:
        return [e for e in read_events(self.config.log.path) if e["study_instance_uid"] == study_uid]


class SmallPacs:
    """A pynetdicom PACS that stores whatever it is sent and accepts every commitment
    request; it then reports every object failed (0x0112), on an association of its own
    to the node, or (`report=False`) never reports at all."""

    def __init__(self, node_port: int, *, report: bool) -> None:
        self.node_port, self.report = node_port, report
        self.port = free_port()
        self.requests: list[Dataset] = []
        ae = AE(ae_title="SMALLPACS")
        ae.add_supported_context(SecondaryCaptureImageStorage)
        ae.add_supported_context(StorageCommitmentPushModel)
        self.server = ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=[
            (evt.EVT_C_STORE, lambda event: 0x0000), (evt.EVT_N_ACTION, self._action)])

    def _action(self, event) -> tuple[int, None]:
        request = event.action_information
        self.requests.append(request)
        if self.report:
            threading.Thread(target=self._report_failed, args=[request]).start()
        return 0x0000, None

    def _report_failed(self, request: Dataset) -> None:
        report = Dataset()
        report.TransactionUID = request.TransactionUID
        report.FailedSOPSequence = []
        for sent in request.ReferencedSOPSequence:
            item = Dataset()
            item.ReferencedSOPClassUID = sent.ReferencedSOPClassUID
            item.ReferencedSOPInstanceUID = sent.ReferencedSOPInstanceUID
            item.FailureReason = 0x0112
            report.FailedSOPSequence.append(item)
        send_report(self.node_port, report, event_type=2, calling="SMALLPACS")

    def stop(self) -> None:
        self.server.shutdown()


def send_report(port: int, report: Dataset, *, event_type: int, calling: str) -> int | None:
    """An N-EVENT-REPORT as a Storage Commitment SCP sends it: on an association it opens,
    proposing the SCP role of the Push Model; the node's status."""
    ae = AE(ae_title=calling)
    ae.add_requested_context(StorageCommitmentPushModel)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET,
                         ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)])
    assert assoc.is_established
    try:
        status, _ = assoc.send_n_event_report(report, event_type, StorageCommitmentPushModel,
                                           STORAGE_COMMITMENT_INSTANCE)
    finally:
        assoc.release()
    return getattr(status, "Status", None)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Node]:
    folder = tmp_path_factory.mktemp("commitment")
    node_port = free_port()
    pacs = Orthanc(folder / "orthanc", modalities={"NODE": (NODE_AET, node_port)}).start()
    silent, failing = SmallPacs(node_port, report=False), SmallPacs(node_port, report=True)
    config = parse_config({
        "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": node_port},
        "storage": {"root": str(folder / "store"), "database_url": f"sqlite:///{folder / 'node.db'}",
                    "min_free_mb": 0},
        "delivery": {"initial_backoff_seconds": 0.1, "max_backoff_seconds": 0.1, "timeout_seconds": 10,
                     "commitment_timeout_seconds": COMMITMENT_TIMEOUT},
        "log": {"path": str(folder / "triage.log")},
        "destinations": [
            {"name": "orthanc", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port, "commitment": True},
            {"name": "silent", "ae_title": "SMALLPACS", "host": "127.0.0.1", "port": silent.port, "commitment": True},
            {"name": "failing", "ae_title": "SMALLPACS", "host": "127.0.0.1", "port": failing.port,
             "commitment": True},
        ],
    }, folder)
    store = InstanceStore(config.storage.root)
    store.ensure()
    database = Database(config.storage.database_url, create=True)
    triage_log = TriageLog(config.log.path)
    commitments = Commitments(config, database, triage_log)
    server = start_scp(config.node, Ingest(store, database, triage_log), commitments)
    deliveries = Deliveries(config, database, store, DicomSender(NODE_AET, 10), triage_log, commitments=commitments)
    try:
        yield Node(config, database, store, triage_log, commitments, deliveries, pacs)
    finally:
        server.shutdown()
        silent.stop()
        failing.stop()
        pacs.stop()
        database.dispose()


def _result(node: Node, destination: str) -> str:
    """A done, flagged study whose result (one Secondary Capture) is due for `destination`;
    its StudyInstanceUID."""
    return _due_result(node.store, node.database, destination)


def _due_result(store: InstanceStore, database: Database, destination: str) -> str:
    study_uid, series_uid = generate_uid(), generate_uid()
    folder = f"results/{study_uid}/{series_uid}"
    (store.root / folder).mkdir(parents=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
    ds.PatientID, ds.PatientName, ds.Modality, ds.ConversionType = "COMMIT", "Commitment^Test", "OT", "WSD"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelData = np.zeros((8, 8), np.uint8).tobytes()
    ds.save_as(store.root / folder / "sc-1.dcm", enforce_file_format=True)
    now = utcnow()
    with database.write() as session:
        study = Study(study_instance_uid=study_uid, state=StudyState.DONE, first_received_at=now,
                      last_received_at=now, verdict="SUSPECTED - PRIORITY", result_series_uid=series_uid)
        session.add(study)
        session.flush()
        session.add(Delivery(study_id=study.id, destination=destination, kind="sc", result_folder=folder,
                             state=DeliveryState.PENDING, next_attempt_at=now, priority_high=True))
    return study_uid


def _study_page(node: Node, study_uid: str) -> str:
    dashboard = Dashboard(node.config, node.database, node.store, TriageHistory(node.config.log.path),
                          ModelInfo.of(node.config, None))
    readiness = Readiness(node.database, node.store, 0, model_loaded=False, model_configured=False,
                          scheduler_running=lambda: True, worker=Liveness(), worker_stale_seconds=60,
                          alerts=node.config.alerts)
    client = TestClient(create_app(node.config, dashboard, readiness), base_url="http://127.0.0.1:8080")
    page = client.get(f"/studies/{study_uid}", headers={"accept": "text/html"})
    assert page.status_code == 200
    return page.text


def test_a_result_is_delivered_only_once_orthanc_reports_it_committed(node: Node) -> None:
    study_uid = _result(node, "orthanc")
    assert node.deliveries.send_due(node.destination("orthanc")) == 1
    delivered = wait_for(lambda: node.delivery(study_uid).state == DeliveryState.SENT and node.delivery(study_uid),
                         timeout=30, what="Orthanc's storage commitment report")
    assert delivered.attempts == 1 and delivered.last_error is None and delivered.transaction_uid
    assert delivered.sent_at <= delivered.committed_at
    events = [e["event"] for e in node.events(study_uid)]
    assert events == ["awaiting_commitment", "delivered"]  # committing first, delivered on the report
    assert node.events(study_uid)[1]["committed"] is True
    assert node.events(study_uid)[1]["transaction_uid"] == delivered.transaction_uid
    assert study_uid in [s["MainDicomTags"]["StudyInstanceUID"] for s in node.pacs.get("/studies?expand")]
    page = _study_page(node, study_uid)
    assert f"{delivered.sent_at:%Y-%m-%d %H:%M:%S}, committed {delivered.committed_at:%Y-%m-%d %H:%M:%S}" in page


def test_a_commitment_that_never_comes_is_a_failed_attempt_and_is_sent_again(node: Node) -> None:
    study_uid = _result(node, "silent")
    destination = node.destination("silent")
    assert node.deliveries.send_due(destination) == 1
    awaiting = node.delivery(study_uid)
    assert awaiting.state == DeliveryState.COMMITTING and awaiting.committed_at is None
    first_transaction = awaiting.transaction_uid

    # Awaiting: not delivered, so the flagged study stands out among the undelivered.
    assert f"{awaiting.sent_at:%Y-%m-%d %H:%M:%S}, awaiting commitment" in _study_page(node, study_uid)
    with node.database.read() as session:
        assert study_uid in {s.study_instance_uid for s, _ in undelivered_flagged(
            session, "SUSPECTED - PRIORITY", utcnow())}

    wait_for(lambda: node.commitments.fail_overdue() == 1, timeout=10 + COMMITMENT_TIMEOUT,
             what="the commitment to be overdue")
    failed = node.delivery(study_uid)
    assert failed.state == DeliveryState.PENDING and failed.attempts == 1
    assert failed.last_error == f"no storage commitment from silent within {COMMITMENT_TIMEOUT:g} s"
    assert node.events(study_uid)[-1]["event"] == "delivery_failed"
    assert node.commitments.fail_overdue() == 0  # once

    wait_for(lambda: node.deliveries.send_due(destination) == 1, timeout=10, what="the retry")
    again = node.delivery(study_uid)
    assert again.state == DeliveryState.COMMITTING and again.transaction_uid != first_transaction


def test_a_pacs_that_does_not_know_the_node_refuses_the_request_and_the_attempt_fails(node: Node) -> None:
    stranger = dataclasses.replace(node.config, delivery=dataclasses.replace(node.config.delivery,
                                                                             calling_ae_title="STRANGER"))
    deliveries = Deliveries(stranger, node.database, node.store, DicomSender("STRANGER", 10), node.triage_log)
    study_uid = _result(node, "orthanc")
    assert deliveries.send_due(node.destination("orthanc")) == 1
    failed = node.delivery(study_uid)
    assert failed.state == DeliveryState.PENDING and failed.attempts == 1 and failed.committed_at is None
    assert failed.last_error.startswith("orthanc (PACS@127.0.0.1:") and "does not know as a modality; give it AE " \
        "title STRANGER" in failed.last_error
    assert [e["event"] for e in node.events(study_uid)] == ["awaiting_commitment", "delivery_failed"]


def test_a_report_of_failures_is_a_failed_attempt_and_is_sent_again(node: Node) -> None:
    study_uid = _result(node, "failing")
    destination = node.destination("failing")
    assert node.deliveries.send_due(destination) == 1
    failed = wait_for(lambda: node.delivery(study_uid).state == DeliveryState.PENDING and node.delivery(study_uid),
                      timeout=30, what="the failure report")
    assert failed.attempts == 1 and failed.committed_at is None
    assert failed.last_error.startswith("storage commitment refused for 1 of 1 objects: ")
    assert "(0x0112 no such object instance)" in failed.last_error
    assert "commitment refused for 1 of 1 objects" in _study_page(node, study_uid)
    wait_for(lambda: node.deliveries.send_due(destination) == 1, timeout=10, what="the retry")
    assert wait_for(lambda: node.delivery(study_uid).attempts == 2, timeout=30, what="the second report")


def test_a_report_of_an_unknown_transaction_is_answered_and_changes_nothing(node: Node,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    study_uid = _result(node, "silent")
    assert node.deliveries.send_due(node.destination("silent")) == 1
    report = Dataset()
    report.TransactionUID = generate_uid()
    report.ReferencedSOPSequence = []
    with caplog.at_level(logging.WARNING, logger="node.commitment"):
        assert send_report(node.config.node.port, report, event_type=1, calling="SOMEPACS") == 0x0000
    assert f"names transaction {report.TransactionUID}, which no delivery awaits" in caplog.text
    assert node.delivery(study_uid).state == DeliveryState.COMMITTING
    assert pydicom.uid.UID(node.delivery(study_uid).transaction_uid).is_valid


def test_retention_keeps_a_study_whose_result_awaits_commitment(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    long_ago = utcnow() - dt.timedelta(days=30)
    add_delivery(database, "results/1.2.3/4", DeliveryState.COMMITTING, sent_at=long_ago, transaction_uid="9.8")
    with database.write() as session:
        session.query(Study).update({Study.updated_at: long_ago})
    with database.write() as session:
        assert claim_purge(session, utcnow()) is None
    with database.write() as session:
        session.query(Delivery).update({Delivery.state: DeliveryState.SENT, Delivery.committed_at: long_ago})
        session.query(Study).update({Study.updated_at: long_ago})
    with database.write() as session:
        assert claim_purge(session, utcnow()).study_instance_uid == "1.2.3"  # once committed, it may go
    database.dispose()


def test_serve_asks_for_commitment_and_any_process_records_the_report(tmp_path: Path) -> None:
    """`ichnode serve` sends and asks; the report goes to another process's SCP on the same
    database (Orthanc knows that one as the node), which records it. A destination that
    never reports is failed by serve's scheduled check."""
    scp_port, serve_port = free_port(), free_port()
    pacs = Orthanc(tmp_path / "orthanc", modalities={"NODE": (NODE_AET, scp_port)}).start()
    silent = SmallPacs(scp_port, report=False)
    store = InstanceStore(tmp_path / "store")
    store.ensure()
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    other = parse_config({"node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": scp_port},
                          "storage": {"root": str(store.root), "database_url": f"sqlite:///{tmp_path / 'node.db'}"},
                          "log": {"path": str(tmp_path / "other.log")}}, tmp_path)
    triage_log = TriageLog(other.log.path)
    server = start_scp(other.node, Ingest(store, database, triage_log), Commitments(other, database, triage_log))
    (tmp_path / "serve").mkdir()
    text = node_config(tmp_path / "serve", port=serve_port, checkpoint=None, overrides={
        "storage": {"root": str(store.root), "database_url": f"sqlite:///{tmp_path / 'node.db'}"},
        "worker": {"enabled_in_serve": False},
        "delivery": {"commitment_timeout_seconds": 1, "initial_backoff_seconds": 60, "max_backoff_seconds": 60}})
    for name, port in (("orthanc", pacs.dicom_port), ("silent", silent.port)):
        text += (f'\n[[destinations]]\nname = "{name}"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = {port}\n'
                 "commitment = true\n")
    serve = NodeProcess(tmp_path / "serve", text, serve_port)
    try:
        committed, never = _due_result(store, database, "orthanc"), _due_result(store, database, "silent")
        serve.start()

        def state(study_uid: str) -> Delivery:
            with database.read() as session:
                return session.query(Delivery).join(Study).filter(Study.study_instance_uid == study_uid).one()

        wait_for(lambda: state(committed).state == DeliveryState.SENT, timeout=60, what="the commitment")
        assert state(committed).committed_at is not None
        served = read_events(tmp_path / "serve" / "triage.log")
        assert [e["event"] for e in served if e["study_instance_uid"] == committed] == ["awaiting_commitment"]
        recorded = [e for e in read_events(other.log.path) if e["study_instance_uid"] == committed]
        assert [(e["event"], e["committed"]) for e in recorded] == [("delivered", True)]

        wait_for(lambda: state(never).attempts == 1, timeout=60, what="serve to fail the overdue commitment")
        assert state(never).state == DeliveryState.PENDING
        assert state(never).last_error == "no storage commitment from silent within 1 s"
    finally:
        serve.stop()
        server.shutdown()
        silent.stop()
        pacs.stop()
        database.dispose()
