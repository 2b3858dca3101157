"""storage.store: result series are staged, published once recorded, and what a crash
between writing and recording leaves behind is recovered at start-up."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from node.worker import recover_results
from storage.db import Database, Delivery, DeliveryState, Study, StudyState
from storage.store import InstanceStore

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


def test_recovery_publishes_recorded_results_and_deletes_the_rest(tmp_path: Path) -> None:
    store = _store(tmp_path)
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    recorded, orphan = store.result_folder(STUDY, "1.2.3.8"), store.result_folder(STUDY, "1.2.3.9")
    store.write_result(recorded, {"0001.dcm": b"a"})
    store.write_result(orphan, {"0001.dcm": b"b"})
    now = dt.datetime(2026, 1, 1)
    with database.write() as session:
        study = Study(study_instance_uid=STUDY, state=StudyState.DONE, first_received_at=now, last_received_at=now)
        session.add(study)
        session.flush()
        session.add(Delivery(study_id=study.id, destination="pacs", kind="sc", result_folder=str(recorded),
                             state=DeliveryState.PENDING, next_attempt_at=now))
    recover_results(database, store, stale_after_seconds=0)
    assert (store.absolute(recorded) / "0001.dcm").read_bytes() == b"a"
    assert not store.absolute(orphan).exists()
    assert store.unpublished_results(older_than_seconds=0) == []
