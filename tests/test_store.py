"""storage.store: result series are staged, published once recorded, and what a crash
between writing and recording leaves behind is recovered at start-up, without touching
what a live worker of another process is writing (SQLite and PostgreSQL)."""

from __future__ import annotations

import datetime as dt
import os
import time
from pathlib import Path

import pytest

from node.health import Readiness
from node.worker import recover_results
from storage.db import Database, Delivery, DeliveryState, Study, StudyState, utcnow
from storage.errors import StorageFull
from storage.store import InstanceStore
from tests.peers import tmpfs

STUDY = "1.2.3"


def _store(tmp_path: Path) -> InstanceStore:
    store = InstanceStore(tmp_path / "store")
    store.ensure()
    return store


def test_a_result_is_invisible_until_published(tmp_path: Path) -> None:
    store = _store(tmp_path)
    folder = store.result_folder(STUDY, "1.2.3.9")
    store.write_result(folder, {"0001.dcm": b"a", "0002.dcm": b"b"})
    assert not store.absolute(folder).exists()
    assert store.unpublished_results(older_than_seconds=0) == [folder]
    store.publish_result(folder)
    assert sorted(p.name for p in store.absolute(folder).iterdir()) == ["0001.dcm", "0002.dcm"]
    assert store.unpublished_results(older_than_seconds=0) == []
    store.publish_result(folder)  # publishing twice is harmless
    assert store.absolute(folder).is_dir()


def test_a_fresh_partial_result_is_left_to_the_worker_writing_it(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.write_result(store.result_folder(STUDY, "1.2.3.9"), {"0001.dcm": b"a"})
    assert store.unpublished_results(older_than_seconds=3600) == []


def test_recovery_publishes_recorded_results_and_deletes_the_rest(tmp_path: Path, database_url: str) -> None:
    store = _store(tmp_path)
    database = Database(database_url, create=True)
    recorded, orphan = store.result_folder(STUDY, "1.2.3.8"), store.result_folder(STUDY, "1.2.3.9")
    live = store.result_folder("1.2.4", "1.2.4.9")  # another process's worker is writing it
    for folder in (recorded, orphan, live):
        store.write_result(folder, {"0001.dcm": b"a"})
        staging = store.absolute(folder).with_name(folder.name + ".partial")
        os.utime(staging, (time.time() - 600, time.time() - 600))  # untouched for 10 minutes
    now = utcnow()
    with database.write() as session:
        study = Study(study_instance_uid=STUDY, state=StudyState.DONE, first_received_at=now, last_received_at=now)
        busy = Study(study_instance_uid="1.2.4", state=StudyState.PROCESSING, first_received_at=now,
                     last_received_at=now, claimed_by="gpu-host:77:abcdef", heartbeat_at=now)
        session.add_all([study, busy])
        session.flush()
        session.add(Delivery(study_id=study.id, destination="pacs", kind="sc", result_folder=str(recorded),
                             state=DeliveryState.PENDING, next_attempt_at=now))
    recover_results(database, store, stale_after_seconds=120)
    assert (store.absolute(recorded) / "0001.dcm").read_bytes() == b"a"
    assert not store.absolute(orphan).exists()
    assert store.unpublished_results(older_than_seconds=0) == [live]
    with database.write() as session:  # that worker died: its folder is a leftover now
        session.query(Study).filter_by(study_instance_uid="1.2.4").update(
            {Study.heartbeat_at: now - dt.timedelta(seconds=600)})
    recover_results(database, store, stale_after_seconds=120)
    assert store.unpublished_results(older_than_seconds=0) == []



def test_a_file_system_out_of_inodes_is_reported_as_such(tmp_path: Path) -> None:
    """A real tmpfs with 40 inodes: stores fail with "no free inodes", and /readyz's storage
    check names the inodes while bytes are still free."""
    with tmpfs(tmp_path / "store", "size=8m,nr_inodes=40") as mount:
        store = InstanceStore(mount)
        with pytest.raises(StorageFull, match="no free inodes"):
            for number in range(100):
                store.write(Path("instances") / f"{number}.dcm", b"x")
        assert store.free_mb() > 1 and store.free_inodes() == 0
        readiness = Readiness(database=None, store=store, min_free_mb=0, model_loaded=True,  # type: ignore[arg-type]
                              model_configured=True, scheduler_running=lambda: True, worker=None,
                              worker_stale_seconds=60)
        storage = readiness._storage()  # the database check is not what this test is about
        assert not storage.ok and "no free inodes" in storage.detail
