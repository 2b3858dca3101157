"""`ichnode status` and `ichnode retry`: the queue as an admin needs to see and steer it.

Both open the existing database and never create one: a missing database is an error
naming it, not a new empty queue."""

from __future__ import annotations

from typing import TextIO

from node.config import Config
from storage.db import Database, StudyState, utcnow
from storage.state import latest_studies, retry_failed, state_counts

__all__ = ["print_status", "retry_deliveries"]


def print_status(config: Config, out: TextIO, *, limit: int = 10) -> None:
    database = Database(config.storage.database_url)
    with database.read() as session:
        studies, deliveries, notifications = state_counts(session)
        recent = latest_studies(session, limit)
    out.write("studies:       " + "  ".join(f"{k} {v}" for k, v in studies.items()) + "\n")
    out.write("deliveries:    " + "  ".join(f"{k} {v}" for k, v in deliveries.items()) + "\n")
    out.write("notifications: " + "  ".join(f"{k} {v}" for k, v in notifications.items()) + "\n")
    if not recent:
        out.write("no studies received yet\n")
        return
    out.write(f"\nlatest {len(recent)} studies (UTC):\n")
    out.write(f"{'updated':<20} {'state':<11} {'accession':<16} {'verdict':<22} {'score':>6}  study\n")
    for study in recent:
        score = f"{study.study_score:.3f}" if study.study_score is not None else "-"
        out.write(
            f"{study.updated_at:%Y-%m-%d %H:%M:%S} {study.state.value:<11} "
            f"{study.accession_number or '-':<16} {study.verdict or '-':<22} {score:>6}  "
            f"{study.study_instance_uid}\n"
        )
        if study.last_error and study.state in (StudyState.FAILED, StudyState.READY):
            label = "reason" if study.state == StudyState.FAILED else "waiting"
            out.write(f"{'':<20} {label}: {study.last_error}\n")


def retry_deliveries(config: Config) -> tuple[int, int]:
    """Failed deliveries and notifications pending again: (deliveries, notifications)."""
    with Database(config.storage.database_url).write() as session:
        return retry_failed(session, utcnow())
