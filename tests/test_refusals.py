"""After refusals, a study with a refused instance waits a whole quiet time for its re-send.

Each cause is real: a disk and a file system out of inodes are tmpfs mounts filled up,
the free-space guard is storage.min_free_mb, and the database is a PostgreSQL cluster of
the test's own, stopped and started. The study's last stored instance is dated an hour
back, as after a long refusal window: without its hold it would go ready the moment the
refusals end, half-received.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from sqlalchemy import update

from demo.peers import PostgresCluster
from node.ingest import Ingest, Status
from node.triagelog import TriageLog
from storage.db import Database, Study, utcnow
from storage.errors import StorageError
from storage.state import mark_ready
from storage.store import InstanceStore
from tests.peers import tmpfs

STABLE = dt.timedelta(seconds=30)  # completion.stable_seconds; nothing here waits for it
CAUSES = ["disk full", "inodes full", "free-space guard", "database away"]


@dataclass
class Refusing:
    """An Ingest on real storage and a real database, and how to start and end `cause`."""

    cause: str
    ingest: Ingest
    database: Database
    start: Callable[[], None]
    end: Callable[[], None]


def _instance(study_uid: str) -> tuple[pydicom.Dataset, bytes]:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.StudyInstanceUID, ds.SOPInstanceUID = study_uid, generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return ds, buffer.getvalue()


def _receive(ingest: Ingest, study_uid: str, association: object | None = None) -> int:
    ds, encoded = _instance(study_uid)
    return ingest.receive(ds, encoded, calling_aet="SCANNER", transfer_syntax_uid=ds.file_meta.TransferSyntaxUID,
                          association=association)


def _ready(database: Database, at: dt.datetime) -> list[str]:
    """The studies the completion check marks ready at `at`."""
    with database.write() as session:
        return sorted(study.study_instance_uid for study in mark_ready(session, STABLE.total_seconds(), at))


class _Filler:
    """Fills a file system: one file to the last byte, or empty files to the last inode."""

    def __init__(self, folder: Path, *, inodes: bool) -> None:
        self.folder, self.inodes, self.made = folder, inodes, []

    def start(self) -> None:
        with contextlib.suppress(OSError):
            if self.inodes:
                while True:
                    self.made.append(self.folder / f"filler-{len(self.made)}")
                    self.made[-1].touch()
            self.made.append(self.folder / "filler")
            with self.made[-1].open("wb") as handle:
                while True:
                    handle.write(b"\0" * 4096)
                    handle.flush()

    def end(self) -> None:
        for path in self.made:
            path.unlink(missing_ok=True)


@pytest.fixture(params=CAUSES)
def refusing(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Refusing]:
    cause = request.param
    with contextlib.ExitStack() as stack:
        root = tmp_path / "store"
        if cause in ("disk full", "inodes full"):
            stack.enter_context(tmpfs(root, "size=4m,nr_inodes=400"))
        store = InstanceStore(root)
        store.ensure()
        url = f"sqlite:///{tmp_path / 'node.db'}"
        if cause == "database away":
            cluster = stack.enter_context(PostgresCluster(durable=False))
            url = cluster.create_database("node")
        database = Database(url, create=True)
        stack.callback(database.dispose)
        ingest = Ingest(store, database, TriageLog(tmp_path / "triage.log"),
                        stable_seconds=STABLE.total_seconds())
        if cause in ("disk full", "inodes full"):
            filler = _Filler(root, inodes=cause == "inodes full")
            start, end = filler.start, filler.end
        elif cause == "free-space guard":
            start = lambda: setattr(ingest, "min_free_mb", store.free_mb() + 10**9)
            end = lambda: setattr(ingest, "min_free_mb", 0.0)
        else:
            start, end = cluster.stop, cluster.start
        yield Refusing(cause, ingest, database, start, end)


def _an_hour_later(database: Database) -> None:
    """As if the refusals had lasted an hour: nothing stored since, the holds of then run out."""
    with database.write() as session:
        session.execute(update(Study).values(last_received_at=utcnow() - dt.timedelta(hours=1)))
        session.execute(update(Study).where(Study.held_until.is_not(None))
                        .values(held_until=utcnow() - dt.timedelta(minutes=1)))


def test_a_study_with_a_refused_instance_waits_a_whole_quiet_time_after_the_refusals(refusing: Refusing) -> None:
    ingest, database = refusing.ingest, refusing.database
    refused, whole, association = generate_uid(), generate_uid(), object()
    assert _receive(ingest, refused, association) == Status.SUCCESS
    assert _receive(ingest, whole) == Status.SUCCESS

    refusing.start()
    assert _receive(ingest, refused, association) == Status.OUT_OF_RESOURCES
    ingest.association_ended(association)  # the sender gave up on this association: it will send again
    if refusing.cause != "database away":
        _an_hour_later(database)
        ingest.renew_holds()  # every check interval while the refusals last
        assert _ready(database, utcnow()) == [whole]  # the study that lost nothing goes on
    with contextlib.suppress(StorageError):  # with the database away, the holds wait for it
        ingest.renew_holds()
    refusing.end()
    if refusing.cause == "database away":
        _an_hour_later(database)

    ended = utcnow()
    ingest.renew_holds()  # the completion job's first step
    assert refused not in _ready(database, ended)
    assert refused not in _ready(database, ended + STABLE - dt.timedelta(seconds=1))
    assert _ready(database, ended + STABLE + dt.timedelta(seconds=5)) == [refused]


def test_while_the_refusals_last_the_study_stays_held(tmp_path: Path) -> None:
    """A window longer than the quiet time: each renewal (every check interval) holds the
    study again, so it is never ready while stores are still refused."""
    store = InstanceStore(tmp_path / "store")
    store.ensure()
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    ingest = Ingest(store, database, TriageLog(tmp_path / "triage.log"), stable_seconds=STABLE.total_seconds())
    study = generate_uid()
    assert _receive(ingest, study) == Status.SUCCESS
    ingest.min_free_mb = store.free_mb() + 10**9
    assert _receive(ingest, study) == Status.OUT_OF_RESOURCES
    for _ in range(3):
        with database.write() as session:  # an hour on: quiet since, and the last hold run out
            session.execute(update(Study).values(last_received_at=utcnow() - dt.timedelta(hours=1),
                                                 held_until=utcnow() - dt.timedelta(minutes=1)))
        ingest.renew_holds()
        assert _ready(database, utcnow() + STABLE - dt.timedelta(seconds=1)) == []
    ingest.min_free_mb = 0.0
    ingest.renew_holds()
    assert _ready(database, utcnow() + STABLE + dt.timedelta(seconds=5)) == [study]
    database.dispose()
