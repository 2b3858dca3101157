"""node.triagelog: JSON-lines events, patient identifiers off by default, readable output."""

from __future__ import annotations

import datetime as dt
import json
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from node.triagelog import EVENTS, TriageLog, format_event, read_events

PATIENT = {"patient_name": "DOE^JANE", "patient_id": "P123", "patient_birth_date": "19500101"}
RED = "\033[31m"


def analysed(positive: bool) -> dict:
    return {
        "time": "2024-05-01T12:00:00.000+00:00",
        "event": "analysed",
        "study_instance_uid": "1.2.3",
        "accession_number": "ACC1",
        "positive": positive,
        "positive_slices": 4 if positive else 0,
        "total_slices": 30,
        "slice_threshold": 0.8,
        "study_score": 0.97 if positive else 0.12,
    }


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def test_write_appends_one_json_line_per_event(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "triage.log"  # the folder is created too
    log = TriageLog(path)
    before = dt.datetime.now(dt.UTC)
    record = log.write("received", "1.2.3", "ACC1", calling_aet="CT01")
    log.write("ready", "1.2.3", "ACC1", instances=30, series=2)
    after = dt.datetime.now(dt.UTC)

    raw = lines(path)
    assert len(raw) == 2
    first, second = (json.loads(line) for line in raw)
    assert first == record
    assert list(first)[:4] == ["time", "event", "study_instance_uid", "accession_number"]
    assert first["event"] == "received"
    assert first["study_instance_uid"] == "1.2.3"
    assert first["accession_number"] == "ACC1"
    assert first["calling_aet"] == "CT01"
    when = dt.datetime.fromisoformat(first["time"])
    assert when.utcoffset() == dt.timedelta(0)
    assert before - dt.timedelta(milliseconds=1) <= when <= after
    assert (second["event"], second["instances"], second["series"]) == ("ready", 30, 2)


def test_accession_number_defaults_to_empty(tmp_path: Path) -> None:
    TriageLog(tmp_path / "t.log").write("failed", "1.2.3", reason="no series")
    (event,) = read_events(tmp_path / "t.log")
    assert event["accession_number"] == ""
    assert event["reason"] == "no series"


def test_patient_identifiers_dropped_by_default(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    record = TriageLog(path).write("received", "1.2.3", "ACC1", calling_aet="CT01", **PATIENT)
    text = path.read_text()
    for key, value in PATIENT.items():
        assert key not in record
        assert key not in text and value not in text
    assert record["calling_aet"] == "CT01"


def test_patient_identifiers_kept_when_enabled(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    TriageLog(path, include_patient_identifiers=True).write("received", "1.2.3", "ACC1", **PATIENT)
    (event,) = read_events(path)
    for key, value in PATIENT.items():
        assert event[key] == value


@pytest.mark.parametrize("event", ["analyzed", "RECEIVED", "", "sent"])
def test_unknown_event_raises(tmp_path: Path, event: str) -> None:
    path = tmp_path / "t.log"
    with pytest.raises(ValueError, match="unknown triage log event"):
        TriageLog(path).write(event, "1.2.3")
    assert not path.exists()


def test_every_documented_event_is_accepted(tmp_path: Path) -> None:
    log = TriageLog(tmp_path / "t.log")
    for event in EVENTS:
        log.write(event, "1.2.3")
    assert [e["event"] for e in read_events(tmp_path / "t.log")] == list(EVENTS)


def test_file_is_created_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    TriageLog(path).write("received", "1.2.3")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_read_events_skips_lines_that_are_not_json(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = TriageLog(path)
    log.write("received", "1.2.3")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("not json at all\n{\"event\": \"trunc\n\n")
    log.write("ready", "1.2.3")
    assert [e["event"] for e in read_events(path)] == ["received", "ready"]


def test_read_events_of_missing_file_is_empty(tmp_path: Path) -> None:
    assert read_events(tmp_path / "absent.log") == []


def test_positive_analysed_event_is_red() -> None:
    text = format_event(analysed(True), color=True)
    assert RED in text
    assert "SUSPECTED ICH - PRIORITY" in text
    assert "4/30" in text and "ACC1" in text and "1.2.3" in text


def test_negative_analysed_event_is_not_red() -> None:
    text = format_event(analysed(False), color=True)
    assert RED not in text
    assert "SUSPECTED" not in text
    assert "ICH not detected" in text


def test_format_without_color_has_no_escape_codes() -> None:
    text = format_event(analysed(True), color=False)
    assert "\033[" not in text
    assert "SUSPECTED ICH - PRIORITY" in text
    assert text.startswith("2024-05-01 12:00:00")


def test_format_delivery_failure() -> None:
    record = {"time": "2024-05-01T12:00:00", "event": "delivery_failed", "study_instance_uid": "1.2.3",
              "accession_number": "", "destination": "pacs", "reason": "association rejected"}
    text = format_event(record)
    assert "to pacs: association rejected" in text
    assert "DELIVERY_FAILED" in text
    assert "acc -" in text


def test_concurrent_writes_stay_whole_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = TriageLog(path)
    start = threading.Barrier(8)
    padding = "x" * 2000  # long lines make interleaving visible if writes were split

    def writer(thread: int) -> None:
        start.wait()
        for n in range(50):
            log.write("received", f"1.2.{thread}", f"A{thread}", n=n, padding=padding)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(writer, range(8)))

    raw = lines(path)
    assert len(raw) == 400
    events = [json.loads(line) for line in raw]  # every line is intact JSON
    for thread in range(8):
        numbers = [e["n"] for e in events if e["study_instance_uid"] == f"1.2.{thread}"]
        assert numbers == list(range(50))  # each thread's lines in its own order
    assert all(e["padding"] == padding for e in events)


def test_model_warnings_are_shown_with_the_verdict() -> None:
    record = {"time": "2026-01-01T00:00:00", "event": "analysed", "study_instance_uid": "1.2",
              "accession_number": "A1", "positive": False, "positive_slices": 0, "total_slices": 20,
              "slice_threshold": 0.8, "study_score": 0.4,
              "warnings": ["UNTRAINED MODEL (RANDOM WEIGHTS) - RESULTS ARE MEANINGLESS"]}
    assert "[UNTRAINED MODEL (RANDOM WEIGHTS) - RESULTS ARE MEANINGLESS]" in format_event(record)
