"""storage.state: study and delivery state transitions, each test on a real SQLite file and
on a real PostgreSQL database (a throw-away cluster, tests/conftest.py).

The state functions never commit (the caller owns the transaction); these tests commit
where another session must see the change, as the node's `Database.write()` does."""

from __future__ import annotations

import datetime as dt
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session

from storage.db import Database, Delivery, DeliveryState, Instance, Study, StudyState
from storage.state import (
    ClaimedStudy,
    DueDelivery,
    ReceivedInstance,
    Reanalysis,
    claim_delivery,
    claim_next_study,
    claim_notification,
    commitment_resolved,
    defer_study,
    delivery_attempt_failed,
    delivery_committing,
    delivery_sent,
    fail_study,
    failed_study_uids,
    overdue_commitments,
    finish_study,
    heartbeat,
    hold_studies,
    mark_ready,
    notification_attempt_failed,
    notification_sent,
    queue_notifications,
    reanalyse_study,
    record_instance,
    record_purge,
    release_hold,
    release_notification,
    renew_delivery,
    requeue_stale,
    result_folders,
    retry_failed,
    state_counts,
    studies_in_progress,
)

T0 = dt.datetime(2024, 5, 1, 12, 0, 0)  # naive UTC, as storage.db.utcnow gives
STUDY = "1.2.3.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


def at(seconds: float) -> dt.datetime:
    return T0 + dt.timedelta(seconds=seconds)


def instance(sop: str, *, study: str = STUDY, analysable: bool = True, accession: str = "ACC1",
             series: str | None = None) -> ReceivedInstance:
    return ReceivedInstance(
        study_instance_uid=study,
        series_instance_uid=series or f"{study}.1",
        sop_instance_uid=sop,
        sop_class_uid=CT if analysable else SR,
        modality="CT" if analysable else "SR",
        accession_number=accession,
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        path=f"instances/{study}/{sop}.dcm",
        size=1000,
        calling_aet="SCANNER",
        analysable=analysable,
    )


STALE = 120  # seconds a claim on a delivery or notification lives without renewal


@pytest.fixture()
def database(database_url: str) -> Iterator[Database]:
    db = Database(database_url, create=True)
    yield db
    db.dispose()


@pytest.fixture()
def session(database: Database) -> Iterator[Session]:
    with database.session() as s:
        yield s


def receive(session: Session, sop: str, now: dt.datetime, **kwargs: object) -> int:
    outcome = record_instance(session, instance(sop, **kwargs), now)  # type: ignore[arg-type]
    session.commit()
    return outcome.study_id


def ready_study(session: Session, count: int = 3, study: str = STUDY) -> int:
    """A study with `count` instances received at T0, made ready at T0 + 60 s."""
    for i in range(count):
        study_id = receive(session, f"{study}.1.{i}", T0, study=study)
    assert [s.study_instance_uid for s in mark_ready(session, 30, at(60))] == [study]
    session.commit()
    return study_id


def processing_study(session: Session, worker: str = "w1", claimed_at: dt.datetime | None = None) -> ClaimedStudy:
    """A ready study claimed by `worker` (at T0 + 61 s unless `claimed_at` is given)."""
    ready_study(session)
    study = claim_next_study(session, worker, claimed_at or at(61))
    assert study is not None
    return study


def study_row(database: Database, session: Session, study_id: int) -> Study:
    """The row as committed, read through a fresh session (`session` is committed first)."""
    session.commit()
    with database.read() as other:
        return other.get(Study, study_id)


# --- receiving and completion ------------------------------------------------------


def test_first_instance_creates_receiving_study(session: Session) -> None:
    outcome = record_instance(session, instance("1.2.3.4.1.1"), T0)
    session.commit()
    assert outcome.new_study and not outcome.duplicate and not outcome.reopened
    study = session.get(Study, outcome.study_id)
    assert study.state == StudyState.RECEIVING
    assert study.study_instance_uid == STUDY
    assert study.accession_number == "ACC1"
    assert study.instance_count == 1
    assert study.first_received_at == study.last_received_at == T0


def test_record_instance_is_idempotent_per_sop_instance_uid(session: Session) -> None:
    first = record_instance(session, instance("1.2.3.4.1.1"), T0)
    second = record_instance(session, instance("1.2.3.4.1.2"), at(1))
    resend = record_instance(session, instance("1.2.3.4.1.1"), at(2))
    session.commit()
    assert not second.new_study and not second.duplicate
    assert resend.duplicate and not resend.new_study
    assert first.study_id == second.study_id == resend.study_id
    study = session.get(Study, first.study_id)
    assert study.instance_count == 2
    assert study.last_received_at == at(2)
    assert len(session.scalars(select(Instance)).all()) == 2


def test_accession_number_filled_in_later(session: Session) -> None:
    study_id = receive(session, "1.2.3.4.1.1", T0, accession="")
    receive(session, "1.2.3.4.1.2", at(1), accession="LATER")
    assert session.get(Study, study_id).accession_number == "LATER"


def test_mark_ready_only_after_stable_seconds(session: Session) -> None:
    study_id = receive(session, "1.2.3.4.1.1", T0)
    receive(session, "1.2.3.4.1.2", at(10))
    assert mark_ready(session, 30, at(39)) == []
    session.commit()
    assert session.get(Study, study_id).state == StudyState.RECEIVING
    ready = mark_ready(session, 30, at(40))
    session.commit()
    assert [(s.study_instance_uid, s.instances, s.series) for s in ready] == [(STUDY, 2, 1)]
    assert session.get(Study, study_id).state == StudyState.READY
    assert mark_ready(session, 30, at(100)) == []  # already ready: not reported again


def test_new_instance_puts_ready_study_back_to_receiving(session: Session) -> None:
    study_id = ready_study(session)
    outcome = record_instance(session, instance("1.2.3.4.9.9"), at(70))
    session.commit()
    assert not outcome.reopened
    study = session.get(Study, study_id)
    assert study.state == StudyState.RECEIVING
    assert mark_ready(session, 30, at(99)) == []
    assert [s.study_instance_uid for s in mark_ready(session, 30, at(100))] == [STUDY]


def held(session: Session, sop: str, now: dt.datetime, until: dt.datetime) -> None:
    """An instance of STUDY arriving on an association that holds the study until `until`."""
    record_instance(session, instance(sop), now, held_until=until)
    session.commit()


def ready_uids(session: Session, now: dt.datetime) -> list[str]:
    ready = [s.study_instance_uid for s in mark_ready(session, 30, now)]
    session.commit()
    return ready


def test_a_study_is_not_quiet_while_its_association_is_open(session: Session) -> None:
    """A sender pausing longer than the quiet time (a busy scanner, a busy node) does not
    make its study ready; the quiet time counts from the end of its association."""
    held(session, "1.2.3.4.1.1", T0, until=at(300))
    assert ready_uids(session, at(100)) == []  # quiet for 100 s, but its association is open
    release_hold(session, STUDY, at(200))
    session.commit()
    assert ready_uids(session, at(229)) == []
    assert ready_uids(session, at(230)) == [STUDY]


def test_a_study_cut_off_by_a_crash_waits_for_its_resend(session: Session) -> None:
    """The hold written with the last instance outlives the process that died with the
    association open: the study waits for the sender's re-send, not just its quiet time."""
    held(session, "1.2.3.4.1.1", T0, until=at(300))
    assert ready_uids(session, at(99)) == []
    held(session, "1.2.3.4.1.2", at(100), until=at(400))  # the re-send, on a new association
    hold_studies(session, [STUDY], at(700))  # renewed by the receiving process while it lasts
    session.commit()
    assert ready_uids(session, at(450)) == []
    release_hold(session, STUDY, at(500))
    session.commit()
    assert ready_uids(session, at(530)) == [STUDY]


def test_a_hold_nobody_renews_expires(session: Session) -> None:
    """A sender that never sends again: the study is ready once the hold of its dead
    association (completion.resend_wait_seconds) has run out."""
    held(session, "1.2.3.4.1.1", T0, until=at(300))
    assert ready_uids(session, at(299)) == []
    assert ready_uids(session, at(300)) == [STUDY]


def test_a_released_hold_does_not_send_an_analysed_study_back(session: Session) -> None:
    """Only a new instance during the analysis sends the study back to receiving, not the
    end of an association that finished sending before the claim."""
    study = processing_study(session)
    release_hold(session, STUDY, at(90))
    assert finish(session, study.id, started_at=at(61)).state == StudyState.DONE


# --- claiming and liveness ---------------------------------------------------------


def test_only_one_worker_claims_a_ready_study(database: Database) -> None:
    with database.session() as setup:
        study_id = ready_study(setup)
    with database.write() as first:
        claimed = claim_next_study(first, "worker-a", at(61))
        assert claimed is not None and claimed.id == study_id
        assert len(claimed.instance_paths) == 3
    with database.write() as second:
        assert claim_next_study(second, "worker-b", at(61)) is None
        row = study_row(database, second, study_id)
    assert row.state == StudyState.PROCESSING
    assert row.claimed_by == "worker-a"
    assert row.heartbeat_at == at(61)
    assert row.attempts == 1


def test_racing_workers_claim_a_study_exactly_once(database: Database) -> None:
    with database.session() as setup:
        study_id = ready_study(setup)
    start = threading.Barrier(8)

    def claim(worker: str) -> int | None:
        start.wait()
        with database.write() as own:
            study = claim_next_study(own, worker, at(61))
            return None if study is None else study.id

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(claim, [f"worker-{i}" for i in range(8)]))
    assert sorted(results, key=lambda r: r is None) == [study_id] + [None] * 7
    with database.read() as check:
        row = check.get(Study, study_id)
        assert row.attempts == 1
        assert row.claimed_by == f"worker-{results.index(study_id)}"


def test_claim_takes_the_oldest_ready_study(session: Session) -> None:
    receive(session, "9.1", at(5), study="9")
    receive(session, "8.1", T0, study="8")
    mark_ready(session, 30, at(60))
    session.commit()
    first = claim_next_study(session, "w", at(61))
    second = claim_next_study(session, "w", at(61))
    assert (first.study_instance_uid, second.study_instance_uid) == ("8", "9")
    assert claim_next_study(session, "w", at(61)) is None


def test_attempts_increment_with_each_claim(session: Session) -> None:
    study = processing_study(session)
    requeue_stale(session, 10, 3, at(80))  # w1 went silent
    again = claim_next_study(session, "w2", at(90))
    assert again is not None and again.id == study.id
    assert again.attempts == 2
    assert session.get(Study, study.id).claimed_by == "w2"


def test_heartbeat_only_for_the_claiming_worker(database: Database, session: Session) -> None:
    study = processing_study(session, "w1")
    assert heartbeat(session, study.id, "w1", at(70))
    assert not heartbeat(session, study.id, "w2", at(80))
    assert study_row(database, session, study.id).heartbeat_at == at(70)


def test_heartbeat_false_once_study_is_no_longer_processing(session: Session) -> None:
    study = processing_study(session, "w1")
    fail_study(session, study.id, "w1", "boom")
    assert not heartbeat(session, study.id, "w1", at(70))


def test_requeue_stale_returns_silent_study_to_ready(database: Database, session: Session) -> None:
    study = processing_study(session, "w1", claimed_at=at(61))
    assert requeue_stale(session, 120, 3, at(61 + 120)) == []  # exactly at the limit: not stale
    requeued = requeue_stale(session, 120, 3, at(61 + 121))
    assert [(s.study_instance_uid, s.failed) for s in requeued] == [(STUDY, False)]
    row = study_row(database, session, study.id)
    assert row.state == StudyState.READY
    assert row.claimed_by is None
    assert "w1" in row.last_error


def test_requeue_stale_leaves_live_study_alone(session: Session) -> None:
    study = processing_study(session, "w1", claimed_at=at(61))
    assert heartbeat(session, study.id, "w1", at(170))
    assert requeue_stale(session, 120, 3, at(200)) == []
    assert session.get(Study, study.id, populate_existing=True).state == StudyState.PROCESSING


def test_requeue_stale_fails_study_after_max_attempts(database: Database, session: Session) -> None:
    study = processing_study(session, "w1", claimed_at=at(61))
    for claim in range(2, 4):
        requeue_stale(session, 120, 3, at(1000 * claim))
        again = claim_next_study(session, f"w{claim}", at(1000 * claim))
        assert again is not None and again.attempts == claim
    requeued = requeue_stale(session, 120, 3, at(5000))
    assert [(s.study_instance_uid, s.failed) for s in requeued] == [(STUDY, True)]
    row = study_row(database, session, study.id)
    assert row.state == StudyState.FAILED
    assert "attempt 3 of 3" in row.last_error


# --- finishing and failing ---------------------------------------------------------


def finish(session: Session, study_id: int, *, started_at: dt.datetime, priority: bool = True,
           destinations: tuple[str, ...] = ("pacs", "archive"), kinds: tuple[str, ...] = ("sc",)) -> Study:
    return finish_study(
        session, study_id, "w1",
        verdict="positive", study_score=0.97, result_series_uid="1.2.3.4.99",
        result_folder="results/1.2.3.4/1.2.3.4.99", priority_high=priority,
        destinations=list(destinations), kinds=list(kinds), started_at=started_at, now=at(120),
    )


def test_finish_study_queues_one_delivery_per_destination(database: Database, session: Session) -> None:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61))
    row = study_row(database, session, study.id)
    assert row.state == StudyState.DONE
    assert (row.verdict, row.study_score, row.result_series_uid) == ("positive", 0.97, "1.2.3.4.99")
    assert row.analyses == 1
    assert row.claimed_by is None and row.heartbeat_at is None
    with database.read() as other:
        deliveries = other.scalars(select(Delivery).order_by(Delivery.destination)).all()
    assert [d.destination for d in deliveries] == ["archive", "pacs"]
    for delivery in deliveries:
        assert delivery.state == DeliveryState.PENDING
        assert delivery.priority_high is True
        assert delivery.study_id == study.id
        assert delivery.attempts == 0
        assert delivery.next_attempt_at == at(120)
        assert delivery.result_folder == "results/1.2.3.4/1.2.3.4.99"


def test_finish_study_without_priority(session: Session) -> None:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61), priority=False, destinations=("pacs",))
    (delivery,) = session.scalars(select(Delivery)).all()
    assert delivery.priority_high is False


def test_instance_arriving_during_analysis_sends_study_back_to_receiving(session: Session) -> None:
    study = processing_study(session)
    outcome = record_instance(session, instance("1.2.3.4.9.9"), at(90))  # while processing
    session.commit()
    assert not outcome.reopened
    finished = finish(session, study.id, started_at=at(61))
    assert finished.state == StudyState.RECEIVING
    assert finished.analyses == 1
    assert len(session.scalars(select(Delivery)).all()) == 2  # the result is still delivered


def test_ct_instance_reopens_done_study(session: Session) -> None:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61))
    outcome = record_instance(session, instance("1.2.3.4.9.9"), at(200))
    session.commit()
    assert outcome.reopened and not outcome.new_study
    reopened = session.get(Study, study.id)
    assert reopened.state == StudyState.RECEIVING
    assert reopened.attempts == 0


def test_non_analysable_instance_does_not_reopen_done_study(session: Session) -> None:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61))
    outcome = record_instance(session, instance("1.2.3.4.9.9", analysable=False), at(200))
    session.commit()
    assert not outcome.reopened and not outcome.duplicate
    row = session.get(Study, study.id)
    assert row.state == StudyState.DONE
    assert row.instance_count == 4


def test_ct_instance_reopens_failed_study(session: Session) -> None:
    study = processing_study(session)
    fail_study(session, study.id, "w1", "no series")
    outcome = record_instance(session, instance("1.2.3.4.9.9"), at(200))
    session.commit()
    assert outcome.reopened
    row = session.get(Study, study.id)
    assert row.state == StudyState.RECEIVING
    assert row.last_error is None


def test_fail_study_fails_at_once(session: Session) -> None:
    study = processing_study(session)
    failed = fail_study(session, study.id, "w1", "no series")
    assert failed.state == StudyState.FAILED and failed.last_error == "no series"
    assert failed.claimed_by is None


def test_a_deferred_study_waits_for_its_time(session: Session) -> None:
    study = processing_study(session)  # attempts = 1
    deferred = defer_study(session, study.id, "w1", "no space left", retry_at=at(100))
    assert deferred.state == StudyState.READY and deferred.last_error == "no space left"
    assert (deferred.attempts, deferred.retries) == (0, 1)  # a failure of the disk uses up no attempt
    assert claim_next_study(session, "w1", at(99)) is None
    again = claim_next_study(session, "w1", at(100))
    assert again is not None and (again.attempts, again.retries) == (1, 1)


def test_finishing_clears_the_retry_state(session: Session) -> None:
    study = processing_study(session)
    defer_study(session, study.id, "w1", "no space left", retry_at=at(70))
    again = claim_next_study(session, "w1", at(70))
    finished = finish(session, again.id, started_at=at(70))
    assert (finished.retries, finished.retry_at, finished.last_error) == (0, None, None)


# --- re-running a study ------------------------------------------------------------


def test_reanalyse_puts_a_failed_study_back_in_the_queue(database: Database, session: Session) -> None:
    study = processing_study(session)
    defer_study(session, study.id, "w1", "no space left", retry_at=at(70))
    claim_next_study(session, "w1", at(70))
    fail_study(session, study.id, "w1", "RuntimeError: boom")
    session.commit()
    outcome = reanalyse_study(session, STUDY, at(500))
    assert (outcome.outcome, outcome.state, outcome.accession_number) == (Reanalysis.QUEUED, StudyState.FAILED,
                                                                           "ACC1")
    row = study_row(database, session, study.id)
    assert row.state == StudyState.READY and row.updated_at == at(500)
    assert (row.attempts, row.retries, row.retry_at, row.last_error) == (0, 0, None, None)
    again = claim_next_study(session, "w2", at(501))
    assert again is not None and again.id == study.id and again.attempts == 1


def test_reanalyse_keeps_the_count_of_analyses_so_new_results_are_numbered_after(session: Session) -> None:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61))
    assert reanalyse_study(session, STUDY, at(200)).outcome == Reanalysis.QUEUED
    again = claim_next_study(session, "w1", at(201))
    assert again is not None and again.analyses == 1
    assert session.get(Study, study.id, populate_existing=True).verdict == "positive"  # until the new one


def test_reanalyse_leaves_a_study_still_in_the_queue_alone(database: Database, session: Session) -> None:
    study_id = receive(session, "1.2.3.4.1.1", T0)
    assert reanalyse_study(session, STUDY, at(1)).outcome == Reanalysis.BUSY
    assert study_row(database, session, study_id).state == StudyState.RECEIVING
    mark_ready(session, 30, at(60))
    assert (reanalyse_study(session, STUDY, at(61)).state, study_row(database, session, study_id).state) == \
        (StudyState.READY, StudyState.READY)
    claimed = claim_next_study(session, "w1", at(62))
    outcome = reanalyse_study(session, STUDY, at(63))
    assert (outcome.outcome, outcome.state) == (Reanalysis.BUSY, StudyState.PROCESSING)
    row = study_row(database, session, study_id)
    assert (row.state, row.claimed_by, row.attempts) == (StudyState.PROCESSING, "w1", claimed.attempts)


def test_reanalyse_names_an_unknown_study(session: Session) -> None:
    outcome = reanalyse_study(session, "9.9.9", T0)
    assert (outcome.study_instance_uid, outcome.state, outcome.outcome) == ("9.9.9", None, Reanalysis.UNKNOWN)


def test_reanalyse_leaves_a_study_whose_instances_retention_deleted(database: Database, session: Session) -> None:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61))
    record_purge(session, study.id, at(300))
    assert reanalyse_study(session, STUDY, at(400)).outcome == Reanalysis.NOTHING_LEFT
    assert study_row(database, session, study.id).state == StudyState.DONE


def test_racing_reanalyses_queue_a_study_once(database: Database) -> None:
    with database.session() as setup:
        study = processing_study(setup)
        fail_study(setup, study.id, "w1", "no series")
        setup.commit()
    start = threading.Barrier(4)

    def reanalyse(_: int) -> Reanalysis:
        start.wait()
        with database.write() as own:
            return reanalyse_study(own, STUDY, at(500)).outcome

    with ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(reanalyse, range(4)))
    assert sorted(outcomes) == sorted([Reanalysis.QUEUED] + [Reanalysis.BUSY] * 3)


def test_failed_study_uids_lists_every_failed_study_oldest_first(session: Session) -> None:
    for n, uid in enumerate(("5.1", "5.2", "5.3")):
        ready_study(session, 1, study=uid)
        claimed = claim_next_study(session, "w1", at(61 + n))
        if uid != "5.2":
            fail_study(session, claimed.id, "w1", "no series")
        session.commit()
    assert failed_study_uids(session) == ["5.1", "5.3"]


def test_a_resent_instance_reopens_a_failed_study_only_with_reopen_failed(session: Session) -> None:
    study = processing_study(session)
    fail_study(session, study.id, "w1", "RuntimeError: boom")
    session.commit()
    first = session.scalars(select(Instance)).first()
    plain = record_instance(session, instance(first.sop_instance_uid), at(300))
    session.commit()
    assert plain.duplicate and not plain.reopened
    assert session.get(Study, study.id).state == StudyState.FAILED
    resent = record_instance(session, instance(first.sop_instance_uid), at(301), reopen_failed=True)
    session.commit()
    assert resent.duplicate and resent.reopened
    row = session.get(Study, study.id)
    assert (row.state, row.attempts, row.last_error, row.instance_count) == (StudyState.RECEIVING, 0, None, 3)


def test_reopen_failed_re_opens_a_failed_study_with_any_instance_but_never_a_done_one(session: Session) -> None:
    study = processing_study(session)
    fail_study(session, study.id, "w1", "no series")
    session.commit()
    sr = record_instance(session, instance("1.2.3.4.9.9", analysable=False), at(300), reopen_failed=True)
    session.commit()
    assert sr.reopened and session.get(Study, study.id).state == StudyState.RECEIVING
    mark_ready(session, 30, at(400))
    again = claim_next_study(session, "w1", at(401))
    finish(session, again.id, started_at=at(401))
    first = session.scalars(select(Instance)).first()
    resent = record_instance(session, instance(first.sop_instance_uid), at(500), reopen_failed=True)
    session.commit()
    assert not resent.reopened and session.get(Study, study.id).state == StudyState.DONE


# --- deliveries and notifications ----------------------------------------------------


def one_delivery(session: Session) -> int:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61), destinations=("pacs",))
    (delivery,) = session.scalars(select(Delivery)).all()
    return delivery.id


def claim(session: Session, now: dt.datetime, owner: str = "s1", **which: object) -> DueDelivery | None:
    return claim_delivery(session, owner, now, stale_seconds=STALE, **which)


def test_delivery_back_off_doubles_up_to_the_cap(database: Database, session: Session) -> None:
    delivery_id = one_delivery(session)
    now = at(1000)
    waits = []
    for _ in range(5):
        due = claim(session, now + dt.timedelta(seconds=sum(waits)))
        assert due is not None and due.id == delivery_id
        row = delivery_attempt_failed(session, delivery_id, "s1", "refused", max_attempts=8,
                                      initial_backoff=10, max_backoff=60, now=now)
        assert row.state == DeliveryState.PENDING and row.claimed_by is None
        waits.append((row.next_attempt_at - now).total_seconds())
    assert waits == [10, 20, 40, 60, 60]
    session.commit()
    with database.read() as other:
        row = other.get(Delivery, delivery_id)
        assert row.attempts == 5
        assert row.last_error == "refused"
        assert row.next_attempt_at == now + dt.timedelta(seconds=60)


def test_delivery_fails_at_max_attempts(session: Session) -> None:
    delivery_id = one_delivery(session)
    states = []
    for _ in range(3):
        assert claim(session, at(10**5)) is not None
        states.append(delivery_attempt_failed(session, delivery_id, "s1", "timeout", max_attempts=3,
                                              initial_backoff=10, max_backoff=900, now=at(1000)).state)
    assert states == [DeliveryState.PENDING, DeliveryState.PENDING, DeliveryState.FAILED]
    assert session.get(Delivery, delivery_id).attempts == 3
    assert claim(session, at(10**6)) is None


def test_a_commitment_is_resolved_once_by_its_transaction_and_keeps_the_claim_until_then(session: Session) -> None:
    delivery_id = one_delivery(session)
    assert claim(session, at(10**5)) is not None
    committing = delivery_committing(session, delivery_id, "s1", "9.9.1", at(1000))
    assert committing.state == DeliveryState.COMMITTING and committing.sent_at == at(1000)
    assert renew_delivery(session, delivery_id, "s1", at(1001))  # still the sender's while it asks
    assert claim(session, at(10**6)) is None  # awaiting its report: nobody sends it again
    assert overdue_commitments(session, at(1000)) == []
    assert [o.transaction_uid for o in overdue_commitments(session, at(1001))] == ["9.9.1"]
    settings = dict(max_attempts=3, initial_backoff=10, max_backoff=900)
    assert commitment_resolved(session, "9.9.2", None, **settings, now=at(1002)) is None  # not this transaction
    failed = commitment_resolved(session, "9.9.1", "no storage commitment", **settings, now=at(1002))
    assert (failed.state, failed.attempts, failed.next_attempt_at) == (DeliveryState.PENDING, 1, at(1012))
    assert failed.claimed_by is None and failed.committed_at is None
    # A report arriving after the timeout ended the attempt changes nothing.
    assert commitment_resolved(session, "9.9.1", None, **settings, now=at(1003)) is None
    assert claim(session, at(1012)) is not None
    delivery_committing(session, delivery_id, "s1", "9.9.3", at(1013))
    sent = commitment_resolved(session, "9.9.3", None, **settings, now=at(1014))
    assert (sent.state, sent.attempts, sent.sent_at, sent.committed_at) == (DeliveryState.SENT, 2, at(1013), at(1014))


def test_deliveries_are_claimed_by_priority_time_and_destination(session: Session) -> None:
    study_a = processing_study(session)
    finish(session, study_a.id, started_at=at(61), priority=False, destinations=("pacs",))
    ready_study(session, study="5.6.7")
    study_b = claim_next_study(session, "w1", at(61))
    finish(session, study_b.id, started_at=at(61), priority=True, destinations=("pacs", "archive"))
    assert claim(session, at(119)) is None  # not due yet
    first = claim(session, at(120), destination="pacs")
    second = claim(session, at(120), destination="pacs")
    assert [(d.study_instance_uid, d.priority_high) for d in (first, second)] == [("5.6.7", True), (STUDY, False)]
    assert claim(session, at(120), destination="pacs") is None  # both are claimed now
    archive = claim(session, at(120), other_than=["pacs"])
    assert archive.destination == "archive" and archive.result_folder == "results/1.2.3.4/1.2.3.4.99"
    sent = delivery_sent(session, first.id, "s1", at(121))
    assert sent.state == DeliveryState.SENT and sent.sent_at == at(121) and sent.attempts == 1
    assert sent.claimed_by is None


def test_a_claimed_delivery_is_taken_by_no_one_else_until_its_claim_goes_stale(database: Database) -> None:
    with database.session() as setup:
        delivery_id = one_delivery(setup)
        setup.commit()
    with database.write() as first:
        assert claim(first, at(200), owner="serve-a").id == delivery_id
    with database.write() as second:
        assert claim(second, at(200 + STALE), owner="serve-b") is None  # exactly at the limit: still held
        assert renew_delivery(second, delivery_id, "serve-a", at(300))  # serve-a renews while it sends
        assert not renew_delivery(second, delivery_id, "serve-b", at(300))
    with database.write() as second:
        assert claim(second, at(300 + STALE), owner="serve-b") is None
        taken = claim(second, at(301 + STALE), owner="serve-b")  # serve-a went silent (died mid-send)
        assert taken.id == delivery_id and taken.taken_from == "serve-a"
    with database.write() as late:  # serve-a's outcome comes too late: not recorded
        assert delivery_sent(late, delivery_id, "serve-a", at(500)) is None
        assert delivery_attempt_failed(late, delivery_id, "serve-a", "x", max_attempts=3, initial_backoff=1,
                                       max_backoff=1, now=at(500)) is None
    with database.write() as session:
        assert delivery_sent(session, delivery_id, "serve-b", at(501)).attempts == 1
    with database.read() as check:
        row = check.get(Delivery, delivery_id)
        assert (row.state, row.attempts, row.claimed_by) == (DeliveryState.SENT, 1, None)


def test_racing_senders_claim_each_delivery_exactly_once(database: Database) -> None:
    """Eight threads, each with its own transaction, as eight serve processes would."""
    with database.session() as setup:
        study = processing_study(setup)
        finish(setup, study.id, started_at=at(61), destinations=("pacs", "archive"), kinds=("sc", "sr", "kos"))
        setup.commit()
    start = threading.Barrier(8)

    def claim_all(owner: str) -> list[int]:
        start.wait()
        claimed = []
        while True:
            with database.write() as own:
                due = claim(own, at(200), owner=owner)
            if due is None:
                return claimed
            claimed.append(due.id)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(claim_all, [f"serve-{i}" for i in range(8)]))
    claimed = [delivery_id for ids in results for delivery_id in ids]
    assert sorted(claimed) == sorted(set(claimed)) and len(claimed) == 6


def test_retry_failed_deliveries_and_notifications(session: Session) -> None:
    delivery_id = one_delivery(session)
    claim(session, at(1000))
    row = delivery_attempt_failed(session, delivery_id, "s1", "x", max_attempts=1,
                                  initial_backoff=10, max_backoff=900, now=at(1000))
    study_id = session.get(Delivery, delivery_id).study_id
    queue_notifications(session, study_id, [("http://hook/a", "{}")], at(1000))
    due = claim_notification(session, "s1", at(1000), stale_seconds=STALE)
    notification_attempt_failed(session, due.id, "s1", "HTTP 500", max_attempts=1, initial_backoff=10,
                                max_backoff=900, now=at(1000))
    assert row.state == DeliveryState.FAILED
    assert retry_failed(session, at(2000)) == (1, 1)
    session.refresh(row)
    assert row.state == DeliveryState.PENDING
    assert row.attempts == 0
    assert row.next_attempt_at == at(2000)
    assert claim_notification(session, "s1", at(2000), stale_seconds=STALE).url == "http://hook/a"
    assert retry_failed(session, at(3000)) == (0, 0)


def test_one_delivery_per_destination_and_object_set(session: Session) -> None:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61), destinations=("pacs", "archive"), kinds=("sc", "sr", "kos"))
    due = []
    while (delivery := claim(session, at(120))) is not None:
        due.append(delivery)
    assert sorted((d.destination, d.kind) for d in due) == sorted(
        (name, kind) for name in ("pacs", "archive") for kind in ("sc", "sr", "kos"))
    assert {d.result_folder for d in due} == {"results/1.2.3.4/1.2.3.4.99"}


def test_notifications_are_queued_claimed_sent_and_backed_off(session: Session) -> None:
    study = processing_study(session)
    queue_notifications(session, study.id, [("http://hook/a", '{"text": "x"}'), ("http://hook/b", "{}")], at(70))
    first = claim_notification(session, "s1", at(70), stale_seconds=STALE)
    second = claim_notification(session, "s1", at(70), stale_seconds=STALE)
    assert [(n.url, n.payload, n.study_instance_uid) for n in (first, second)] == [
        ("http://hook/a", '{"text": "x"}', STUDY), ("http://hook/b", "{}", STUDY)]
    assert claim_notification(session, "s2", at(70), stale_seconds=STALE) is None
    assert notification_sent(session, first.id, "s1", at(71)).state == DeliveryState.SENT
    failed = notification_attempt_failed(session, second.id, "s1", "HTTP 500", max_attempts=3, initial_backoff=10,
                                         max_backoff=60, now=at(71))
    assert failed.state == DeliveryState.PENDING and failed.next_attempt_at == at(81)
    assert claim_notification(session, "s2", at(80), stale_seconds=STALE) is None
    assert claim_notification(session, "s2", at(81), stale_seconds=STALE).url == "http://hook/b"


def test_each_webhook_claims_only_its_own_notifications_and_a_released_one_is_due_again(session: Session) -> None:
    study = processing_study(session)
    queue_notifications(session, study.id, [("http://hook/a", "1"), ("http://hook/b", "2"), ("http://gone/c", "3")],
                        at(70))
    b = claim_notification(session, "s1", at(70), stale_seconds=STALE, url="http://hook/b")
    assert b.payload == "2" and claim_notification(session, "s1", at(70), stale_seconds=STALE,
                                                   url="http://hook/b") is None
    orphan = claim_notification(session, "s1", at(70), stale_seconds=STALE,
                                other_than=["http://hook/a", "http://hook/b"])
    assert orphan.url == "http://gone/c"
    # Stopping mid-send: the claim is given up without an attempt, and the message is due at once.
    assert not release_notification(session, b.id, "s2") and release_notification(session, b.id, "s1")
    again = claim_notification(session, "s2", at(70), stale_seconds=STALE, url="http://hook/b")
    assert again.id == b.id and again.attempts == 0 and again.taken_from is None


def test_result_folders_are_those_deliveries_and_studies_refer_to(session: Session) -> None:
    assert result_folders(session) == set()
    study = processing_study(session)
    finish(session, study.id, started_at=at(61), destinations=())
    assert result_folders(session) == {"results/1.2.3.4/1.2.3.4.99"}  # no delivery: the study's own
    ready_study(session, study="5.6.7")
    other = claim_next_study(session, "w1", at(61))
    finish_study(session, other.id, "w1", verdict="not detected", study_score=0.1, result_series_uid="5.6.7.99",
                 result_folder="results/5.6.7/5.6.7.99", priority_high=False, destinations=["pacs"],
                 kinds=["sc"], started_at=at(61), now=at(120))
    assert result_folders(session) == {"results/1.2.3.4/1.2.3.4.99", "results/5.6.7/5.6.7.99"}


def test_state_counts_lists_every_state(session: Session) -> None:
    assert state_counts(session) == (
        {"receiving": 0, "ready": 0, "processing": 0, "done": 0, "failed": 0},
        {"pending": 0, "committing": 0, "sent": 0, "failed": 0},
        {"pending": 0, "sent": 0, "failed": 0},
    )
    delivery_id = one_delivery(session)  # study 1.2.3.4 done, one pending delivery
    queue_notifications(session, session.get(Delivery, delivery_id).study_id, [("http://hook", "{}")], at(500))
    receive(session, "7.1", at(500), study="7")
    studies, deliveries, notifications = state_counts(session)
    assert studies == {"receiving": 1, "ready": 0, "processing": 0, "done": 1, "failed": 0}
    assert deliveries == {"pending": 1, "committing": 0, "sent": 0, "failed": 0}
    assert notifications == {"pending": 1, "sent": 0, "failed": 0}


def test_studies_in_progress_are_those_with_a_live_worker(session: Session) -> None:
    study = processing_study(session, "w1", claimed_at=at(61))
    assert studies_in_progress(session, 120, at(100)) == {STUDY}
    assert studies_in_progress(session, 120, at(61 + 121)) == set()  # the worker went silent
    finish(session, study.id, started_at=at(61))
    assert studies_in_progress(session, 120, at(100)) == set()


def test_a_worker_that_lost_its_study_records_nothing(database: Database, session: Session) -> None:
    study = processing_study(session, "w1", claimed_at=at(61))
    requeue_stale(session, 30, 3, at(200))  # w1 went silent; the study is ready again
    taken = claim_next_study(session, "w2", at(201))
    assert taken is not None and taken.id == study.id
    assert finish(session, study.id, started_at=at(61)) is None  # w1 finishes late
    assert fail_study(session, study.id, "w1", "late") is None
    assert defer_study(session, study.id, "w1", "late", retry_at=at(300)) is None
    row = study_row(database, session, study.id)
    assert row.state == StudyState.PROCESSING and row.claimed_by == "w2"
    with database.read() as other:
        assert other.scalars(select(Delivery)).all() == []


def test_instances_of_one_new_study_recorded_at_once_all_count(database: Database) -> None:
    """Eight associations (or serve processes) record instances of one new study at the
    same moment: one study row, every instance counted, none refused."""
    start = threading.Barrier(8)

    def record(n: int) -> int:
        start.wait()
        with database.write() as own:
            return record_instance(own, instance(f"{STUDY}.1.{n}"), T0).study_id

    with ThreadPoolExecutor(8) as pool:
        study_ids = set(pool.map(record, range(8)))
    with database.read() as check:
        (study,) = check.scalars(select(Study)).all()
        assert study_ids == {study.id} and study.instance_count == 8
        assert len(check.scalars(select(Instance)).all()) == 8


def test_a_resent_instance_does_not_reopen_a_done_study(session: Session) -> None:
    study = processing_study(session)
    finish(session, study.id, started_at=at(61))
    first = session.scalars(select(Instance)).first()
    outcome = record_instance(session, instance(first.sop_instance_uid), at(300))
    session.commit()
    assert outcome.duplicate and not outcome.reopened
    assert session.get(Study, study.id).state == StudyState.DONE


def test_a_sop_instance_uid_reused_in_another_study_is_kept_in_both(session: Session) -> None:
    """Modalities, re-imports and anonymisers reuse SOPInstanceUIDs: an instance is known by
    its study, series and SOPInstanceUID, so the second study loses nothing."""
    first = record_instance(session, instance("1.2.3.4.1.1"), T0)
    second = record_instance(session, instance("1.2.3.4.1.1", study="5.6.7"), at(1))
    session.commit()
    assert second.new_study and not second.duplicate
    assert (first.sop_uid_also_in, second.sop_uid_also_in) == (None, STUDY)
    assert session.get(Study, second.study_id).instance_count == 1
    assert len(session.scalars(select(Instance).where(Instance.sop_instance_uid == "1.2.3.4.1.1")).all()) == 2


def test_the_same_sop_instance_uid_in_another_series_of_a_study_is_a_new_instance(session: Session) -> None:
    record_instance(session, instance("1.2.3.4.1.1"), T0)
    other = record_instance(session, instance("1.2.3.4.1.1", series="1.2.3.4.2"), at(1))
    session.commit()
    assert not other.duplicate and other.sop_uid_also_in is None
    assert session.get(Study, other.study_id).instance_count == 2
