"""The triage log: one JSON line per event, for admins and their tools.

Events: received, ready, analysed, deferred (an analysis to be tried again later),
awaiting_commitment (stored at a destination with Storage Commitment, whose report is
awaited), delivered (`committed` when that report said so), delivery_failed, notified, notify_failed, failed, purged, reanalyse (an admin
put a done or failed study back in the queue). Each line is keyed
by StudyInstanceUID and AccessionNumber and carries no patient name, ID or birth date
unless `log.include_patient_identifiers` is set. Lines are appended with one write each,
so several processes can share the file. A line torn by a crash or a full disk costs only
itself: writers start every event on a line of its own, and readers skip (and count) lines
that are not UTF-8 JSON objects without losing the lines after them.
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["EVENTS", "PATIENT_KEYS", "TriageLog", "LogReader", "read_events", "format_event", "describe",
           "print_events"]

EVENTS = ("received", "ready", "analysed", "deferred", "awaiting_commitment", "delivered", "delivery_failed",
          "notified", "notify_failed", "failed", "purged", "reanalyse")
PATIENT_KEYS = ("patient_name", "patient_id", "patient_birth_date")


class TriageLog:
    """Appends events to the log file; thread-safe, process-safe for whole lines."""

    def __init__(self, path: Path, *, include_patient_identifiers: bool = False) -> None:
        self.path = Path(path)
        self.include_patient_identifiers = include_patient_identifiers
        self._lock = threading.Lock()

    def check(self) -> None:
        """Create the folder and open the file for appending, so that a `log.path` that cannot
        be written stops start-up instead of failing the first event of every study.

        Raises OSError naming `log.path` and the reason.
        """
        os.close(self._open())

    def write(self, event: str, study_instance_uid: str, accession_number: str = "", **fields: Any) -> dict:
        """Append one event and return it.

        Raises ValueError for an unknown event, and OSError naming `log.path` when the line
        could not be written whole (a full disk, a folder gone read-only): callers that must
        go on (ingest answering a stored C-STORE) catch OSError.
        """
        if event not in EVENTS:
            raise ValueError(f"unknown triage log event {event!r}; known: {', '.join(EVENTS)}")
        if not self.include_patient_identifiers:
            for key in PATIENT_KEYS:
                fields.pop(key, None)
        record = {
            "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"),
            "event": event,
            "study_instance_uid": study_instance_uid,
            "accession_number": accession_number,
            **fields,
        }
        line = (json.dumps(record, ensure_ascii=False, default=str) + "\n").encode("utf-8")
        with self._lock:
            fd = self._open()
            try:
                if _ends_inside_a_line(fd):
                    line = b"\n" + line  # end the torn line, so that it does not take this event with it
                written = os.write(fd, line)  # one write: O_APPEND keeps it whole across processes
            except OSError as exc:
                raise _naming(self.path, exc) from exc
            finally:
                os.close(fd)
        if written < len(line):  # the next write ends this torn line
            message = f"only {written} of {len(line)} bytes written (disk full?)"
            raise OSError(errno.ENOSPC, message, str(self.path))
        return record

    def _open(self) -> int:
        """The log opened for appending, its folder created if missing; read access too,
        because the last byte tells whether the file ends inside a line."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT
        try:
            try:
                return os.open(self.path, flags, 0o600)
            except FileNotFoundError:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                return os.open(self.path, flags, 0o600)
        except OSError as exc:
            raise _naming(self.path, exc) from exc


def _ends_inside_a_line(fd: int) -> bool:
    """Whether the file's last byte is not a newline (a line torn by a crash or a full disk)."""
    info = os.fstat(fd)
    return stat.S_ISREG(info.st_mode) and info.st_size > 0 and os.pread(fd, 1, info.st_size - 1) != b"\n"


def _naming(path: Path, exc: OSError) -> OSError:
    """The same error (and OSError subclass), naming the log file rather than a folder or nothing."""
    return OSError(exc.errno, exc.strerror or str(exc), str(path))


class LogReader:
    """Reads events from the log line by line as bytes, so that a torn or undecodable line
    costs only itself; `skipped` counts such lines for the reader's caller to report."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.skipped = 0
        self.offset = 0  # bytes of the file read so far

    def read(self) -> list[dict]:
        """Every readable event, oldest first; a missing file has none.

        A last line without its newline is read too: it is either whole or torn.
        """
        self.offset = 0
        return self._read_from_offset(whole_lines_only=False)

    def read_new(self) -> list[dict]:
        """The events appended since the last call (the whole log the first time). Only
        whole lines are taken: a line still being written is read next time."""
        return self._read_from_offset(whole_lines_only=True)

    def _read_from_offset(self, *, whole_lines_only: bool) -> list[dict]:
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return []
        events = []
        with handle:
            handle.seek(self.offset)
            for line in handle:
                if whole_lines_only and not line.endswith(b"\n"):
                    break
                self.offset += len(line)
                event = self._parse(line)
                if event is not None:
                    events.append(event)
        return events

    def read_study(self, study_instance_uid: str) -> list[dict]:
        """Every event of one study, oldest first, from the whole log. Lines that cannot
        mention the study are passed over unparsed, so this stays fast on a long log."""
        needle = json.dumps(study_instance_uid).encode()
        try:
            handle = open(self.path, "rb")
        except FileNotFoundError:
            return []
        with handle:
            found = [self._parse(line) for line in handle if needle in line]
        return [e for e in found if e is not None and e.get("study_instance_uid") == study_instance_uid]

    def follow(
        self, *, poll_seconds: float = 0.5, on_wait: Callable[[], None] | None = None
    ) -> Iterator[dict]:
        """Events from the start of the log and then as they are appended (like `tail -f`).

        Waits for a missing file to appear, calling `on_wait` once so that the caller can say so.
        A line is parsed only once its newline has arrived: until then it may still be being
        written, and a torn line is ended by the newline that starts the next event.
        """
        while True:
            try:
                handle = open(self.path, "rb", buffering=0)
                break
            except FileNotFoundError:
                if on_wait is not None:
                    on_wait()
                    on_wait = None
                time.sleep(poll_seconds)
        with handle:
            pending = b""
            while True:
                chunk = handle.read(65536)
                if not chunk:
                    time.sleep(poll_seconds)
                    continue
                self.offset += len(chunk)
                *lines, pending = (pending + chunk).split(b"\n")
                for line in lines:
                    event = self._parse(line)
                    if event is not None:
                        yield event

    def _parse(self, line: bytes) -> dict | None:
        """The event on one line, or None for a blank line or (counted) an unreadable one."""
        if not line.strip():
            return None
        try:
            event = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            event = None
        if not isinstance(event, dict):
            self.skipped += 1
            return None
        return event


def read_events(path: Path) -> list[dict]:
    """Every readable event in the log, oldest first (`LogReader.read` also counts the rest)."""
    return LogReader(path).read()


_RED, _GREEN, _YELLOW, _BOLD, _RESET = "\033[31m", "\033[32m", "\033[33m", "\033[1m", "\033[0m"


def format_event(record: dict, *, color: bool = False) -> str:
    """One readable line; positive verdicts and failures stand out."""
    when = str(record.get("time", ""))[:19].replace("T", " ")
    event = str(record.get("event", "?"))
    study = record.get("study_instance_uid", "")
    accession = record.get("accession_number") or "-"
    details = describe(record)
    text = f"{when}  {event.upper():<15} acc {accession:<16} {details}  study {study}"
    if not color:
        return text
    if event == "analysed" and record.get("positive"):
        return f"{_BOLD}{_RED}{text}{_RESET}"
    if event in ("failed", "delivery_failed", "deferred", "notify_failed") or record.get("triaged") is False:
        return f"{_YELLOW}{text}{_RESET}"
    if event == "analysed":
        return f"{_GREEN}{text}{_RESET}"
    return text


def describe(record: dict) -> str:
    """What an event says, in a few words (without its time, kind and study)."""
    event = record.get("event")
    if event == "analysed" and record.get("triaged") is False:
        warnings = "".join(f" [{w}]" for w in record.get("warnings", []))
        reasons = "; ".join(f"{r.get('code')}: {r.get('text')}" for r in record.get("not_triaged") or [])
        return f"NOT TRIAGED (no verdict); {reasons}{warnings}"
    if event == "analysed":
        flag = "SUSPECTED ICH - PRIORITY" if record.get("positive") else "ICH not detected"
        warnings = "".join(f" [{w}]" for w in record.get("warnings", []))
        return (
            f"{flag}; {record.get('positive_slices')}/{record.get('total_slices')} slices > "
            f"{record.get('slice_threshold')}, score {record.get('study_score', 0):.3f}{warnings}"
        )
    if event == "received":
        return f"{record.get('note', 'study receiving')} from {record.get('calling_aet', '?')}"
    if event == "ready":
        return f"{record.get('instances')} instances in {record.get('series')} series"
    if event == "delivered":
        committed = ", committed" if record.get("committed") else ""
        return f"to {record.get('destination')} ({record.get('objects')} {record.get('kind', '')} objects{committed})"
    if event == "awaiting_commitment":
        return (f"stored at {record.get('destination')} ({record.get('objects')} {record.get('kind', '')} objects), "
                "awaiting its storage commitment")
    if event == "notified":
        return f"to {record.get('url')}"
    if event == "notify_failed":
        return f"to {record.get('url')}: {record.get('reason', '')}"
    if event == "purged":
        return f"{record.get('instances')} received instances deleted (storage.retention_days)"
    if event in ("failed", "delivery_failed"):
        target = f"to {record['destination']}: " if "destination" in record else ""
        return f"{target}{record.get('reason', '')}"
    if event == "deferred":
        return f"{record.get('reason', '')}; next attempt at {record.get('next_attempt_at')}"
    if event == "reanalyse":
        return (f"{record.get('previous_state', '?')} study queued to be analysed again (asked from the "
                f"{record.get('by', '?')})")
    return ""


def print_events(records: Iterable[dict], out: TextIO, *, as_json: bool, color: bool) -> None:
    """Write each event as it comes (flushed, for `--follow`).

    Errors of `out` propagate: a closed pipe (`ichnode log | head -1`) raises BrokenPipeError,
    which the CLI turns into a quiet exit.
    """
    for record in records:
        out.write((json.dumps(record) if as_json else format_event(record, color=color)) + "\n")
        out.flush()
