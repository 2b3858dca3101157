"""storage.db.Database: who may create a database, a vanished file, schema versions, and
reads that never take the write lock. Real SQLite files."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from node.config import parse_config
from node.service import open_database
from storage.db import SCHEMA_VERSION, Database, Study
from storage.errors import DatabaseMissing, StorageError
from storage.store import InstanceStore


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


def test_another_schema_version_is_refused_with_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    Database(f"sqlite:///{path}", create=True).dispose()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE ichnode_schema SET version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(StorageError, match=rf"schema {SCHEMA_VERSION + 1}, this ichnode uses schema "
                                           rf"{SCHEMA_VERSION} and has no migration for it: stop the node, move"):
        Database(f"sqlite:///{path}")


def test_a_database_of_the_first_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "node.db"
    with sqlite3.connect(path) as raw:  # tables, but no schema version: made before versions existed
        raw.execute("CREATE TABLE studies (id INTEGER PRIMARY KEY)")
    with pytest.raises(StorageError, match="holds tables of schema 1"):
        Database(f"sqlite:///{path}")


def test_a_reader_never_takes_the_write_lock(tmp_path: Path) -> None:
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    with database.read() as session:
        session.query(Study).count()
        with sqlite3.connect(tmp_path / "node.db", timeout=0.5) as other:
            other.execute("BEGIN IMMEDIATE")  # would time out if the reader held the lock
            other.rollback()


def test_database_failures_reach_the_caller_as_storage_errors(tmp_path: Path) -> None:
    """Nothing above storage/ handles SQLAlchemy's exceptions: a constraint that fails is a
    StorageError that retrying cannot help."""
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    with pytest.raises(StorageError) as raised:
        with database.write() as session:
            session.execute(Study.__table__.insert().values(id=1))  # missing NOT NULL columns
    assert not raised.value.retryable
