"""Study and delivery state transitions; the only code that changes their states.

Study:    receiving → ready → processing → done | failed   (a new CT instance re-opens)
Delivery: pending → sent | failed                          (`retry` makes failed pending)

Claims are single conditional UPDATEs checked by rowcount, so any number of worker
processes on any number of hosts (PostgreSQL) never take the same study.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Delivery, DeliveryState, Instance, Study, StudyState

__all__ = [
    "ReceivedInstance",
    "RecordOutcome",
    "record_instance",
    "mark_ready",
    "claim_next_study",
    "heartbeat",
    "requeue_stale",
    "finish_study",
    "fail_study",
    "due_deliveries",
    "delivery_sent",
    "delivery_attempt_failed",
    "retry_failed_deliveries",
    "purge_candidates",
    "record_purge",
    "state_counts",
    "latest_studies",
]


@dataclass(frozen=True)
class ReceivedInstance:
    """What the SCP learnt about one stored instance."""

    study_instance_uid: str
    series_instance_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    modality: str
    accession_number: str
    transfer_syntax_uid: str
    path: str
    size: int
    calling_aet: str
    analysable: bool  # CT images re-open a finished study; other objects do not


@dataclass(frozen=True)
class RecordOutcome:
    study_id: int
    new_study: bool
    reopened: bool
    duplicate: bool


def _get_or_create_study(session: Session, item: ReceivedInstance, now: dt.datetime) -> tuple[Study, bool]:
    study = session.scalar(select(Study).where(Study.study_instance_uid == item.study_instance_uid))
    if study is not None:
        return study, False
    study = Study(
        study_instance_uid=item.study_instance_uid,
        accession_number=item.accession_number,
        state=StudyState.RECEIVING,
        first_received_at=now,
        last_received_at=now,
    )
    try:
        with session.begin_nested():
            session.add(study)
    except IntegrityError:  # another association created it a moment ago
        study = session.scalar(
            select(Study).where(Study.study_instance_uid == item.study_instance_uid)
        )
        return study, False
    return study, True


def record_instance(session: Session, item: ReceivedInstance, now: dt.datetime) -> RecordOutcome:
    """Record a stored instance (idempotent per SOPInstanceUID) and update its study."""
    study, new_study = _get_or_create_study(session, item, now)
    existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == item.sop_instance_uid))
    reopened = False
    if study.state in (StudyState.DONE, StudyState.FAILED) and item.analysable and existing is None:
        # Only a CT image not seen before re-opens a finished study; a re-send does not.
        study.state, study.attempts, study.last_error = StudyState.RECEIVING, 0, None
        reopened = True
    elif study.state == StudyState.READY:
        study.state = StudyState.RECEIVING  # more is arriving: wait for quiet again
    if existing is None:
        session.add(
            Instance(
                sop_instance_uid=item.sop_instance_uid,
                study_id=study.id,
                series_instance_uid=item.series_instance_uid,
                sop_class_uid=item.sop_class_uid,
                modality=item.modality,
                transfer_syntax_uid=item.transfer_syntax_uid,
                path=item.path,
                size=item.size,
                calling_aet=item.calling_aet,
                received_at=now,
            )
        )
        study.instance_count += 1
    else:
        existing.size, existing.received_at = item.size, now
        existing.transfer_syntax_uid = item.transfer_syntax_uid
    if item.accession_number and not study.accession_number:
        study.accession_number = item.accession_number
    study.last_received_at = now
    session.flush()
    return RecordOutcome(study.id, new_study, reopened, existing is not None)


def mark_ready(session: Session, stable_seconds: float, now: dt.datetime) -> list[Study]:
    """Receiving studies quiet for `stable_seconds` become ready; returns them."""
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    candidates = session.scalars(
        select(Study).where(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff)
    ).all()
    ready = []
    for study in candidates:
        changed = session.execute(
            update(Study)
            .where(Study.id == study.id, Study.state == StudyState.RECEIVING,
                   Study.last_received_at <= cutoff)
            .values(state=StudyState.READY)
        ).rowcount
        if changed:
            ready.append(study)
    session.flush()
    for study in ready:
        session.refresh(study)
    return ready


def claim_next_study(session: Session, worker_id: str, now: dt.datetime) -> Study | None:
    """Atomically take the oldest ready study for `worker_id`, or None."""
    candidates = session.scalars(
        select(Study.id).where(Study.state == StudyState.READY).order_by(Study.last_received_at).limit(8)
    ).all()
    for study_id in candidates:
        claimed = session.execute(
            update(Study)
            .where(Study.id == study_id, Study.state == StudyState.READY)
            .values(state=StudyState.PROCESSING, claimed_by=worker_id, heartbeat_at=now,
                    attempts=Study.attempts + 1)
        ).rowcount
        session.commit()
        if claimed == 1:
            return session.get(Study, study_id, populate_existing=True)
    return None


def heartbeat(session: Session, study_id: int, worker_id: str, now: dt.datetime) -> bool:
    """Prove the worker is alive; False when the study is no longer ours."""
    changed = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.claimed_by == worker_id,
               Study.state == StudyState.PROCESSING)
        .values(heartbeat_at=now)
    ).rowcount
    session.commit()
    return changed == 1


def requeue_stale(session: Session, stale_seconds: float, max_attempts: int, now: dt.datetime) -> list[Study]:
    """Processing studies whose worker went silent: ready again, or failed after
    `max_attempts` claims."""
    cutoff = now - dt.timedelta(seconds=stale_seconds)
    stale = session.scalars(
        select(Study).where(Study.state == StudyState.PROCESSING, Study.heartbeat_at < cutoff)
    ).all()
    changed = []
    for study in stale:
        exhausted = study.attempts >= max_attempts
        count = session.execute(
            update(Study)
            .where(Study.id == study.id, Study.state == StudyState.PROCESSING,
                   Study.heartbeat_at < cutoff)
            .values(
                state=StudyState.FAILED if exhausted else StudyState.READY,
                claimed_by=None,
                last_error=(f"worker {study.claimed_by} stopped responding "
                            f"(attempt {study.attempts} of {max_attempts})"),
            )
        ).rowcount
        if count:
            changed.append(study)
    session.commit()
    for study in changed:
        session.refresh(study)
    return changed


def finish_study(
    session: Session,
    study_id: int,
    worker_id: str,
    *,
    verdict: str,
    study_score: float,
    result_series_uid: str,
    result_folder: str,
    priority_high: bool,
    destinations: list[str],
    started_at: dt.datetime,
    now: dt.datetime,
) -> Study | None:
    """Record the result and queue one delivery per destination; None (nothing recorded)
    when the study is no longer `worker_id`'s, e.g. re-queued as stale meanwhile.

    A study that received new CT instances while it was analysed goes back to receiving,
    so it is analysed again once quiet; this result is still delivered.
    """
    study = session.get(Study, study_id, populate_existing=True)
    if study is None or study.state != StudyState.PROCESSING or study.claimed_by != worker_id:
        session.rollback()
        return None
    study.verdict, study.study_score = verdict, study_score
    study.result_series_uid, study.last_error = result_series_uid, None
    study.analyses += 1
    study.claimed_by, study.heartbeat_at = None, None
    newer = study.last_received_at > started_at
    study.state = StudyState.RECEIVING if newer else StudyState.DONE
    for name in destinations:
        session.add(
            Delivery(
                study_id=study_id, destination=name, result_folder=result_folder,
                priority_high=priority_high, state=DeliveryState.PENDING,
                next_attempt_at=now,
            )
        )
    session.commit()
    return study


def fail_study(
    session: Session, study_id: int, worker_id: str, error: str, *, retry: bool, max_attempts: int
) -> Study | None:
    """An analysis that failed: ready again while attempts remain and `retry`, else failed.
    None (nothing changed) when the study is no longer `worker_id`'s."""
    study = session.get(Study, study_id, populate_existing=True)
    if study is None or study.state != StudyState.PROCESSING or study.claimed_by != worker_id:
        session.rollback()
        return None
    again = retry and study.attempts < max_attempts
    study.state = StudyState.READY if again else StudyState.FAILED
    study.last_error, study.claimed_by, study.heartbeat_at = error, None, None
    session.commit()
    return study


def due_deliveries(session: Session, now: dt.datetime, limit: int = 16) -> list[Delivery]:
    return list(
        session.scalars(
            select(Delivery)
            .where(Delivery.state == DeliveryState.PENDING, Delivery.next_attempt_at <= now)
            .order_by(Delivery.priority_high.desc(), Delivery.next_attempt_at)
            .limit(limit)
        )
    )


def delivery_sent(session: Session, delivery: Delivery, now: dt.datetime) -> None:
    delivery.state, delivery.sent_at = DeliveryState.SENT, now
    delivery.attempts += 1
    delivery.last_error = None
    session.commit()


def delivery_attempt_failed(
    session: Session,
    delivery: Delivery,
    error: str,
    *,
    max_attempts: int,
    initial_backoff: float,
    max_backoff: float,
    now: dt.datetime,
) -> bool:
    """Schedule the next attempt with exponential back-off; True when it is now failed."""
    delivery.attempts += 1
    delivery.last_error = error
    if delivery.attempts >= max_attempts:
        delivery.state = DeliveryState.FAILED
    else:
        wait = min(max_backoff, initial_backoff * 2 ** (delivery.attempts - 1))
        delivery.next_attempt_at = now + dt.timedelta(seconds=wait)
    session.commit()
    return delivery.state == DeliveryState.FAILED


def retry_failed_deliveries(session: Session, now: dt.datetime) -> int:
    """Failed deliveries become pending with fresh attempts; returns how many."""
    count = session.execute(
        update(Delivery)
        .where(Delivery.state == DeliveryState.FAILED)
        .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now)
    ).rowcount
    session.commit()
    return count


def purge_candidates(session: Session, cutoff: dt.datetime) -> list[tuple[int, str, str, list[str]]]:
    """Done studies whose deliveries were all sent before `cutoff` (or that have none and
    finished before it), not purged yet: (id, StudyInstanceUID, accession, instance paths)."""
    done = session.scalars(
        select(Study).where(Study.state == StudyState.DONE, Study.purged_at.is_(None),
                            Study.updated_at < cutoff)
    ).all()
    result = []
    for study in done:
        deliveries = study.deliveries
        if any(d.state != DeliveryState.SENT or d.sent_at is None or d.sent_at >= cutoff for d in deliveries):
            continue
        paths = [i.path for i in study.instances]
        result.append((study.id, study.study_instance_uid, study.accession_number, paths))
    return result


def record_purge(session: Session, study_id: int, now: dt.datetime) -> None:
    """The study's instances are gone from disk: drop their rows, keep the study's."""
    session.query(Instance).filter(Instance.study_id == study_id).delete()
    study = session.get(Study, study_id)
    study.purged_at = now
    session.commit()


def state_counts(session: Session) -> tuple[dict[str, int], dict[str, int]]:
    """(studies by state, deliveries by state), every state listed."""
    studies = dict(session.execute(select(Study.state, func.count()).group_by(Study.state)).all())
    deliveries = dict(
        session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)).all()
    )
    return (
        {s.value: studies.get(s, 0) for s in StudyState},
        {s.value: deliveries.get(s, 0) for s in DeliveryState},
    )


def latest_studies(session: Session, limit: int = 10) -> list[Study]:
    return list(session.scalars(select(Study).order_by(Study.updated_at.desc()).limit(limit)))
