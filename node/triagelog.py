"""The triage log: one JSON line per event, for admins and their tools.

Events: received, ready, analysed, delivered, delivery_failed, failed, purged. Each line is keyed
by StudyInstanceUID and AccessionNumber and carries no patient name, ID or birth date
unless `log.include_patient_identifiers` is set. Lines are appended with one write each,
so several processes can share the file.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

__all__ = ["EVENTS", "TriageLog", "read_events", "follow_events", "format_event"]

EVENTS = ("received", "ready", "analysed", "delivered", "delivery_failed", "failed", "purged")
PATIENT_KEYS = ("patient_name", "patient_id", "patient_birth_date")


class TriageLog:
    """Appends events to the log file; thread-safe, process-safe for whole lines."""

    def __init__(self, path: Path, *, include_patient_identifiers: bool = False) -> None:
        self.path = Path(path)
        self.include_patient_identifiers = include_patient_identifiers
        self._lock = threading.Lock()

    def write(self, event: str, study_instance_uid: str, accession_number: str = "", **fields: Any) -> dict:
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
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return record


def read_events(path: Path) -> list[dict]:
    """Every event in the log, oldest first; lines that are not JSON are skipped."""
    if not Path(path).exists():
        return []
    events = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def follow_events(path: Path, *, poll_seconds: float = 0.5, from_start: bool = True) -> Iterator[dict]:
    """Events as they are appended (like `tail -f`), waiting for the file to appear."""
    path = Path(path)
    while not path.exists():
        time.sleep(poll_seconds)
    with open(path, encoding="utf-8") as handle:
        if not from_start:
            handle.seek(0, os.SEEK_END)
        pending = ""
        while True:
            chunk = handle.readline()
            if not chunk:
                time.sleep(poll_seconds)
                continue
            pending += chunk
            if not pending.endswith("\n"):
                continue  # a line still being written
            try:
                yield json.loads(pending)
            except json.JSONDecodeError:
                pass
            pending = ""


_RED, _GREEN, _YELLOW, _BOLD, _RESET = "\033[31m", "\033[32m", "\033[33m", "\033[1m", "\033[0m"


def format_event(record: dict, *, color: bool = False) -> str:
    """One readable line; positive verdicts and failures stand out."""
    when = str(record.get("time", ""))[:19].replace("T", " ")
    event = str(record.get("event", "?"))
    study = record.get("study_instance_uid", "")
    accession = record.get("accession_number") or "-"
    details = _details(record)
    text = f"{when}  {event.upper():<15} acc {accession:<16} {details}  study {study}"
    if not color:
        return text
    if event == "analysed" and record.get("positive"):
        return f"{_BOLD}{_RED}{text}{_RESET}"
    if event in ("failed", "delivery_failed"):
        return f"{_YELLOW}{text}{_RESET}"
    if event == "analysed":
        return f"{_GREEN}{text}{_RESET}"
    return text


def _details(record: dict) -> str:
    event = record.get("event")
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
        return f"to {record.get('destination')} ({record.get('objects')} objects)"
    if event == "purged":
        return f"{record.get('instances')} received instances deleted (storage.retention_days)"
    if event in ("failed", "delivery_failed"):
        target = f"to {record['destination']}: " if "destination" in record else ""
        return f"{target}{record.get('reason', '')}"
    return ""


def print_events(records: Iterator[dict] | list[dict], out: TextIO, *, as_json: bool, color: bool) -> None:
    for record in records:
        out.write((json.dumps(record) if as_json else format_event(record, color=color)) + "\n")
        out.flush()
