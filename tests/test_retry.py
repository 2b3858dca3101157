"""Retryable against permanent failures, with a real full disk: the storage root is a small
tmpfs that fills up while the result series is written; once space comes back the study
completes and its result reaches the PACS (Orthanc) exactly once. An unexpected error
(a bug) fails the study at once instead."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config import parse_config
from node.delivery import Deliveries, DicomSender
from node.ingest import Ingest, Status
from node.triagelog import TriageLog, read_events
from node.worker import Worker
from storage.db import Database, Study, StudyState, utcnow
from storage.state import ClaimedStudy
from storage.store import InstanceStore
from tests.peers import Orthanc, tmpfs, wait_for
from training.inference.predictor import Predictor
from training.inference.settings import Device
from training.model.architectures import create_model
from training.model.checkpoint import default_model_config

import pydicom


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: room for a study, and for a result series only when it is not full."""
    with tmpfs(tmp_path / "store", "size=24m") as mount:
        yield mount


def _fill(folder: Path, leave_bytes: int) -> Path:
    """A ballast file that leaves about `leave_bytes` free on the disk of `folder`."""
    import shutil

    ballast = folder / "ballast"
    free = shutil.disk_usage(folder).free
    with open(ballast, "wb") as handle:
        handle.write(b"\0" * max(free - leave_bytes, 0))
    return ballast


def test_a_full_disk_defers_the_study_until_space_comes_back(small_disk: Path, tmp_path: Path,
                                                             negative_study: Path) -> None:
    pacs = Orthanc(tmp_path / "orthanc").start()
    try:
        config = parse_config({
            "storage": {"root": str(small_disk), "database_url": f"sqlite:///{tmp_path / 'node.db'}",
                        "min_free_mb": 0},
            "worker": {"retry_initial_seconds": 0.2, "retry_max_seconds": 0.5, "min_slices": 10},
            "model": {"device": "cpu"},
            "explain": {"key_slices": 2},
            "output": {"kos_for": "all"},  # a KOS whatever the verdict of random weights: three sets to send
            "log": {"path": str(tmp_path / "triage.log")},
            "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.dicom_port}],
        }, tmp_path)
        store = InstanceStore(config.storage.root)
        database = Database(config.storage.database_url, create=True)
        log = TriageLog(config.log.path)
        ingest = Ingest(store, database, log)
        for path in sorted((negative_study / "HEAD").glob("*.dcm")):
            ds = pydicom.dcmread(path)
            assert ingest.receive(ds, path.read_bytes(), calling_aet="SCANNER",
                                  transfer_syntax_uid=ds.file_meta.TransferSyntaxUID) == Status.SUCCESS
        with database.write() as session:
            session.query(Study).update({Study.state: StudyState.READY})
        predictor = Predictor(create_model("resnet18"), default_model_config("resnet18"), device=Device("cpu"))
        worker = Worker(config, database, store, predictor, log)

        ballast = _fill(small_disk, leave_bytes=64 * 1024)  # far less than the result series
        assert worker.run_once()
        with database.read() as session:
            study = session.query(Study).one()
            assert study.state == StudyState.READY and study.attempts == 0 and study.retries == 1
            assert "no space left" in study.last_error
        deferred = [e for e in read_events(config.log.path) if e["event"] == "deferred"]
        assert len(deferred) == 1 and "no space left" in deferred[0]["reason"]
        assert not any(e["event"] == "failed" for e in read_events(config.log.path))

        ballast.unlink()  # space comes back
        wait_for(worker.run_once, timeout=30, what="the deferred study to be claimed again", every=0.1)
        with database.read() as session:
            study = session.query(Study).one()
            assert study.state == StudyState.DONE and study.retries == 0
        deliveries = Deliveries(config, database, store, DicomSender("ICHNODE", 10), log)
        assert deliveries.send_due(config.destinations[0]) == 3  # SC, SR and KOS
        assert deliveries.send_due(config.destinations[0]) == 0
        results = [s for s in pacs.get("/series?expand")
                   if s["MainDicomTags"].get("Modality") == "OT"
                   and s["MainDicomTags"].get("SeriesDescription", "").startswith("AI ICH:")]
        assert len(results) == 1
        delivered = [e["kind"] for e in read_events(config.log.path) if e["event"] == "delivered"]
        assert sorted(delivered) == ["kos", "sc", "sr"]
        assert not list(small_disk.glob("results/*/*.partial"))
    finally:
        pacs.stop()


class _BuggyWorker(Worker):
    """A worker whose analysis meets a bug: an exception the project never raises on purpose."""

    def _headers(self, study: ClaimedStudy) -> list:
        raise KeyError("SliceThickness")


def test_an_unexpected_error_fails_the_study_at_once_with_its_traceback_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config({
        "storage": {"root": str(tmp_path / "store"), "database_url": f"sqlite:///{tmp_path / 'node.db'}"},
        "model": {"device": "cpu"},
        "log": {"path": str(tmp_path / "triage.log")},
    }, tmp_path)
    database = Database(config.storage.database_url, create=True)
    with database.write() as session:
        session.add(Study(study_instance_uid="1.2.3", accession_number="ACC7", state=StudyState.READY,
                          first_received_at=utcnow(), last_received_at=utcnow()))
    predictor = Predictor(create_model("resnet18"), default_model_config("resnet18"), device=Device("cpu"))
    worker = _BuggyWorker(config, database, InstanceStore(config.storage.root), predictor,
                          TriageLog(config.log.path))
    with caplog.at_level(logging.ERROR, logger="node.worker"):
        assert worker.run_once()
    assert not worker.run_once()  # not queued again: the same input would fail the same way
    with database.read() as session:
        study = session.query(Study).one()
        assert (study.state, study.attempts, study.last_error) == (StudyState.FAILED, 1, "KeyError: 'SliceThickness'")
    events = [(e["event"], e.get("reason")) for e in read_events(config.log.path)]
    assert events == [("failed", "KeyError: 'SliceThickness'")]
    (logged,) = [r for r in caplog.records if "analysis failed unexpectedly" in r.getMessage()]
    assert "1.2.3" in logged.getMessage() and logged.exc_info is not None  # the traceback is in the node's log
