"""node.triagelog: JSON-lines events, patient identifiers off by default, readable output,
and a torn or undecodable line costs only itself."""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import queue
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from node.triagelog import (
    EVENTS, LogReader, TriageLog, format_event, print_events, read_events,
)
from tests.peers import wait_for

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


def append(path: Path, data: bytes) -> None:
    """Bytes as a crash, a full disk or another tool would leave them."""
    with open(path, "ab") as handle:
        handle.write(data)


class Follower:
    """`LogReader.follow` in a thread, its events on a queue; `stop` ends it with one more line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.reader = LogReader(path)
        self.events: queue.Queue[dict] = queue.Queue()
        self.waits = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for event in self.reader.follow(poll_seconds=0.01, on_wait=self._on_wait):
            if self._stopping.is_set():
                return
            self.events.put(event)

    def _on_wait(self) -> None:
        self.waits += 1

    def next_event(self) -> dict:
        return self.events.get(timeout=10)

    def caught_up(self) -> None:
        """Wait until the follower has read every byte now in the file."""
        wait_for(lambda: self.reader.offset == self.path.stat().st_size, timeout=10, every=0.005,
                 what="the follower to reach the end")

    def stop(self) -> None:
        self._stopping.set()
        self.path.parent.mkdir(parents=True, exist_ok=True)  # a follower may still wait for the file
        append(self.path, b'{"event": "stop"}\n')
        self._thread.join(timeout=10)


Follow = Callable[[Path], Follower]


@pytest.fixture
def follow() -> Iterator[Follow]:
    followers: list[Follower] = []

    def start(path: Path) -> Follower:
        followers.append(Follower(path))
        return followers[-1]

    yield start
    for follower in followers:
        follower.stop()


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


def test_read_events_skips_and_counts_lines_that_are_not_json_objects(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = TriageLog(path)
    log.write("received", "1.2.3")
    append(path, b'not json at all\n{"event": "trunc\n\n42\n')  # the blank line is not counted
    log.write("ready", "1.2.3")
    reader = LogReader(path)
    assert [e["event"] for e in reader.read()] == ["received", "ready"]
    assert reader.skipped == 3


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


def test_an_event_after_a_torn_last_line_starts_on_its_own_line(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = TriageLog(path)
    log.write("received", "1.2.3")
    append(path, b'{"time": "2026-01-01T00:00:00.000+00:00", "event": "rea')  # a crash mid-line
    record = log.write("ready", "1.2.3")
    raw = path.read_bytes().split(b"\n")
    assert raw[1] == b'{"time": "2026-01-01T00:00:00.000+00:00", "event": "rea'
    assert json.loads(raw[2]) == record
    assert raw[3:] == [b""]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_read_events_skips_a_torn_last_line_and_keeps_the_next_event(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = TriageLog(path)
    log.write("received", "1.2.3")
    append(path, b'{"time": "2026-01-01T00:00:00.000+00:00", "event": "rea')
    log.write("ready", "1.2.3")
    reader = LogReader(path)
    assert [e["event"] for e in reader.read()] == ["received", "ready"]
    assert reader.skipped == 1


def test_follow_skips_a_torn_line_and_yields_the_event_after_it(tmp_path: Path, follow: Follow) -> None:
    path = tmp_path / "t.log"
    log = TriageLog(path)
    log.write("received", "1.2.3")
    append(path, b'{"time": "2026-01-01T00:00:00.000+00:00", "event": "rea')
    follower = follow(path)
    assert follower.next_event()["event"] == "received"
    follower.caught_up()  # the torn part is read, and waits for its newline
    record = log.write("ready", "1.2.3")
    assert follower.next_event() == record
    assert follower.reader.skipped == 1
    assert follower.events.empty()


def test_follow_waits_for_a_line_still_being_written(tmp_path: Path, follow: Follow) -> None:
    path = tmp_path / "t.log"
    TriageLog(path).write("received", "1.2.3")
    follower = follow(path)
    assert follower.next_event()["event"] == "received"
    record = {"event": "ready", "study_instance_uid": "1.2.3", "note": "Zürich"}
    line = json.dumps(record, ensure_ascii=False).encode() + b"\n"
    cut = line.index("ü".encode()) + 1  # mid-character, as a reader may catch a write
    append(path, line[:cut])
    follower.caught_up()
    assert follower.events.empty()
    append(path, line[cut:])
    assert follower.next_event() == record
    assert follower.reader.skipped == 0


@pytest.mark.parametrize("how", ["read", "follow"])
def test_a_torn_utf8_character_costs_only_its_line(tmp_path: Path, follow: Follow, how: str) -> None:
    path = tmp_path / "t.log"
    log = TriageLog(path, include_patient_identifiers=True)
    log.write("received", "1.2.3", patient_name="MÜLLER^JÖRG")
    line = path.read_bytes()
    torn = line[: line.index("Ü".encode()) + 1]  # the first of the two bytes of Ü
    append(path, torn)  # a crash mid-character, then more events
    log.write("ready", "1.2.3", patient_name="MÜLLER^JÖRG")
    log.write("analysed", "1.2.3")
    append(path, torn + b"\n")  # the same, but a newline after it
    log.write("delivered", "1.2.3")
    with pytest.raises(UnicodeDecodeError):
        torn.decode("utf-8")
    expected = ["received", "ready", "analysed", "delivered"]
    if how == "read":
        reader = LogReader(path)
        assert [e["event"] for e in reader.read()] == expected
    else:
        follower = follow(path)
        assert [follower.next_event()["event"] for _ in expected] == expected
        reader = follower.reader
    assert reader.skipped == 2


def test_follow_says_once_that_it_waits_for_a_missing_file(tmp_path: Path, follow: Follow) -> None:
    path = tmp_path / "logs" / "t.log"
    follower = follow(path)
    wait_for(lambda: follower.waits > 0, timeout=10, every=0.005, what="the waiting notice")
    record = TriageLog(path).write("received", "1.2.3")
    assert follower.next_event() == record
    assert follower.waits == 1


def test_follow_yields_the_events_already_there(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    log = TriageLog(path)
    records = [log.write("received", "1.2.3"), log.write("ready", "1.2.3")]
    events = LogReader(path).follow(poll_seconds=0.01)
    assert [next(events), next(events)] == records
    events.close()


def test_check_creates_the_folder_and_an_owner_only_file(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "t.log"
    TriageLog(path).check()
    assert path.read_bytes() == b""
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize(
    ("case", "reason"), [("parent is a file", errno.ENOTDIR), ("path is a folder", errno.EISDIR)]
)
def test_check_of_an_unwritable_path_raises_naming_it(tmp_path: Path, case: str, reason: int) -> None:
    # Tests run as root, whom a read-only folder does not stop; these two stop anyone.
    if case == "parent is a file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "logs" / "t.log"
    else:
        path = tmp_path / "t.log"
        path.mkdir()
    with pytest.raises(OSError) as raised:
        TriageLog(path).check()
    assert raised.value.errno == reason
    assert raised.value.filename == str(path)
    assert str(path) in str(raised.value)


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full")
def test_a_full_disk_raises_oserror_naming_the_file() -> None:
    with pytest.raises(OSError) as raised:
        TriageLog(Path("/dev/full")).write("received", "1.2.3")
    assert raised.value.errno == errno.ENOSPC
    assert raised.value.filename == "/dev/full"


SHORT_WRITE = """
import resource, sys
from pathlib import Path
from node.triagelog import TriageLog

path = Path(sys.argv[1])
log = TriageLog(path)
log.write("received", "1.2.3")
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (path.stat().st_size + 20, hard))  # room for 20 more bytes
try:
    log.write("ready", "1.2.3", padding="x" * 200)
except OSError as exc:
    print(exc)
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
log.write("analysed", "1.2.3")
"""


def test_a_short_write_does_not_take_the_next_event_with_it(tmp_path: Path) -> None:
    path = tmp_path / "t.log"
    done = subprocess.run([sys.executable, "-c", SHORT_WRITE, str(path)], capture_output=True, text=True,
                          cwd=Path(__file__).parents[1], timeout=60, check=True)
    assert "only 20 of" in done.stdout and str(path) in done.stdout
    reader = LogReader(path)
    assert [e["event"] for e in reader.read()] == ["received", "analysed"]
    assert reader.skipped == 1


def test_print_events_lets_a_closed_pipe_raise() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)  # `ichnode log | head -1` after head has exited
    out = open(write_end, "w", encoding="utf-8")
    try:
        with pytest.raises(BrokenPipeError):
            print_events([analysed(True)], out, as_json=False, color=False)
    finally:
        try:
            out.close()
        except BrokenPipeError:
            pass  # the line still buffered; the descriptor is closed all the same


def test_a_study_not_triaged_is_said_so_and_stands_out() -> None:
    record = {"time": "2024-05-01T12:00:00", "event": "analysed", "study_instance_uid": "1.2.3",
              "accession_number": "ACC1", "triaged": False, "positive": False, "warnings": [],
              "not_triaged": [{"code": "not_head", "text": "BodyPartExamined is CHEST"}]}
    text = format_event(record, color=True)
    assert "NOT TRIAGED (no verdict); not_head: BodyPartExamined is CHEST" in text
    assert RED not in text and "not detected" not in text and "\033[33m" in text


def test_the_history_counts_studies_not_triaged_apart(tmp_path: Path) -> None:
    from node.history import TriageHistory

    log = tmp_path / "triage.log"
    lines = [{"time": "2024-05-01T12:00:00Z", "event": "analysed", "study_instance_uid": uid, **fields}
             for uid, fields in (("1", {"positive": True, "study_score": 0.9}),
                                 ("2", {"positive": False, "study_score": 0.1}),
                                 ("3", {"positive": False, "triaged": False}))]
    log.write_text("".join(json.dumps(line) + "\n" for line in lines))
    snapshot = TriageHistory(log, days=3).refresh(dt.datetime(2024, 5, 2))
    assert snapshot.analyses == {"positive": 1, "negative": 1, "not_triaged": 1}
    (day,) = [d for d in snapshot.days(dt.date(2024, 5, 1), 1)]
    assert (day.analyses, day.positives, day.not_triaged) == (3, 1, 1)
    assert day.positive_rate == 0.5 and day.not_triaged_rate == pytest.approx(1 / 3)
