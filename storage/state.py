"""Study and delivery state transitions, and every query the rest of the project needs.

Study:        receiving → ready → processing → done | failed   (a new CT image re-opens;
              `reanalyse` makes done or failed ready)
Delivery:     pending → sent | failed                      (`retry` makes failed pending)
              pending → committing → sent | pending | failed   (a destination with Storage
              Commitment: its report, or none in time, ends the attempt)
Notification: pending → sent | failed                      (the same back-off and retry)

The caller owns the transaction (`Database.write()` or `Database.read()`): these
functions read, change and flush, never commit, so several of them can form one
transaction and none holds a lock longer than its caller's.

Any number of `serve` and `worker` processes on any number of hosts share one database,
so every row of a queue is claimed once: a claim selects its row FOR UPDATE SKIP LOCKED
(PostgreSQL: others pass over a row being claimed instead of waiting for it; SQLite has
one writer at a time, BEGIN IMMEDIATE) and changes it with an UPDATE whose conditions
are checked again, by rowcount. Every change that reads a row first locks it (FOR
UPDATE), so two processes never both act on what they read. A claim carries its
holder's name and a heartbeat: studies (the worker analysing), deliveries and
notifications (the process sending them); work whose holder went silent is taken over.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Collection
from dataclasses import dataclass

from sqlalchemy import ColumnElement, and_, delete, distinct, exists, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage.db import Delivery, DeliveryState, Instance, Notification, StoreMarker, Study, StudyState, utcnow
from storage.store import result_folder

__all__ = [
    "ReceivedInstance",
    "RecordOutcome",
    "ReadyStudy",
    "Reanalysis",
    "ReanalyseOutcome",
    "StaleStudy",
    "ClaimedStudy",
    "DueDelivery",
    "DueNotification",
    "PurgeWork",
    "OverdueCommitment",
    "FailureNotice",
    "store_marker",
    "claim_store_marker",
    "record_instance",
    "hold_studies",
    "release_hold",
    "mark_ready",
    "claim_next_study",
    "heartbeat",
    "requeue_stale",
    "finish_study",
    "fail_study",
    "defer_study",
    "reanalyse_study",
    "queue_notifications",
    "claim_delivery",
    "renew_delivery",
    "delivery_sent",
    "delivery_attempt_failed",
    "claim_notification",
    "renew_notification",
    "release_notification",
    "notification_sent",
    "notification_attempt_failed",
    "delivery_committing",
    "commitment_resolved",
    "overdue_commitments",
    "retry_failed",
    "claim_purge",
    "record_purge",
    "result_folders",
    "studies_in_progress",
    "state_counts",
    "QueueFigures",
    "queue_figures",
    "find_studies",
    "study_by_uid",
    "outgoing_of",
    "undelivered_flagged",
    "failed_studies",
    "failed_study_uids",
    "failed_outgoing",
    "backoff_seconds",
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
    analysable: bool  # an image the analysis could use: it re-opens a finished study
    study_date: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class RecordOutcome:
    study_id: int
    new_study: bool
    reopened: bool
    duplicate: bool
    # Another study that holds an instance with the same SOPInstanceUID (kept apart).
    sop_uid_also_in: str | None = None


@dataclass(frozen=True)
class ReadyStudy:
    study_instance_uid: str
    accession_number: str
    instances: int
    series: int


class Reanalysis(enum.StrEnum):
    """What `reanalyse_study` did with one study."""

    QUEUED = "queued"  # it was done or failed: ready again
    BUSY = "busy"  # receiving, ready or processing: it will be analysed anyway, left alone
    NOTHING_LEFT = "nothing_left"  # its received instances were deleted (retention): nothing to analyse
    UNKNOWN = "unknown"  # no study with that StudyInstanceUID


@dataclass(frozen=True)
class ReanalyseOutcome:
    study_instance_uid: str
    accession_number: str
    state: StudyState | None  # as found; None when there is no such study
    outcome: Reanalysis


@dataclass(frozen=True)
class StaleStudy:
    id: int
    study_instance_uid: str
    accession_number: str
    failed: bool  # no attempts left: failed for good
    reason: str


@dataclass(frozen=True)
class ClaimedStudy:
    """A study a worker took, with what it needs to analyse it."""

    id: int
    study_instance_uid: str
    accession_number: str
    attempts: int
    retries: int
    analyses: int
    claimed_at: dt.datetime
    instance_paths: list[str]  # relative to storage.root


@dataclass(frozen=True)
class DueDelivery:
    """A delivery this process claimed: it sends it, then records the outcome."""

    id: int
    study_instance_uid: str
    accession_number: str
    result_series_uid: str | None
    destination: str
    kind: str  # the object set: sc, sr or kos
    result_folder: str
    priority_high: bool
    attempts: int
    taken_from: str | None = None  # the process whose claim went stale, when this one took it over


@dataclass(frozen=True)
class DueNotification:
    """A notification this process claimed."""

    id: int
    study_instance_uid: str
    accession_number: str
    url: str
    payload: str
    attempts: int
    taken_from: str | None = None


@dataclass(frozen=True)
class PurgeWork:
    """A study whose received instances may go, locked by this transaction."""

    id: int
    study_instance_uid: str
    accession_number: str
    instance_paths: list[str]  # relative to storage.root


def backoff_seconds(failures: int, initial: float, maximum: float) -> float:
    """initial × 2^(failures − 1), at most `maximum`: the wait after the n-th failure."""
    return min(maximum, initial * 2 ** max(failures - 1, 0))


# --- receiving ------------------------------------------------------------------------


def _study_for_update(session: Session, study_instance_uid: str) -> Study | None:
    """The study row, locked until the transaction ends: instances of one study arriving
    at several processes at once are recorded one after the other, none lost."""
    return session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid)
                          .with_for_update().execution_options(populate_existing=True))


def _get_or_create_study(session: Session, item: ReceivedInstance, now: dt.datetime) -> tuple[Study, bool]:
    study = _study_for_update(session, item.study_instance_uid)
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
    except IntegrityError:
        # Another association, or another process, created it a moment ago: PostgreSQL made
        # this insert wait for that transaction, which has committed, so the row is there.
        return _study_for_update(session, item.study_instance_uid), False
    return study, True


def record_instance(session: Session, item: ReceivedInstance, now: dt.datetime, *,
                    reopen_failed: bool = False, held_until: dt.datetime | None = None) -> RecordOutcome:
    """Record a stored instance (idempotent per study, series and SOPInstanceUID) and
    update its study.

    Only an analysable image not seen before re-opens a finished study: a re-send could
    not change the result. With `reopen_failed` (completion.reopen_failed) any instance
    re-opens a failed study, so a site can re-run one by sending it again. `held_until`:
    the instance came on an association that stays open, so the study is not quiet before
    then (`hold_studies`, `release_hold`); written with the instance, so a hold outlives a
    crash that cuts the association."""
    study, new_study = _get_or_create_study(session, item, now)
    # One query finds the instance itself and any namesake in another study.
    same_uid = session.scalars(select(Instance).where(Instance.sop_instance_uid == item.sop_instance_uid)).all()
    existing = next((i for i in same_uid if i.study_id == study.id
                     and i.series_instance_uid == item.series_instance_uid), None)
    elsewhere = next((i.study_id for i in same_uid if i.study_id != study.id), None)
    reopened = False
    new_image = item.analysable and existing is None
    if (study.state in (StudyState.DONE, StudyState.FAILED) and new_image) or \
            (study.state == StudyState.FAILED and reopen_failed):
        study.state, study.attempts, study.last_error = StudyState.RECEIVING, 0, None
        study.retries, study.retry_at = 0, None
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
    for name in ("study_date", "modality", "study_description"):  # the first instance that has one names it
        if getattr(item, name) and not getattr(study, name):
            setattr(study, name, getattr(item, name))
    study.last_received_at = now
    if held_until is not None:
        study.held_until = held_until
    session.flush()
    other = None if existing is not None or elsewhere is None else session.get(Study, elsewhere).study_instance_uid
    return RecordOutcome(study.id, new_study, reopened, existing is not None, other)


def hold_studies(session: Session, study_uids: Collection[str], until: dt.datetime) -> None:
    """Renew the holds of studies that this process's open associations are sending: a
    hold another process's ended association released is restored, and the holds of a
    process that dies expire by themselves at `until`. One row at a time, in UID order,
    so two processes renewing the same studies never deadlock."""
    for study_uid in sorted(study_uids):
        session.execute(update(Study).where(Study.study_instance_uid == study_uid).values(held_until=until))
    session.flush()


def release_hold(session: Session, study_uid: str, now: dt.datetime) -> None:
    """The association sending the study ended (or moved on to another study): its quiet
    time counts from now."""
    session.execute(update(Study).where(Study.study_instance_uid == study_uid).values(held_until=None))
    session.execute(update(Study).where(Study.study_instance_uid == study_uid, Study.state == StudyState.RECEIVING,
                                        Study.last_received_at < now).values(last_received_at=now))
    session.flush()


def _quiet(cutoff: dt.datetime, now: dt.datetime) -> ColumnElement[bool]:
    """Receiving, nothing received since `cutoff`, and no open association holding it."""
    return and_(Study.state == StudyState.RECEIVING, Study.last_received_at <= cutoff,
                or_(Study.held_until.is_(None), Study.held_until <= now))


def mark_ready(session: Session, stable_seconds: float, now: dt.datetime) -> list[ReadyStudy]:
    """Receiving studies quiet for `stable_seconds` and held by no open association
    become ready; returns them."""
    cutoff = now - dt.timedelta(seconds=stable_seconds)
    candidates = session.scalars(
        select(Study).where(_quiet(cutoff, now))
        .with_for_update(skip_locked=True)  # a study another process is recording into is not quiet
    ).all()
    ready = []
    for study in candidates:
        changed = session.execute(
            update(Study).where(Study.id == study.id, _quiet(cutoff, now)).values(state=StudyState.READY)
        ).rowcount
        if changed:
            series = session.scalar(
                select(func.count(distinct(Instance.series_instance_uid))).where(Instance.study_id == study.id))
            ready.append(ReadyStudy(study.study_instance_uid, study.accession_number, study.instance_count,
                                    series or 0))
    session.flush()
    return ready


# --- analysis -------------------------------------------------------------------------


def claim_next_study(session: Session, worker_id: str, now: dt.datetime) -> ClaimedStudy | None:
    """Atomically take the oldest ready study that is not waiting for a retry, or None."""
    study_id = session.scalar(
        select(Study.id)
        .where(Study.state == StudyState.READY, or_(Study.retry_at.is_(None), Study.retry_at <= now))
        .order_by(Study.last_received_at, Study.id).limit(1)
        .with_for_update(skip_locked=True)
    )
    if study_id is None:
        return None
    claimed = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.state == StudyState.READY)
        .values(state=StudyState.PROCESSING, claimed_by=worker_id, heartbeat_at=now, attempts=Study.attempts + 1)
    ).rowcount
    if claimed != 1:
        return None
    study = session.get(Study, study_id, populate_existing=True)
    paths = list(session.scalars(select(Instance.path).where(Instance.study_id == study_id)))
    return ClaimedStudy(study.id, study.study_instance_uid, study.accession_number, study.attempts,
                        study.retries, study.analyses, now, paths)


def heartbeat(session: Session, study_id: int, worker_id: str, now: dt.datetime) -> bool:
    """Prove the worker is alive; False when the study is no longer ours."""
    changed = session.execute(
        update(Study)
        .where(Study.id == study_id, Study.claimed_by == worker_id,
               Study.state == StudyState.PROCESSING)
        .values(heartbeat_at=now)
    ).rowcount
    return changed == 1


def requeue_stale(session: Session, stale_seconds: float, max_attempts: int, now: dt.datetime) -> list[StaleStudy]:
    """Processing studies whose worker went silent: ready again, or failed after
    `max_attempts` claims."""
    cutoff = now - dt.timedelta(seconds=stale_seconds)
    stale = session.scalars(
        select(Study).where(Study.state == StudyState.PROCESSING, Study.heartbeat_at < cutoff)
        .with_for_update(skip_locked=True)
    ).all()
    changed = []
    for study in stale:
        exhausted = study.attempts >= max_attempts
        reason = f"worker {study.claimed_by} stopped responding (attempt {study.attempts} of {max_attempts})"
        count = session.execute(
            update(Study)
            .where(Study.id == study.id, Study.state == StudyState.PROCESSING,
                   Study.heartbeat_at < cutoff)
            .values(state=StudyState.FAILED if exhausted else StudyState.READY, claimed_by=None,
                    last_error=reason)
        ).rowcount
        if count:
            changed.append(StaleStudy(study.id, study.study_instance_uid, study.accession_number, exhausted, reason))
    session.flush()
    return changed


def _owned(session: Session, study_id: int, worker_id: str) -> Study | None:
    """The study, locked, if `worker_id` still holds it (it may have been re-queued as stale)."""
    study = session.get(Study, study_id, populate_existing=True, with_for_update=True)
    if study is None or study.state != StudyState.PROCESSING or study.claimed_by != worker_id:
        return None
    return study


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
    kinds: list[str],
    started_at: dt.datetime,
    now: dt.datetime,
) -> Study | None:
    """Record the result and queue one delivery per destination and object set (`kinds`);
    None (nothing recorded) when the study is no longer `worker_id`'s, e.g. re-queued as
    stale meanwhile.

    A study that received new CT instances while it was analysed goes back to receiving,
    so it is analysed again once quiet; this result is still delivered.
    """
    study = _owned(session, study_id, worker_id)
    if study is None:
        return None
    study.verdict, study.study_score = verdict, study_score
    study.result_series_uid, study.last_error = result_series_uid, None
    study.analyses += 1
    study.claimed_by, study.heartbeat_at = None, None
    study.retries, study.retry_at = 0, None
    newer = study.last_received_at > started_at
    study.state = StudyState.RECEIVING if newer else StudyState.DONE
    _queue_deliveries(session, study_id, result_folder, destinations, kinds, priority_high=priority_high, now=now)
    session.flush()
    return study


def _queue_deliveries(session: Session, study_id: int, result_folder: str, destinations: list[str],
                      kinds: list[str], *, priority_high: bool, now: dt.datetime) -> None:
    """One pending delivery per destination and object set of a result folder."""
    for name in destinations:
        for kind in kinds:
            session.add(Delivery(study_id=study_id, destination=name, kind=kind, result_folder=result_folder,
                                 priority_high=priority_high, state=DeliveryState.PENDING, next_attempt_at=now))


def queue_notifications(session: Session, study_id: int, messages: list[tuple[str, str]], now: dt.datetime) -> None:
    """One pending notification per (webhook URL, JSON body), in the caller's transaction,
    so an outcome and its notifications are recorded together or not at all."""
    for url, payload in messages:
        session.add(Notification(study_id=study_id, url=url, payload=payload, state=DeliveryState.PENDING,
                                 next_attempt_at=now))
    session.flush()


@dataclass(frozen=True)
class FailureNotice:
    """The result series that tells a radiologist a study's analysis failed, to deliver."""

    result_series_uid: str
    result_folder: str
    destinations: list[str]
    kinds: list[str]


def fail_study(session: Session, study_id: int, worker_id: str, error: str, *,
               notice: FailureNotice | None = None, now: dt.datetime | None = None) -> Study | None:
    """The analysis cannot succeed: the study is failed with `error`, and its failure
    `notice` (if one could be made) queued for delivery. None (nothing changed) when the
    study is no longer `worker_id`'s."""
    study = _owned(session, study_id, worker_id)
    if study is None:
        return None
    study.state, study.last_error = StudyState.FAILED, error
    study.claimed_by, study.heartbeat_at, study.retry_at = None, None, None
    if notice is not None:
        study.result_series_uid = notice.result_series_uid
        study.analyses += 1  # the notice's series numbers are taken, as an analysis's are
        _queue_deliveries(session, study_id, notice.result_folder, notice.destinations, notice.kinds,
                          priority_high=False, now=now or utcnow())
    session.flush()
    return study


def defer_study(session: Session, study_id: int, worker_id: str, error: str, *,
                retry_at: dt.datetime) -> Study | None:
    """The environment failed (disk full, database busy): ready again at `retry_at`, with
    the attempt given back, so an outage of any length never fails a study. None when no
    longer ours."""
    study = _owned(session, study_id, worker_id)
    if study is None:
        return None
    study.state, study.last_error, study.retry_at = StudyState.READY, error, retry_at
    study.claimed_by, study.heartbeat_at = None, None
    study.retries += 1
    study.attempts -= 1
    session.flush()
    return study


def reanalyse_study(session: Session, study_instance_uid: str, now: dt.datetime) -> ReanalyseOutcome:
    """Put a done or failed study back in the queue (an admin asked): ready, with fresh
    attempts and retries and no error. `analyses` is kept, so the new result series are
    numbered after the earlier ones. A study still in the queue, or whose received
    instances retention deleted, is left as it is."""
    study = _study_for_update(session, study_instance_uid)
    if study is None:
        return ReanalyseOutcome(study_instance_uid, "", None, Reanalysis.UNKNOWN)
    found = study.state
    has_instances = exists().where(Instance.study_id == Study.id)
    changed = session.execute(
        update(Study)
        .where(Study.id == study.id, Study.state.in_([StudyState.DONE, StudyState.FAILED]), has_instances)
        .values(state=StudyState.READY, attempts=0, retries=0, retry_at=None, last_error=None, updated_at=now)
    ).rowcount
    session.flush()
    if changed == 1:
        outcome = Reanalysis.QUEUED
    elif found in (StudyState.DONE, StudyState.FAILED):
        outcome = Reanalysis.NOTHING_LEFT
    else:
        outcome = Reanalysis.BUSY
    return ReanalyseOutcome(study.study_instance_uid, study.accession_number, found, outcome)


# --- deliveries and notifications ---------------------------------------------------


def _claimable(model: type[Delivery] | type[Notification], now: dt.datetime, stale_seconds: float):
    """Pending, due, and held by nobody, or by a process that stopped renewing its claim."""
    cutoff = now - dt.timedelta(seconds=stale_seconds)
    return and_(model.state == DeliveryState.PENDING, model.next_attempt_at <= now,
                or_(model.claimed_by.is_(None), model.heartbeat_at < cutoff))


def _claim(session: Session, model: type[Delivery] | type[Notification], owner: str, now: dt.datetime,
           stale_seconds: float, order: tuple, *where) -> tuple[Delivery | Notification, str | None] | None:
    """Claim the first claimable row in `order` for `owner`: (row, the stale holder it was
    taken from, if any), or None."""
    claimable = _claimable(model, now, stale_seconds)
    found = session.execute(
        select(model.id, model.claimed_by).where(claimable, *where).order_by(*order).limit(1)
        .with_for_update(skip_locked=True)
    ).first()
    if found is None:
        return None
    changed = session.execute(
        update(model).where(model.id == found.id, claimable).values(claimed_by=owner, heartbeat_at=now)
    ).rowcount
    if changed != 1:
        return None
    return session.get(model, found.id, populate_existing=True), found.claimed_by


def _renew(session: Session, model: type[Delivery] | type[Notification], row_id: int, owner: str,
           now: dt.datetime) -> bool:
    """A claim is kept while its row is pending, and while the sender asks a destination to
    commit what it stored (committing)."""
    changed = session.execute(
        update(model).where(model.id == row_id, model.claimed_by == owner,
                            model.state.in_([DeliveryState.PENDING, DeliveryState.COMMITTING]))
        .values(heartbeat_at=now)
    ).rowcount
    return changed == 1


def claim_delivery(session: Session, owner: str, now: dt.datetime, *, stale_seconds: float,
                   destination: str | None = None, other_than: Collection[str] = ()) -> DueDelivery | None:
    """Claim the next due delivery, positive studies first, for `destination` only, or for
    any destination but those `other_than` names; None when nothing is due. A claim whose
    holder has not renewed it for `stale_seconds` is taken over."""
    where = []
    if destination is not None:
        where.append(Delivery.destination == destination)
    if other_than:
        where.append(Delivery.destination.not_in(list(other_than)))
    claimed = _claim(session, Delivery, owner, now, stale_seconds,
                     (Delivery.priority_high.desc(), Delivery.next_attempt_at, Delivery.id), *where)
    if claimed is None:
        return None
    d, taken_from = claimed
    s = d.study
    return DueDelivery(d.id, s.study_instance_uid, s.accession_number, s.result_series_uid, d.destination, d.kind,
                       d.result_folder, d.priority_high, d.attempts, taken_from)


def renew_delivery(session: Session, delivery_id: int, owner: str, now: dt.datetime) -> bool:
    """Keep `owner`'s claim fresh while it sends; False when the claim is no longer its."""
    return _renew(session, Delivery, delivery_id, owner, now)


def claim_notification(session: Session, owner: str, now: dt.datetime, *, stale_seconds: float,
                       url: str | None = None, other_than: Collection[str] = ()) -> DueNotification | None:
    """Claim the next due notification, oldest first, for the webhook `url` only, or for
    any URL but those `other_than` names (as claim_delivery)."""
    where = []
    if url is not None:
        where.append(Notification.url == url)
    if other_than:
        where.append(Notification.url.not_in(list(other_than)))
    claimed = _claim(session, Notification, owner, now, stale_seconds,
                     (Notification.next_attempt_at, Notification.id), *where)
    if claimed is None:
        return None
    n, taken_from = claimed
    s = n.study
    return DueNotification(n.id, s.study_instance_uid, s.accession_number, n.url, n.payload, n.attempts, taken_from)


def renew_notification(session: Session, notification_id: int, owner: str, now: dt.datetime) -> bool:
    return _renew(session, Notification, notification_id, owner, now)


def release_notification(session: Session, notification_id: int, owner: str) -> bool:
    """Give `owner`'s claim up without an attempt (the process is stopping mid-send): the
    notification is due again at once, for any process; False when the claim was no
    longer `owner`'s."""
    changed = session.execute(
        update(Notification).where(Notification.id == notification_id, Notification.claimed_by == owner,
                                   Notification.state == DeliveryState.PENDING)
        .values(claimed_by=None, heartbeat_at=None)
    ).rowcount
    return changed == 1


def _held(session: Session, model: type[Delivery] | type[Notification], row_id: int,
          owner: str) -> Delivery | Notification | None:
    """The row, locked, while `owner` holds its claim; the claim is released."""
    row = session.get(model, row_id, populate_existing=True, with_for_update=True)
    if row is None or row.claimed_by != owner or row.state != DeliveryState.PENDING:
        return None
    row.claimed_by, row.heartbeat_at = None, None
    return row


def _sent(row: Delivery | Notification | None, now: dt.datetime) -> Delivery | Notification | None:
    if row is None:
        return None
    row.state, row.sent_at = DeliveryState.SENT, now
    row.attempts += 1
    row.last_error = None
    return row


def _attempt_failed(row: Delivery | Notification | None, error: str, *, max_attempts: int, initial_backoff: float,
                    max_backoff: float, now: dt.datetime) -> Delivery | Notification | None:
    """The next attempt after an exponential back-off, or failed after `max_attempts`."""
    if row is None:
        return None
    row.attempts += 1
    row.last_error = error
    if row.attempts >= max_attempts:
        row.state = DeliveryState.FAILED
    else:
        row.next_attempt_at = now + dt.timedelta(seconds=backoff_seconds(row.attempts, initial_backoff, max_backoff))
    return row


def delivery_sent(session: Session, delivery_id: int, owner: str, now: dt.datetime) -> Delivery | None:
    """Record that `owner` sent the delivery; None (nothing recorded) when its claim was
    taken over meanwhile, because it stopped renewing it."""
    row = _sent(_held(session, Delivery, delivery_id, owner), now)
    session.flush()
    return row


def delivery_attempt_failed(session: Session, delivery_id: int, owner: str, error: str, *, max_attempts: int,
                            initial_backoff: float, max_backoff: float, now: dt.datetime) -> Delivery | None:
    """Schedule the delivery's next attempt with exponential back-off, or fail it after
    `max_attempts`; returns the row, or None when `owner`'s claim was taken over."""
    row = _attempt_failed(_held(session, Delivery, delivery_id, owner), error, max_attempts=max_attempts,
                          initial_backoff=initial_backoff, max_backoff=max_backoff, now=now)
    session.flush()
    return row


def delivery_committing(session: Session, delivery_id: int, owner: str, transaction_uid: str,
                        now: dt.datetime) -> Delivery | None:
    """`owner` stored the delivery at a destination with Storage Commitment and is about to
    ask it to commit, under `transaction_uid`: the delivery waits for the report (recorded
    before the request goes out, so that a report arriving at once finds it). The claim
    stays `owner`'s until the report or the timeout ends the attempt. None when the claim
    was taken over meanwhile."""
    row = session.get(Delivery, delivery_id, populate_existing=True, with_for_update=True)
    if row is None or row.claimed_by != owner or row.state != DeliveryState.PENDING:
        return None
    row.state, row.sent_at, row.transaction_uid, row.committed_at = DeliveryState.COMMITTING, now, transaction_uid, None
    row.heartbeat_at = now
    session.flush()
    return row


def commitment_resolved(session: Session, transaction_uid: str, error: str | None, *, max_attempts: int,
                        initial_backoff: float, max_backoff: float, now: dt.datetime) -> Delivery | None:
    """The attempt of the delivery awaiting commitment under `transaction_uid` ends: sent
    (committed) when `error` is None, else a failed attempt retried after the back-off
    (failed after `max_attempts`). None when no delivery awaits that transaction (unknown,
    or already ended by another process, a report or the timeout)."""
    row = session.scalar(select(Delivery).where(Delivery.transaction_uid == transaction_uid,
                                                Delivery.state == DeliveryState.COMMITTING)
                         .with_for_update().execution_options(populate_existing=True))
    if row is None:
        return None
    row.claimed_by, row.heartbeat_at = None, None
    if error is None:
        row.committed_at = now
        _sent(row, row.sent_at or now)
    else:
        row.state = DeliveryState.PENDING
        _attempt_failed(row, error, max_attempts=max_attempts, initial_backoff=initial_backoff,
                        max_backoff=max_backoff, now=now)
    session.flush()
    return row


@dataclass(frozen=True)
class OverdueCommitment:
    """A delivery whose destination has not reported its commitment in time."""

    transaction_uid: str
    destination: str
    sent_at: dt.datetime


def overdue_commitments(session: Session, sent_before: dt.datetime) -> list[OverdueCommitment]:
    """Deliveries awaiting commitment since before `sent_before`, oldest first."""
    return [OverdueCommitment(uid, destination, sent_at) for uid, destination, sent_at in session.execute(
        select(Delivery.transaction_uid, Delivery.destination, Delivery.sent_at)
        .where(Delivery.state == DeliveryState.COMMITTING, Delivery.sent_at < sent_before)
        .order_by(Delivery.sent_at, Delivery.id))]


def notification_sent(session: Session, notification_id: int, owner: str, now: dt.datetime) -> Notification | None:
    row = _sent(_held(session, Notification, notification_id, owner), now)
    session.flush()
    return row


def notification_attempt_failed(session: Session, notification_id: int, owner: str, error: str, *,
                                max_attempts: int, initial_backoff: float, max_backoff: float,
                                now: dt.datetime) -> Notification | None:
    """As delivery_attempt_failed, for a notification."""
    row = _attempt_failed(_held(session, Notification, notification_id, owner), error, max_attempts=max_attempts,
                          initial_backoff=initial_backoff, max_backoff=max_backoff, now=now)
    session.flush()
    return row


def retry_failed(session: Session, now: dt.datetime) -> tuple[int, int]:
    """Failed deliveries and notifications become pending with fresh attempts; returns
    how many of each."""
    counts = []
    for model in (Delivery, Notification):
        counts.append(session.execute(
            update(model).where(model.state == DeliveryState.FAILED)
            .values(state=DeliveryState.PENDING, attempts=0, next_attempt_at=now, claimed_by=None, heartbeat_at=None)
        ).rowcount)
    return counts[0], counts[1]


# --- retention and housekeeping -------------------------------------------------------


def claim_purge(session: Session, cutoff: dt.datetime) -> PurgeWork | None:
    """The next done study, not purged yet, whose deliveries were all sent before `cutoff`
    (or that has none and finished before it), locked until the transaction ends so no
    other process purges it meanwhile; None when there is none."""
    unsent = exists().where(Delivery.study_id == Study.id,
                            or_(Delivery.state != DeliveryState.SENT, Delivery.sent_at.is_(None),
                                Delivery.sent_at >= cutoff))
    study = session.scalar(
        select(Study).where(Study.state == StudyState.DONE, Study.purged_at.is_(None), Study.updated_at < cutoff,
                            ~unsent)
        .order_by(Study.id).limit(1).with_for_update(skip_locked=True)
    )
    if study is None:
        return None
    paths = list(session.scalars(select(Instance.path).where(Instance.study_id == study.id)))
    return PurgeWork(study.id, study.study_instance_uid, study.accession_number, paths)


def record_purge(session: Session, study_id: int, now: dt.datetime) -> None:
    """The study's instances are gone from disk: drop their rows, keep the study's."""
    session.execute(delete(Instance).where(Instance.study_id == study_id))
    session.get(Study, study_id).purged_at = now
    session.flush()


def result_folders(session: Session) -> set[str]:
    """Every result folder the database refers to (relative to storage.root): those of
    deliveries, and each study's latest result (which has no delivery without destinations)."""
    folders = set(session.scalars(select(Delivery.result_folder).distinct()))
    latest = session.execute(select(Study.study_instance_uid, Study.result_series_uid)
                             .where(Study.result_series_uid.is_not(None))).all()
    return folders | {str(result_folder(study, series)) for study, series in latest}


def studies_in_progress(session: Session, stale_seconds: float, now: dt.datetime) -> set[str]:
    """StudyInstanceUIDs being analysed by a worker that is alive (heartbeat newer than
    `stale_seconds`): their unrecorded result folders are work in progress, not leftovers."""
    cutoff = now - dt.timedelta(seconds=stale_seconds)
    return set(session.scalars(select(Study.study_instance_uid)
                               .where(Study.state == StudyState.PROCESSING, Study.heartbeat_at >= cutoff)))


# --- what admins see ------------------------------------------------------------------


def state_counts(session: Session) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    """(studies, deliveries, notifications) by state, every state listed (a notification
    is never committing)."""
    def count(model: type) -> dict:
        return dict(session.execute(select(model.state, func.count()).group_by(model.state)).all())

    studies, deliveries, notifications = count(Study), count(Delivery), count(Notification)
    return (
        {s.value: studies.get(s, 0) for s in StudyState},
        {s.value: deliveries.get(s, 0) for s in DeliveryState},
        {s.value: notifications.get(s, 0) for s in DeliveryState if s != DeliveryState.COMMITTING},
    )


# --- what the admin pages and /metrics read -------------------------------------------


@dataclass(frozen=True)
class QueueFigures:
    """The queue in numbers, node-wide (every process shares the database)."""

    instances_stored: int  # distinct instances ever stored; a re-sent copy is not counted again
    waiting: int  # ready studies not yet claimed
    processing: int
    oldest_waiting_seconds: float  # how long the longest-waiting ready study has been quiet; 0 when none
    deliveries_pending: int
    notifications_pending: int


def queue_figures(session: Session, now: dt.datetime) -> QueueFigures:
    oldest = session.scalar(select(func.min(Study.last_received_at)).where(Study.state == StudyState.READY))

    def count(model: type, state: enum.Enum) -> int:
        return session.scalar(select(func.count()).select_from(model).where(model.state == state)) or 0

    return QueueFigures(
        instances_stored=session.scalar(select(func.coalesce(func.sum(Study.instance_count), 0))) or 0,
        waiting=count(Study, StudyState.READY),
        processing=count(Study, StudyState.PROCESSING),
        oldest_waiting_seconds=max((now - oldest).total_seconds(), 0.0) if oldest is not None else 0.0,
        deliveries_pending=count(Delivery, DeliveryState.PENDING),
        notifications_pending=count(Notification, DeliveryState.PENDING),
    )


def find_studies(session: Session, *, limit: int, state: StudyState | None = None,
                 verdict: str | None = None, unanalysed: bool = False) -> list[Study]:
    """The most recently received studies, optionally of one state and one verdict label
    (or, with `unanalysed`, those without a verdict)."""
    query = select(Study).order_by(Study.last_received_at.desc(), Study.id.desc()).limit(limit)
    if state is not None:
        query = query.where(Study.state == state)
    if unanalysed:
        query = query.where(Study.verdict.is_(None))
    elif verdict is not None:
        query = query.where(Study.verdict == verdict)
    return list(session.scalars(query))


def study_by_uid(session: Session, study_instance_uid: str) -> Study | None:
    return session.scalar(select(Study).where(Study.study_instance_uid == study_instance_uid))


def outgoing_of(session: Session, study_ids: Collection[int]) -> tuple[dict[int, list[Delivery]],
                                                                         dict[int, list[Notification]]]:
    """The deliveries and notifications of these studies, oldest first, by study id."""
    deliveries: dict[int, list[Delivery]] = {i: [] for i in study_ids}
    notifications: dict[int, list[Notification]] = {i: [] for i in study_ids}
    for model, found in ((Delivery, deliveries), (Notification, notifications)):
        for row in session.scalars(select(model).where(model.study_id.in_(list(study_ids))).order_by(model.id)):
            found[row.study_id].append(row)
    return deliveries, notifications


def undelivered_flagged(session: Session, verdict: str, pending_before: dt.datetime) -> list[tuple[Study, Delivery]]:
    """Studies whose latest verdict is `verdict` (the flag) with a delivery that failed or
    that has been pending (or awaiting its Storage Commitment) since before
    `pending_before`: each with its oldest such
    delivery, the longest undelivered study first."""
    stuck = or_(Delivery.state == DeliveryState.FAILED,
                and_(Delivery.state.in_([DeliveryState.PENDING, DeliveryState.COMMITTING]),
                     Delivery.created_at < pending_before))
    found: dict[int, tuple[Study, Delivery]] = {}
    for delivery, study in session.execute(
            select(Delivery, Study).join(Study, Delivery.study_id == Study.id)
            .where(Study.verdict == verdict, stuck).order_by(Delivery.created_at, Delivery.id)):
        found.setdefault(study.id, (study, delivery))
    return list(found.values())


def failed_studies(session: Session, limit: int) -> list[Study]:
    return list(session.scalars(select(Study).where(Study.state == StudyState.FAILED)
                                .order_by(Study.updated_at.desc()).limit(limit)))


def failed_study_uids(session: Session) -> list[str]:
    """Every failed study, oldest failure first."""
    return list(session.scalars(select(Study.study_instance_uid).where(Study.state == StudyState.FAILED)
                                .order_by(Study.updated_at, Study.id)))


def failed_outgoing(session: Session, limit: int) -> tuple[list[tuple[Delivery, Study]],
                                                          list[tuple[Notification, Study]]]:
    """Failed deliveries and notifications, newest first, each with its study."""
    def failed(model: type) -> list:
        return [tuple(row) for row in session.execute(
            select(model, Study).join(Study, model.study_id == Study.id)
            .where(model.state == DeliveryState.FAILED).order_by(model.id.desc()).limit(limit))]

    return failed(Delivery), failed(Notification)


# --- the storage folder's marker ------------------------------------------------------


def store_marker(session: Session) -> str | None:
    """The marker of the storage folder this database belongs to, once one was claimed."""
    return session.scalar(select(StoreMarker.marker).limit(1))


def claim_store_marker(session: Session, marker: str) -> str:
    """Record `marker` as the database's storage folder marker unless one is recorded;
    returns the one that holds (another process's, if it claimed first)."""
    held = store_marker(session)
    if held is not None:
        return held
    try:
        with session.begin_nested():
            session.add(StoreMarker(id=1, marker=marker))  # one row: a second claim meets the key
    except IntegrityError:  # another process claimed first; its row is committed
        pass
    return store_marker(session)
