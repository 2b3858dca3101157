"""The node end to end with real peers: DCMTK as the scanner, Orthanc as the PACS.

The checkpoints have random weights: these tests check the pipeline, not accuracy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import torch
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from node.triagelog import read_events
from storage.db import Database, Delivery, DeliveryState, Instance, Study, StudyState
from tests.conftest import load_labels, require_tool
from tests.peers import NodeProcess, Orthanc, echoscu, free_port, node_config, storescu, wait_for
from training.model.checkpoint import default_model_config, save_checkpoint
from training.model.architectures import create_model


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("checkpoints")
    torch.manual_seed(0)
    return {
        name: save_checkpoint(folder / f"{name}.pt", create_model(name), default_model_config(name))
        for name in ("effclass", "resnet18")
    }


def _non_ct_object(study: Path, out: Path) -> Path:
    """A real MR object moved into the study: stored by the node, never analysed."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.StudyInstanceUID = load_labels(study)["study_instance_uid"]
    ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.save_as(out, enforce_file_format=True)
    return out


def _study_files(study: Path) -> list[Path]:
    return sorted(study.glob("*/*.dcm"))


def _result_series(orthanc: Orthanc, study_uid: str) -> list[dict]:
    return [
        s for s in orthanc.get("/series?expand")
        if s["MainDicomTags"].get("Modality") == "OT"
        and s["MainDicomTags"].get("SeriesDescription", "").startswith("AI ICH:")
        and orthanc.get(f"/studies/{s['ParentStudy']}")["MainDicomTags"]["StudyInstanceUID"] == study_uid
    ]


def _events(folder: Path, study_uid: str) -> list[str]:
    return [e["event"] for e in read_events(folder / "triage.log") if e["study_instance_uid"] == study_uid]


@pytest.fixture
def orthanc(tmp_path: Path):
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.stop()


def _scout(study: Path, path: Path) -> Path:
    """A localizer of the study in a series of its own, as scanners send one after the axial series."""
    ds = pydicom.dcmread(_study_files(study)[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(path, enforce_file_format=True)
    return path


def test_study_in_result_out(tmp_path: Path, orthanc: Orthanc, positive_study: Path,
                             checkpoints: dict[str, Path]) -> None:
    port = free_port()
    # Random weights give either verdict: a KOS for every study, so that all three sets go out.
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=checkpoints["effclass"],
                                             destinations=[("pacs", "PACS", orthanc.dicom_port)],
                                             overrides={"output": {"kos_for": "all"}}), port)
    node.start()
    try:
        assert echoscu(port).returncode == 0
        files = _study_files(positive_study) + [_non_ct_object(positive_study, tmp_path / "mr.dcm")]
        sent = storescu(port, files)
        assert sent.returncode == 0, sent.stderr
        labels = load_labels(positive_study)
        study_uid = labels["study_instance_uid"]
        wait_for(lambda: _events(tmp_path, study_uid).count("delivered") == 3, timeout=300,
                 what="the delivered events of SC, SR and KOS")
        # A scout arriving for the done study (it could not change the result) is recorded
        # without re-opening it: no second result series.
        scout = _scout(positive_study, tmp_path / "scout.dcm")
        assert storescu(port, [scout]).returncode == 0
        database = Database(f"sqlite:///{tmp_path / 'node.db'}")

        def recorded() -> bool:
            with database.read() as session:
                return session.query(Instance).count() == len(files) + 1

        wait_for(recorded, timeout=60, what="the scout in the database")
        with database.read() as session:
            assert session.query(Study).one().state == StudyState.DONE
        series = _result_series(orthanc, study_uid)
        (pacs_study,) = orthanc.get("/studies?expand")
        in_pacs = [orthanc.get(f"/series/{uid}") for uid in pacs_study["Series"]]
    finally:
        node.stop()
    files.append(scout)

    # The PACS holds the study with the three result series and nothing more: SC, SR, KOS.
    assert pacs_study["MainDicomTags"]["StudyInstanceUID"] == study_uid
    assert sorted(s["MainDicomTags"]["Modality"] for s in in_pacs) == ["KO", "OT", "SR"]

    # Every instance the scanner sent is stored once, on disk and in the database.
    with Database(f"sqlite:///{tmp_path / 'node.db'}").read() as session:
        instances = session.query(Instance).all()
        assert len(instances) == len(files)
        assert all((tmp_path / "store" / i.path).is_file() for i in instances)
        study = session.query(Study).one()
        assert study.state == StudyState.DONE

    # The result: one SC series in the same study, verdict in SeriesDescription.
    assert len(series) == 1
    tags = series[0]["MainDicomTags"]
    analysed = next(e for e in read_events(tmp_path / "triage.log") if e["event"] == "analysed")
    expected = "AI ICH: SUSPECTED - PRIORITY" if analysed["positive"] else "AI ICH: not detected"
    assert tags["SeriesDescription"] == f"{expected} (UNTRAINED MODEL)"
    assert len(series[0]["Instances"]) == 3 + 1  # key slices + summary
    assert analysed["series_instance_uid"] == labels["head_series_instance_uid"]
    assert analysed["total_slices"] == len(labels["slices"])
    assert "localizer" in " ".join(analysed["passed_over"].values())
    assert "modality MR" in " ".join(analysed["passed_over"].values())
    assert set(analysed["timings_s"]) == {"scope", "load", "preprocess", "inference", "gradcam", "encode"}

    # What arrived at the PACS validates.
    dciodvfy = require_tool("dciodvfy")
    for instance_id in [i for s in in_pacs for i in s["Instances"]]:
        path = tmp_path / f"{instance_id}.dcm"
        path.write_bytes(orthanc.get_bytes(f"/instances/{instance_id}/file"))
        ds = pydicom.dcmread(path)
        assert ds.StudyInstanceUID == study_uid and ds.PatientID == labels["patient_id"]
        if ds.Modality == "OT":
            assert "NOT FOR DIAGNOSTIC USE" in ds.ImageComments
        report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
        assert not errors, errors

    # The triage log tells the story in order, without patient identifiers.
    assert _events(tmp_path, study_uid) == ["received", "ready", "analysed", "delivered", "delivered", "delivered"]
    text = (tmp_path / "triage.log").read_text()
    assert labels["patient_id"] not in text and "PHANTOM" not in text

    # The admin views.
    cli = [sys.executable, "-m", "node.cli"]
    status = subprocess.run([*cli, "status", "--config", str(node.config_path)], capture_output=True, text=True)
    assert status.returncode == 0 and "done 1" in status.stdout and "sent 3" in status.stdout
    log = subprocess.run([*cli, "log", "--config", str(node.config_path)], capture_output=True, text=True)
    assert log.returncode == 0 and "ANALYSED" in log.stdout and "DELIVERED" in log.stdout


def test_destination_down_at_first_gets_the_result_later_across_a_restart(
    tmp_path: Path, negative_study: Path, checkpoints: dict[str, Path]
) -> None:
    pacs = Orthanc(tmp_path / "orthanc")  # its port is chosen, nothing listens yet
    port = free_port()
    # One object set, so one delivery row tells the story.
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=checkpoints["resnet18"],
                                             destinations=[("pacs", "PACS", pacs.dicom_port)],
                                             overrides={"output": {"objects": ["sc"]}}), port)
    node.start()
    study_uid = load_labels(negative_study)["study_instance_uid"]
    try:
        assert storescu(port, _study_files(negative_study)).returncode == 0
        wait_for(lambda: "delivery_failed" in _events(tmp_path, study_uid), timeout=300,
                 what="a failed delivery attempt")
        # The node restarts while the PACS is still away: the pending delivery and its
        # attempts live in the database, not in memory.
        node.stop()
        with Database(f"sqlite:///{tmp_path / 'node.db'}").read() as session:
            delivery = session.query(Delivery).one()
            assert delivery.state == DeliveryState.PENDING and delivery.attempts >= 1
        node.start()
        pacs.start()
        wait_for(lambda: "delivered" in _events(tmp_path, study_uid), timeout=120,
                 what="delivery once the PACS is up")
        series = _result_series(pacs, study_uid)
    finally:
        node.stop()
        pacs.stop()
    assert len(series) == 1
    events = _events(tmp_path, study_uid)
    assert events.index("delivery_failed") < events.index("delivered")
    assert events.count("analysed") == 1 and events.count("delivered") == 1
    failure = next(e for e in read_events(tmp_path / "triage.log") if e["event"] == "delivery_failed")
    assert "could not be reached" in failure["reason"] and failure["final"] is False


def test_without_checkpoint_the_node_stores_and_says_why_nothing_was_analysed(
    tmp_path: Path, negative_study: Path
) -> None:
    port = free_port()
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=None, stable_seconds=1), port)
    node.start()
    study_uid = load_labels(negative_study)["study_instance_uid"]
    files = _study_files(negative_study)
    try:
        assert storescu(port, files).returncode == 0
        assert storescu(port, files[:5]).returncode == 0  # re-sent instances are idempotent
        wait_for(lambda: "failed" in _events(tmp_path, study_uid), timeout=60, what="the failed event")
    finally:
        node.stop()
    failed = next(e for e in read_events(tmp_path / "triage.log") if e["event"] == "failed")
    assert failed["reason"] == "no model checkpoint configured (model.checkpoint)"
    with Database(f"sqlite:///{tmp_path / 'node.db'}").read() as session:
        assert session.query(Instance).count() == len(files)
    assert len(list((tmp_path / "store").rglob("*.dcm"))) == len(files)
    assert "received and stored but not analysed" in node.output()


def test_allow_list_and_called_ae_title(tmp_path: Path) -> None:
    port = free_port()
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=None,
                                             allowed_calling_aets=("SCANNER",)), port)
    node.start()
    try:
        assert echoscu(port, calling="SCANNER").returncode == 0
        intruder = echoscu(port, calling="INTRUDER")
        assert intruder.returncode != 0 and "Rejected" in (intruder.stdout + intruder.stderr)
        wrong_called = echoscu(port, calling="SCANNER", called="NOTME")
        assert wrong_called.returncode != 0
        assert echoscu(port, calling="SCANNER").returncode == 0  # still up
    finally:
        node.stop()


def test_unloadable_checkpoint_stops_start_up(tmp_path: Path) -> None:
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"definitely not a checkpoint")
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(node_config(tmp_path, port=port, checkpoint=broken))
    result = subprocess.run([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert str(broken) in result.stderr and "is not a model checkpoint" in result.stderr
    assert "Traceback" not in result.stderr
