"""A study the model cannot answer for, through the real node to Orthanc: the PACS gets the
NOT TRIAGED picture and SR, no key slices and no priority flag; the log, `ichnode status`
and the webhooks say NOT TRIAGED and why. The checkpoint has random weights: this checks
the pipeline, not a model."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import torch

from node.triagelog import read_events
from storage.db import Database, Delivery
from tests.conftest import load_labels, require_tool
from tests.peers import NodeProcess, Orthanc, WebhookReceiver, free_port, node_config, storescu, wait_for
from training.model.architectures import create_model
from training.model.checkpoint import default_model_config, save_checkpoint
from training.model.inputs import InputProfile


def _relabelled(study: Path, out: Path, body_part: str) -> list[Path]:
    """The study's HEAD series with BodyPartExamined rewritten and new UIDs."""
    files = []
    study_uid, series_uid = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    out.mkdir()
    for path in sorted((study / "HEAD").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.BodyPartExamined = study_uid, series_uid, body_part
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.save_as(out / path.name, enforce_file_format=True)
        files.append(out / path.name)
    return files


def test_not_triaged_studies_reach_the_pacs_as_such(tmp_path: Path, positive_study: Path) -> None:
    torch.manual_seed(0)
    # Every study is far outside this profile (its limit is tiny): the out-of-distribution path.
    profile = InputProfile("avgpool", np.zeros(512), np.eye(512), 1e-6, 1e-5, "none", "a test", 1)
    checkpoint = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18"),
                                 dataclasses.replace(default_model_config("resnet18"), inputs=profile))
    chest = _relabelled(positive_study, tmp_path / "chest", "CHEST")
    orthanc = Orthanc(tmp_path / "orthanc").start()
    everything, flagged_only = WebhookReceiver().start(), WebhookReceiver().start()
    port = free_port()
    node = NodeProcess(tmp_path, node_config(
        tmp_path, port=port, checkpoint=checkpoint, destinations=[("pacs", "PACS", orthanc.dicom_port)],
        notify=[(everything.url, "all"), (flagged_only.url, "positive")]), port)
    node.start()
    study_uid = load_labels(positive_study)["study_instance_uid"]
    chest_uid = pydicom.dcmread(chest[0]).StudyInstanceUID
    try:
        assert storescu(port, sorted((positive_study / "HEAD").glob("*.dcm")) + chest).returncode == 0
        wait_for(lambda: sum(e["event"] == "delivered" for e in read_events(tmp_path / "triage.log")) == 4,
                 timeout=300, what="the SC and SR of both studies delivered")
        wait_for(lambda: len(everything.received) == 2, timeout=60, what="both notifications")
        pacs = {orthanc.get(f"/studies/{s}")["MainDicomTags"]["StudyInstanceUID"]: s for s in orthanc.get("/studies")}
        in_pacs = {uid: [orthanc.get(f"/series/{s}") for s in orthanc.get(f"/studies/{pacs[uid]}")["Series"]]
                   for uid in (study_uid, chest_uid)}
        instances = {uid: [(i, orthanc.get_bytes(f"/instances/{i}/file")) for s in series for i in s["Instances"]]
                     for uid, series in in_pacs.items()}
        status = subprocess.run([sys.executable, "-m", "node.cli", "status", "--config", str(node.config_path)],
                                capture_output=True, text=True, timeout=60)
    finally:
        node.stop()
        orthanc.stop()
        everything.stop()
        flagged_only.stop()

    events = {e["study_instance_uid"]: e for e in read_events(tmp_path / "triage.log") if e["event"] == "analysed"}
    assert events[chest_uid]["triaged"] is False and events[study_uid]["triaged"] is False
    assert [r["code"] for r in events[chest_uid]["not_triaged"]] == ["not_head"]  # before the model
    assert events[chest_uid]["slice_probabilities"] == []
    assert [r["code"] for r in events[study_uid]["not_triaged"]] == ["out_of_distribution"]  # after it
    assert events[study_uid]["input_check"]["outside"] is True and events[study_uid]["slice_probabilities"]
    assert all(e["positive"] is False and "study_score" not in e for e in events.values())

    dciodvfy, dsrdump = require_tool("dciodvfy"), require_tool("dsrdump")
    for uid, series in in_pacs.items():
        # One picture and one SR in the study; no key-object selection.
        modalities = sorted(s["MainDicomTags"]["Modality"] for s in series)
        assert modalities == ["OT", "SR"], (uid, modalities)
        for instance_id, data in instances[uid]:
            path = tmp_path / f"{instance_id}.dcm"
            path.write_bytes(data)
            ds = pydicom.dcmread(path)
            assert ds.StudyInstanceUID == uid
            assert ds.SeriesDescription.startswith("AI ICH: NOT TRIAGED")
            assert "PRIORITY" not in ds.SeriesDescription and "not detected" not in ds.SeriesDescription
            if ds.Modality == "OT":
                assert "NOT TRIAGED" in ds.ImageComments and "PRIORITY" not in ds.ImageComments
            else:
                dump = subprocess.run([dsrdump, str(path)], capture_output=True, text=True, timeout=60)
                assert dump.returncode == 0 and '"Not Evaluated")' in dump.stdout
            report = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
            assert not [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    with Database(f"sqlite:///{tmp_path / 'node.db'}").read() as session:
        assert not any(d.priority_high for d in session.query(Delivery).all())  # C-STORE priority stays MEDIUM

    assert status.returncode == 0 and status.stdout.count("NOT TRIAGED") == 2
    assert flagged_only.received == []  # never a positive
    texts = sorted(message["text"] for message in everything.received)
    assert all("NOT TRIAGED" in text and "not detected" not in text for text in texts)
    assert any("BodyPartExamined is CHEST" in text for text in texts)
    assert any("out-of-distribution score" in text for text in texts)
