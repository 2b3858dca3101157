"""Retention: received instances of delivered studies are deleted after retention_days,
once, however many serve processes run it at the same time (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from node.config import parse_config
from node.service import purge_delivered
from node.triagelog import TriageLog, read_events
from storage.db import Database, Delivery, DeliveryState, Instance, Study, StudyState, utcnow
from storage.store import InstanceStore


def _study(session, store: InstanceStore, uid: str, *, finished_days_ago: float,
           delivery: DeliveryState | None) -> list[Path]:
    when = utcnow() - dt.timedelta(days=finished_days_ago)
    study = Study(study_instance_uid=uid, accession_number=f"A{uid[-1]}", state=StudyState.DONE,
                  first_received_at=when, last_received_at=when, updated_at=when)
    session.add(study)
    session.flush()
    paths = []
    for n in range(3):
        relative = store.instance_path(uid, f"{uid}.1", f"{uid}.1.{n}")
        store.write(relative, b"DICM" * 10)
        paths.append(store.absolute(relative))
        session.add(Instance(sop_instance_uid=f"{uid}.1.{n}", study_id=study.id, series_instance_uid=f"{uid}.1",
                             sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax_uid="1.2.840.10008.1.2.1",
                             path=str(relative), size=40, received_at=when))
    if delivery is not None:
        session.add(Delivery(study_id=study.id, destination="pacs", kind="sc", result_folder="results/x", state=delivery,
                             next_attempt_at=when, sent_at=when if delivery == DeliveryState.SENT else None))
    session.commit()
    return paths


def test_only_old_fully_delivered_studies_are_purged(tmp_path: Path, database_url: str) -> None:
    config = parse_config({"storage": {"retention_days": 1.0}}, tmp_path)
    store = InstanceStore(tmp_path / "store")
    store.ensure()
    database = Database(database_url, create=True)
    log = TriageLog(tmp_path / "triage.log")
    with database.session() as session:
        old = _study(session, store, "1.2.1", finished_days_ago=2, delivery=DeliveryState.SENT)
        recent = _study(session, store, "1.2.2", finished_days_ago=0.5, delivery=DeliveryState.SENT)
        pending = _study(session, store, "1.2.3", finished_days_ago=2, delivery=DeliveryState.PENDING)
        failed = _study(session, store, "1.2.4", finished_days_ago=2, delivery=DeliveryState.FAILED)
    assert purge_delivered(config, database, store, log) == 1
    assert not any(p.exists() for p in old)
    assert not (store.root / "instances" / "1.2.1").exists()  # empty folders go too
    assert all(p.exists() for p in recent + pending + failed)
    with database.read() as session:
        purged = session.query(Study).filter_by(study_instance_uid="1.2.1").one()
        assert purged.purged_at is not None and purged.state == StudyState.DONE
        assert session.query(Instance).filter_by(study_id=purged.id).count() == 0
        assert session.query(Instance).count() == 9
    events = read_events(tmp_path / "triage.log")
    assert [(e["event"], e["study_instance_uid"], e["instances"]) for e in events] == [("purged", "1.2.1", 3)]
    assert purge_delivered(config, database, store, log) == 0  # nothing twice


def test_serve_processes_purging_at_once_purge_each_study_once(tmp_path: Path, database_url: str) -> None:
    config = parse_config({"storage": {"retention_days": 1.0}}, tmp_path)
    store = InstanceStore(tmp_path / "store")
    store.ensure()
    log = TriageLog(tmp_path / "triage.log")
    with Database(database_url, create=True).session() as session:
        files = [p for n in range(6) for p in _study(session, store, f"1.3.{n}", finished_days_ago=2,
                                                      delivery=DeliveryState.SENT)]
    start = threading.Barrier(3)

    def one_process(_: int) -> int:
        database = Database(database_url)  # each with its own connections, as three processes
        start.wait()
        return purge_delivered(config, database, store, log)

    with ThreadPoolExecutor(3) as pool:
        assert sum(pool.map(one_process, range(3))) == 6
    assert not any(p.exists() for p in files)
    events = [e["study_instance_uid"] for e in read_events(tmp_path / "triage.log") if e["event"] == "purged"]
    assert sorted(events) == [f"1.3.{n}" for n in range(6)]
