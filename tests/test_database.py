"""storage.db.Database: who may create a database, a vanished file, schemas it refuses,
processes that start together, reads that never take the write lock, and what an
unreachable or unsupported database says. Real SQLite files and a real PostgreSQL cluster."""

from __future__ import annotations

import sqlite3
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import text

from demo.peers import PostgresCluster, free_port
from node.config import parse_config
from node.errors import ConfigError
from node.service import check_storage_root, open_database
from storage.db import Database, Study
from storage.errors import DatabaseMissing, StorageError
from storage.schema import head
from storage.store import MARKER_FILE, InstanceStore
from tests.conftest import BACKENDS, new_postgres_database


def test_only_a_creating_open_makes_the_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'node.db'}"
    with pytest.raises(DatabaseMissing, match=f"database {tmp_path / 'node.db'} does not exist"):
        Database(url)
    assert not (tmp_path / "node.db").exists()
    created = Database(url, create=True)
    assert created.created and (tmp_path / "node.db").stat().st_mode & 0o777 == 0o600
    assert not Database(url).created


def test_a_new_database_on_a_store_with_instances_is_refused(tmp_path: Path) -> None:
    config = parse_config({"storage": {"root": "store", "database_url": "sqlite:///node.db"}}, tmp_path)
    store = InstanceStore(config.storage.root)
    store.write(Path("instances/1.2/1.2.3/1.2.3.4.dcm"), b"DICM")
    with pytest.raises(DatabaseMissing, match="already holds received instances, so this is not a first start"):
        open_database(config, store)
    assert not (tmp_path / "node.db").exists()


def test_a_first_start_creates_the_database(tmp_path: Path) -> None:
    config = parse_config({"storage": {"root": "store", "database_url": "sqlite:///node.db"}}, tmp_path)
    store = InstanceStore(config.storage.root)
    store.ensure()
    assert open_database(config, store).created


def test_a_deleted_or_replaced_file_is_noticed(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    database = Database(f"sqlite:///{path}", create=True)
    with database.write() as session:
        assert session.query(Study).count() == 0
    for name in ("node.db", "node.db-wal", "node.db-shm"):
        (tmp_path / name).unlink(missing_ok=True)
    with pytest.raises(DatabaseMissing, match="was deleted or replaced while the node ran"):
        with database.write():
            pass
    assert not path.exists()
    Database(f"sqlite:///{path}", create=True)  # a new file at the same path: still not the one opened
    with pytest.raises(DatabaseMissing):
        with database.read():
            pass


def test_a_schema_revision_this_release_does_not_know_is_refused(database_url: str) -> None:
    Database(database_url, create=True).dispose()
    database = Database(database_url)
    with database.write() as session:  # as a newer release would leave it
        session.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    database.dispose()
    for upgrade in (False, True):
        with pytest.raises(StorageError, match=rf"holds schema revision 9999, which this ichnode does not know "
                                               rf"\(its newest is {head()}\): a newer ichnode upgraded it"):
            Database(database_url, upgrade=upgrade)


@pytest.mark.parametrize("backend", BACKENDS)
def test_processes_starting_together_create_the_schema_once(backend: str, tmp_path: Path,
                                                            request: pytest.FixtureRequest) -> None:
    """Four processes of a node (here threads, each with its own Database) start at once
    on a database that is not there yet (SQLite) or empty (PostgreSQL)."""
    url = (f"sqlite:///{tmp_path / 'node.db'}" if backend == "sqlite"
           else new_postgres_database(request.getfixturevalue("postgres")))
    start = threading.Barrier(4)

    def open_one(_: int) -> bool:
        start.wait()
        database = Database(url, create=True)
        with database.read() as session:
            session.query(Study).count()
        database.dispose()
        return database.created

    with ThreadPoolExecutor(4) as pool:
        created = list(pool.map(open_one, range(4)))
    assert sorted(created) == [False, False, False, True]
    assert Database(url).revision == head()


def test_a_database_of_the_first_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    with sqlite3.connect(path) as raw:  # tables, but no schema version: made before versions existed
        raw.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY)")
    with pytest.raises(StorageError, match="holds tables of schema 1, or tables that are not ichnode's "
                                           r"\(studies\): point storage.database_url at ichnode's own database"):
        Database(f"sqlite:///{path}", create=True, upgrade=True)


def test_a_reader_never_takes_the_write_lock(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    with database.read() as session:
        session.query(Study).count()
        with sqlite3.connect(tmp_path / "node.db", timeout=0.5) as other:
            other.execute("BEGIN IMMEDIATE")  # would time out if the reader held the lock
            other.rollback()


def test_database_failures_reach_the_caller_as_storage_errors(database_url: str) -> None:
    """Nothing above storage/ handles SQLAlchemy's exceptions: a constraint that fails is a
    StorageError that retrying cannot help."""
    database = Database(database_url, create=True)
    with pytest.raises(StorageError) as raised:
        with database.write() as session:
            session.execute(Study.__table__.insert().values(id=1))  # missing NOT NULL columns
    assert not raised.value.retryable


def test_an_empty_postgresql_database_is_created_only_when_asked(postgres: PostgresCluster) -> None:
    url = new_postgres_database(postgres)
    with pytest.raises(DatabaseMissing, match=r"has no ichnode tables; `ichnode serve` creates them on first start"):
        Database(url)
    database = Database(url, create=True)
    assert database.created and database.revision == head()
    assert database.clock_offset_seconds() == pytest.approx(0, abs=1)  # the server runs on this host


def test_a_postgresql_database_that_does_not_exist_or_cannot_be_reached_is_named(postgres: PostgresCluster) -> None:
    with pytest.raises(StorageError, match=r'cannot open the database postgresql\+psycopg://ich@127.0.0.1:\d+/absent: '
                                           r'.*database "absent" does not exist'):
        Database(postgres.url("absent"), create=True)
    nobody = f"postgresql+psycopg://ich:secret@127.0.0.1:{free_port()}/ich"
    with pytest.raises(StorageError, match=r"cannot open the database postgresql\+psycopg://ich:\*\*\*@127.0.0.1") as raised:
        Database(nobody, create=True)
    assert "secret" not in str(raised.value) and "Connection refused" in str(raised.value)


def test_postgresql_urls_use_psycopg_and_other_backends_are_refused(postgres: PostgresCluster,
                                                                   postgres_template: str) -> None:
    plain = new_postgres_database(postgres, postgres_template).replace("postgresql+psycopg://", "postgresql://")
    assert Database(plain).url.drivername == "postgresql"  # psycopg 3, though the URL names no driver
    for url in ("postgresql+psycopg2://ich@127.0.0.1/ich", "mysql+pymysql://ich@127.0.0.1/ich"):
        with pytest.raises(StorageError, match=r"ichnode runs on SQLite \(sqlite:///PATH\) or PostgreSQL through "
                                               r"psycopg 3 \(postgresql\+psycopg://USER@HOST/DB\)") as raised:
            Database(url)
        assert not raised.value.retryable


def test_a_storage_root_that_is_not_the_databases_folder_is_refused(database_url: str, tmp_path: Path) -> None:
    """The first process marks its folder; a process whose storage.root is another folder
    (an empty mount point, another host's disk) is refused before it claims any work."""
    database = Database(database_url, create=True)
    shared = InstanceStore(tmp_path / "shared")
    check_storage_root(database, shared)
    marker = (tmp_path / "shared" / MARKER_FILE).read_text().strip()
    check_storage_root(Database(database_url), InstanceStore(tmp_path / "shared"))  # the same folder again
    with pytest.raises(ConfigError, match=r"storage.root .*empty-mount.* has no marker"):
        check_storage_root(Database(database_url), InstanceStore(tmp_path / "empty-mount"), wait_seconds=0.5)
    other = InstanceStore(tmp_path / "other")
    other.write_marker("f" * 32)
    with pytest.raises(ConfigError, match=f"holds marker f{{32}} .*expects {marker}"):
        check_storage_root(Database(database_url), other, wait_seconds=0.5)


def test_processes_starting_together_on_one_folder_agree_on_its_marker(database_url: str, tmp_path: Path) -> None:
    Database(database_url, create=True)
    with ThreadPoolExecutor(4) as pool:
        for done in [pool.submit(check_storage_root, Database(database_url), InstanceStore(tmp_path / "shared"))
                     for _ in range(4)]:
            done.result()  # none refused
