"""`ichnode status`, `ichnode retry` and `ichnode reanalyse`: the queue (and each pull-mode
source's polls) as an admin needs to see and steer it.

All open the existing database and never create one: a missing database is an error
naming it, not a new empty queue. `status` reads through the same Dashboard query as
the web pages, so `--json` gives a script exactly what the queue page shows."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TextIO

from node.config import Config
from node.dashboard import Dashboard, ModelInfo, QueueFilter, QueueView, as_json
from node.history import TriageHistory
from storage.db import Database
from storage.pull import source_states
from storage.state import ReanalyseOutcome
from storage.store import InstanceStore

__all__ = ["queue_view", "print_status", "retry_deliveries", "reanalyse", "reanalyse_failed"]


def _dashboard(config: Config) -> Dashboard:
    """The node's state read from its database and triage log, without a model loaded."""
    return Dashboard(config, Database(config.storage.database_url), InstanceStore(config.storage.root),
                     TriageHistory(config.log.path, days=config.web.history_days), ModelInfo.of(config, None))


def queue_view(config: Config, *, limit: int = 10) -> QueueView:
    return _dashboard(config).queue(QueueFilter(limit=limit))


def _print_sources(config: Config, database: Database, out: TextIO) -> None:
    """Each [[sources]] PACS: its last successful poll (the next window starts there, less
    overlap_seconds) and, when the latest poll failed, why."""
    with database.read() as session:
        states = {state.source: state for state in source_states(session)}
    for i, source in enumerate(config.sources):
        state = states.get(source.name)
        good = state.succeeded_from if state else None
        line = f"last successful poll {good:%Y-%m-%d %H:%M:%S} UTC" if good else "no successful poll yet"
        if state and state.last_error:
            line += f"; poll at {state.attempted_at:%Y-%m-%d %H:%M:%S} failed: {state.last_error}"
        out.write(f"{'sources:' if i == 0 else '':<15}{source.name} ({source.kind}): {line}\n")


def print_status(config: Config, out: TextIO, *, limit: int = 10, as_json_text: bool = False,
                 version: str = "") -> None:
    """The queue as text (headed by `version`, the node's release, and the config file), or as JSON."""
    dashboard = _dashboard(config)
    view = dashboard.queue(QueueFilter(limit=limit))
    if as_json_text:
        out.write(json.dumps(as_json(view), indent=2) + "\n")
        return
    if version:
        out.write(f"node:          ichnode {version}, config {config.source}\n")
    out.write("destinations:  " + ("  ".join(f"{d.name} {d.described}" for d in config.destinations) or "none")
              + "\n")
    out.write("studies:       " + "  ".join(f"{k} {v}" for k, v in view.studies_by_state.items()) + "\n")
    out.write("deliveries:    " + "  ".join(f"{k} {v}" for k, v in view.deliveries_by_state.items()) + "\n")
    out.write("notifications: " + "  ".join(f"{k} {v}" for k, v in view.notifications_by_state.items()) + "\n")
    _print_sources(config, dashboard.database, out)
    if not view.studies:
        out.write("no studies received yet\n")
        return
    out.write(f"\nlatest {len(view.studies)} studies by time received (UTC):\n")
    out.write(f"{'received':<20} {'state':<11} {'accession':<16} {'verdict':<22} {'score':>6}  study\n")
    for study in view.studies:
        score = f"{study.study_score:.3f}" if study.study_score is not None else "-"
        out.write(
            f"{study.last_received_at:%Y-%m-%d %H:%M:%S} {study.state:<11} "
            f"{study.accession_number or '-':<16} {study.verdict or '-':<22} {score:>6}  "
            f"{study.study_instance_uid}\n"
        )
        if study.last_error and study.state in ("failed", "ready"):
            label = "reason" if study.state == "failed" else "waiting"
            out.write(f"{'':<20} {label}: {study.last_error}\n")


def retry_deliveries(config: Config) -> tuple[int, int]:
    """Failed deliveries and notifications pending again: (deliveries, notifications);
    the retry button of the web pages does the same."""
    return _dashboard(config).retry()


def reanalyse(config: Config, study_instance_uids: Sequence[str]) -> list[ReanalyseOutcome]:
    """Each named done or failed study back in the queue; the Re-analyse button does the same."""
    return _dashboard(config).reanalyse(study_instance_uids, by="cli")


def reanalyse_failed(config: Config) -> list[ReanalyseOutcome]:
    """Every failed study back in the queue."""
    return _dashboard(config).reanalyse_failed(by="cli")
