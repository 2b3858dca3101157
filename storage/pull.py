"""Pull mode's state: which series each [[sources]] PACS reported and which were pulled,
and each source's polls (the window's start, the latest error, who polls it now).

As everywhere in storage/, these functions only read and flush; the caller's
`Database.write()` owns the transaction."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import PulledSeries, SourcePoll

__all__ = ["ReportedSeries", "SourceState", "claim_poll", "renew_poll", "finish_poll", "series_due",
           "record_pulled", "source_states"]


@dataclass(frozen=True)
class ReportedSeries:
    """A matching series as the PACS reported it."""

    study_instance_uid: str
    series_instance_uid: str
    instances: int | None  # NumberOfSeriesRelatedInstances; None when the PACS does not say


@dataclass(frozen=True)
class SourceState:
    """A source's polls, for `ichnode status`."""

    source: str
    succeeded_from: dt.datetime | None
    attempted_at: dt.datetime | None
    last_error: str | None


def _poll_row(session: Session, source: str) -> SourcePoll:
    """The source's row, made on its first poll (by one process when several start together)."""
    row = session.get(SourcePoll, source)
    if row is not None:
        return row
    try:
        with session.begin_nested():
            session.add(SourcePoll(source=source))
    except IntegrityError:  # another process made it a moment ago
        pass
    return session.get(SourcePoll, source, populate_existing=True)


def claim_poll(session: Session, source: str, owner: str, now: dt.datetime,
               until: dt.datetime) -> tuple[bool, dt.datetime | None]:
    """Claim the next poll of `source` until `until`: (claimed, start of the last successful
    poll or None before the first). Not claimed while another process's claim lasts."""
    _poll_row(session, source)
    claimed = session.execute(
        update(SourcePoll)
        .where(SourcePoll.source == source,
               or_(SourcePoll.claimed_until.is_(None), SourcePoll.claimed_until <= now, SourcePoll.claimed_by == owner))
        .values(claimed_by=owner, claimed_until=until)
    ).rowcount == 1
    row = session.get(SourcePoll, source, populate_existing=True)
    return claimed, row.succeeded_from


def renew_poll(session: Session, source: str, owner: str, until: dt.datetime) -> bool:
    """Keep the claim of a poll that is still retrieving; False when it is no longer ours."""
    return session.execute(update(SourcePoll).where(SourcePoll.source == source, SourcePoll.claimed_by == owner)
                           .values(claimed_until=until)).rowcount == 1


def finish_poll(session: Session, source: str, owner: str, started: dt.datetime, now: dt.datetime,
                error: str | None) -> None:
    """Record a poll that began at `started` and release its claim. Only a poll without
    `error` moves the next window on; a failed one leaves it where it was."""
    values: dict[str, object] = {"attempted_at": now, "last_error": error, "claimed_by": None, "claimed_until": None}
    if error is None:
        values["succeeded_from"] = started
    session.execute(update(SourcePoll).where(SourcePoll.source == source, SourcePoll.claimed_by == owner)
                    .values(**values))


def series_due(session: Session, source: str, reported: Iterable[ReportedSeries], now: dt.datetime,
               settle_seconds: float) -> list[ReportedSeries]:
    """Note what the PACS reported and return what to pull now: each series not pulled yet,
    or holding more instances than were pulled, once its instance count has stayed the
    same for `settle_seconds` (a series still arriving at the PACS waits)."""
    settled = now - dt.timedelta(seconds=settle_seconds)
    due = []
    for series in reported:
        row = session.scalar(select(PulledSeries).where(
            PulledSeries.series_instance_uid == series.series_instance_uid))
        if row is None:
            row = PulledSeries(series_instance_uid=series.series_instance_uid,
                               study_instance_uid=series.study_instance_uid, source=source,
                               reported_instances=series.instances, changed_at=now, pulled_instances=0)
            session.add(row)
        elif series.instances is not None and series.instances != row.reported_instances:
            row.reported_instances, row.changed_at = series.instances, now
        grown = series.instances is not None and series.instances > row.pulled_instances
        if (row.pulled_at is None or grown) and row.changed_at <= settled:
            due.append(series)
    session.flush()
    return due


def record_pulled(session: Session, series_instance_uid: str, instances: int, now: dt.datetime) -> None:
    """The series was retrieved whole: `instances` of it are stored and recorded."""
    session.execute(update(PulledSeries).where(PulledSeries.series_instance_uid == series_instance_uid)
                    .values(pulled_at=now, pulled_instances=instances))


def source_states(session: Session) -> list[SourceState]:
    return [SourceState(r.source, r.succeeded_from, r.attempted_at, r.last_error)
            for r in session.scalars(select(SourcePoll).order_by(SourcePoll.source))]

