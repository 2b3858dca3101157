"""Silent trial and site validation: a node that sends nothing but logs everything, and
`ichnode evaluate --history` scoring its analyses against a site's reference labels."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from node.errors import DataError
from node.triagelog import read_events
from node.validation import ReferenceLabels, join_history, site_evaluation
from storage.db import Database, Delivery, Notification
from tests.conftest import load_labels
from tests.peers import NodeProcess, Orthanc, WebhookReceiver, free_port, node_config, storescu, wait_for
from training.model.architectures import create_model
from training.model.checkpoint import checkpoint_digest, default_model_config, load_checkpoint, save_checkpoint


def _labels(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return path


def test_reference_labels_are_read_by_uid_and_accession(tmp_path: Path) -> None:
    labels = ReferenceLabels.read(_labels(tmp_path, "study_instance_uid,accession_number,ICH\n"
                                                    "1.2.3,,yes\n,ACC2,No\n1.2.4,ACC4,1\n"))
    assert labels.by_uid == {"1.2.3": True, "1.2.4": True}
    assert labels.by_accession == {"ACC2": False, "ACC4": True}


@pytest.mark.parametrize("text, message", [
    ("study_instance_uid,ich\n1.2.3,maybe\n", "line 2: ich must be yes or no"),
    ("study_instance_uid,accession_number,ich\n1.2.3,,yes\n,,no\n", "line 3: neither study_instance_uid nor"),
    ("study_instance_uid,ich\n1.2.3,yes\n1.2.3,no\n", "line 3: study_instance_uid 1.2.3 is labelled both yes and no"),
    ("uid,label\n1.2.3,yes\n", "must name an `ich` column and a `study_instance_uid` or `accession_number`"),
])
def test_bad_reference_labels_are_named_by_line(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        ReferenceLabels.read(_labels(tmp_path, text))


def _analysed(uid: str, accession: str, positive: bool, probabilities: list[float] | None) -> dict:
    event = {"event": "analysed", "study_instance_uid": uid, "accession_number": accession, "positive": positive,
             "slice_threshold": 0.8, "positive_fraction": 0.05, "min_positive_slices": 1}
    return event | ({"slice_probabilities": probabilities} if probabilities else {})


def test_the_join_uses_the_latest_analysis_and_reports_what_did_not_match() -> None:
    events = [_analysed("1.1", "A1", False, [0.1, 0.2]), _analysed("1.1", "A1", True, [0.9, 0.95]),
              _analysed("1.2", "A2", False, [0.1]), _analysed("1.3", "", False, [0.3]),
              _analysed("1.4", "A4", False, None)]
    labels = ReferenceLabels({"1.1": True, "1.4": False, "9.9": True}, {"A2": False, "A8": True})
    joined = join_history(events, labels)
    assert [(m.study_instance_uid, m.joined_by, m.label, m.positive) for m in joined.matched] == [
        ("1.1", "study_instance_uid", True, True), ("1.2", "accession_number", False, False)]
    assert joined.unlabelled == [("1.3", "")]
    assert joined.not_analysed == ["9.9", "A8"]
    assert joined.without_probabilities == 1


def test_a_silent_trial_sends_nothing_and_its_history_is_scored(tmp_path: Path, positive_study: Path,
                                                                 negative_study: Path) -> None:
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "resnet18.pt", create_model("resnet18"), default_model_config("resnet18"))
    pacs, webhook = Orthanc(tmp_path / "orthanc").start(), WebhookReceiver().start()
    port = free_port()
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=checkpoint,
                                             destinations=[("pacs", "PACS", pacs.dicom_port)],
                                             notify=[(webhook.url, "all")],
                                             overrides={"delivery": {"mode": "silent"}}), port)
    studies = {load_labels(s)["study_instance_uid"]: load_labels(s) for s in (positive_study, negative_study)}
    try:
        node.start()
        for study in (positive_study, negative_study):
            assert storescu(port, sorted(study.glob("*/*.dcm"))).returncode == 0
        def both_analysed() -> list[dict] | None:
            events = [e for e in read_events(tmp_path / "triage.log") if e["event"] == "analysed"]
            return events if len(events) == 2 else None

        analysed = wait_for(both_analysed, timeout=300, what="both studies analysed")
        assert "a silent trial" in node.output()
    finally:
        node.stop()
        webhook.stop()
    try:
        # Everything was recorded, nothing was queued: the outcome and its queue rows are one transaction.
        assert {e["delivery_mode"] for e in analysed} == {"silent"}
        assert {e["rule_source"] for e in analysed} == {"checkpoint"}  # where the rule in force came from
        assert "triage rule in force: slice P(ICH) > 0.8" in node.output()
        assert all(len(e["slice_probabilities"]) == e["total_slices"] for e in analysed)
        with Database(f"sqlite:///{tmp_path / 'node.db'}").read() as session:
            assert session.query(Delivery).count() == 0 and session.query(Notification).count() == 0
        assert pacs.get("/instances") == [] and webhook.received == []
        assert list((tmp_path / "store" / "results").glob("*/*/sc-*.dcm"))  # the pictures stay on the node
    finally:
        pacs.stop()

    (positive_uid, positive), (negative_uid, negative) = sorted(studies.items(), key=lambda kv: not kv[1]["positive"])
    labels = _labels(tmp_path, "study_instance_uid,accession_number,ich\n"
                               f"{positive_uid},,yes\n,{negative['accession_number']},no\n9.9.9,,yes\n")
    done = subprocess.run([sys.executable, "-m", "node.cli", "evaluate", "--history", "--labels", str(labels),
                           "--config", str(node.config_path), "--out", str(tmp_path / "site"), "--resamples", "50"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 studies matched; 0 analysed studies have no label; 1 labels match no analysis" in done.stdout
    assert "not analysed: 9.9.9" in done.stdout
    assert "warning: only 1 studies with ICH and 1 without were matched" in done.stdout
    assert "| as the node said |" in done.stdout and "Table 2" in done.stdout
    report = (tmp_path / "site" / "metrics.json").read_text()
    assert '"by_study_instance_uid": 1' in report and '"by_accession_number": 1' in report

    # The same trial chooses an operating point for this checkpoint (the analyses name its SHA-256).
    assert {e["model_sha256"] for e in analysed} == {checkpoint_digest(checkpoint)}
    calibrated = tmp_path / "calibrated.pt"
    done = subprocess.run([sys.executable, "-m", "node.cli", "calibrate", "--history", "--labels", str(labels),
                           "--config", str(node.config_path), "--checkpoint", str(checkpoint), "--out",
                           str(calibrated), "--target-sensitivity", "1", "--resamples", "50"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "2 of the site's analyses by this checkpoint matched a label" in done.stdout
    point = load_checkpoint(calibrated)[1].provenance.metrics["operating_point"]
    assert point["studies"] == 2 and "this site's studies" in point["measured_on"]


def test_the_report_uses_the_rule_in_force_most_recently(tmp_path: Path) -> None:
    # Study 1.1 is analysed first and again last, after [triage] changed to 0.6.
    events = [_analysed("1.1", "A1", True, [0.9, 0.1]) | {"time": "2026-11-01T10:00:00.000+00:00"},
              _analysed("1.2", "A2", False, [0.1, 0.2]) | {"time": "2026-11-02T10:00:00.000+00:00"},
              _analysed("1.1", "A1", True, [0.9, 0.1]) | {"time": "2026-11-03T10:00:00.000+00:00",
                                                          "slice_threshold": 0.6}]
    log = tmp_path / "triage.log"
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    labels = _labels(tmp_path, "study_instance_uid,ich\n1.1,yes\n1.2,no\n")
    joined, paths = site_evaluation(log, labels, tmp_path / "out", resamples=20)
    assert len(joined.matched) == 2
    assert json.loads(paths["metrics"].read_text())["patient_level"]["slice_threshold"] == 0.6


def test_studies_not_triaged_are_counted_apart_from_the_tables() -> None:
    events = [_analysed("1.1", "A1", True, [0.9]), _analysed("1.2", "A2", False, [0.7]) | {"triaged": False},
              _analysed("1.3", "A3", False, None) | {"triaged": False}]
    joined = join_history(events, ReferenceLabels({"1.1": True, "1.2": True, "1.3": False}, {}))
    assert [m.study_instance_uid for m in joined.matched] == ["1.1"]
    assert joined.not_triaged == [("1.2", True), ("1.3", False)]
    assert joined.not_analysed == [] and joined.without_probabilities == 0
