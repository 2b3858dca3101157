"""Notifications to a real webhook receiver on loopback: one per positive study, retried
while the receiver answers 500 (across a node restart), arriving exactly once, without
patient identifiers; and the message bodies themselves."""

from __future__ import annotations

import json
from pathlib import Path

from node.config import NotifyOn, NotifyTarget
from node.notify import analysed_message, failed_message, messages_for
from node.triagelog import read_events
from tests.conftest import load_labels
from tests.peers import NodeProcess, WebhookReceiver, free_port, node_config, storescu, wait_for
from training.model.architectures import create_model
from training.model.checkpoint import default_model_config, save_checkpoint

FIELDS = {"verdict": "AI ICH TRIAGE: SUSPECTED - PRIORITY", "positive": True, "study_score": 0.97,
          "positive_slices": 4, "total_slices": 30, "required_slices": 2, "slice_threshold": 0.8,
          "model": "effclass", "model_training_data": "synthetic",
          "warnings": ["DEMO MODEL - SYNTHETIC DATA - NOT FOR CLINICAL USE"]}
TARGETS = (NotifyTarget("http://a/", NotifyOn.POSITIVE), NotifyTarget("http://b/", NotifyOn.ALL),
           NotifyTarget("http://c/", NotifyOn.FAILED))


def test_each_outcome_reaches_the_webhooks_that_asked_for_it() -> None:
    positive = analysed_message("1.2.3", "ACC1", FIELDS)
    negative = analysed_message("1.2.3", "ACC1", {**FIELDS, "positive": False})
    assert [url for url, _ in messages_for(TARGETS, positive)] == ["http://a/", "http://b/"]
    assert [url for url, _ in messages_for(TARGETS, negative)] == ["http://b/"]
    assert [url for url, _ in messages_for(TARGETS, failed_message("1.2.3", "", "no head series"))] == ["http://c/"]


def test_the_message_is_a_chat_line_and_names_no_patient_unless_allowed() -> None:
    (_, body), _ = messages_for(TARGETS, analysed_message("1.2.3", "ACC1", FIELDS))
    message = json.loads(body)
    assert message["text"] == ("ICH triage: SUSPECTED ICH - PRIORITY | accession ACC1 | 4 of 30 slices with "
                               "P(ICH) > 0.8, max 0.97 | study 1.2.3 [DEMO MODEL - SYNTHETIC DATA - NOT FOR "
                               "CLINICAL USE]")
    assert not {"patient_name", "patient_id", "patient_birth_date"} & set(message)
    named = analysed_message("1.2.3", "ACC1", FIELDS, patient={"patient_name": "DOE^JANE"})
    assert named["patient_name"] == "DOE^JANE"


def test_a_webhook_that_fails_gets_the_message_once_it_is_back_even_across_a_restart(
        tmp_path: Path, positive_study: Path) -> None:
    receiver = WebhookReceiver().start()
    receiver.failing.set()
    checkpoint = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18"), default_model_config("resnet18"))
    port = free_port()
    # Every slice above a threshold of 0: the study is flagged, whatever the random model says.
    config = node_config(tmp_path, port=port, checkpoint=checkpoint, stable_seconds=1,
                         notify=[(receiver.url, "positive")], overrides={"triage": {"source": "config", "slice_threshold": 0.0}})
    node = NodeProcess(tmp_path, config, port).start()
    study_uid = load_labels(positive_study)["study_instance_uid"]

    def events(name: str) -> list[dict]:
        return [e for e in read_events(tmp_path / "triage.log") if e["event"] == name]

    try:
        assert storescu(port, sorted((positive_study / "HEAD").glob("*.dcm"))).returncode == 0
        wait_for(lambda: events("notify_failed"), timeout=300, what="a refused notification")
        node.stop()  # the pending notification lives in the database, not in memory
        receiver.failing.clear()
        node.start()
        wait_for(lambda: events("notified"), timeout=120, what="the notification once the webhook is back")
    finally:
        node.stop()
        receiver.stop()
    assert receiver.refused >= 1 and len(receiver.received) == 1 and len(events("notified")) == 1
    (message,) = receiver.received
    assert message["study_instance_uid"] == study_uid and message["positive"] is True
    assert message["text"].startswith("ICH triage: SUSPECTED ICH - PRIORITY")
    text = json.dumps(message)
    labels = load_labels(positive_study)
    assert labels["patient_id"] not in text and "PHANTOM" not in text
    assert "HTTP 500" in events("notify_failed")[0]["reason"]


def test_a_study_not_triaged_is_said_so_and_never_reaches_a_positive_only_webhook() -> None:
    fields = {"verdict": "AI ICH TRIAGE: NOT TRIAGED", "triaged": False, "positive": False, "model": "effclass",
              "model_training_data": "synthetic", "warnings": [],
              "not_triaged": [{"code": "contrast", "text": "IV contrast was given (ContrastBolusAgent OMNIPAQUE)"}]}
    message = analysed_message("1.2.3", "ACC1", fields)
    assert message["text"] == ("ICH triage: NOT TRIAGED (no verdict: read as if no triage had run) | accession ACC1 "
                               "| IV contrast was given (ContrastBolusAgent OMNIPAQUE) | study 1.2.3")
    assert message["not_triaged"] == fields["not_triaged"] and message["triaged"] is False
    assert [url for url, _ in messages_for(TARGETS, message)] == ["http://b/"]
