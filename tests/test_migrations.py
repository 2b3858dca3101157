"""Schema migrations (Alembic, storage/migrations/): a database of the last release before
migrations upgrades with nothing lost, on SQLite and on PostgreSQL.

The old databases are real ones: tests/data/schema3-sqlite.sql and schema3-postgresql.sql
are dumps of databases that the schema-3 code of this repository (storage/ at commit
198c332, before migrations) created and filled through its own state functions; each
file's header says how. Nothing here re-creates them from today's models."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.engine import Connection, Engine

import storage
from demo.peers import PostgresCluster
from node.config import parse_config
from node.service import open_database, upgrade_database
from storage.db import Base, Database, utcnow
from storage.errors import StorageError
from storage.schema import BASELINE, head
from storage.state import claim_delivery, claim_next_study, mark_ready, requeue_stale
from storage.store import InstanceStore
from tests.conftest import BACKENDS, new_postgres_database

DATA = Path(__file__).parent / "data"
QUEUE_TABLES = ("studies", "instances", "deliveries", "notifications")
SCHEMA_3_TABLES = (*QUEUE_TABLES, "ichnode_schema")
NEW_COLUMNS = {"deliveries": {"claimed_by", "heartbeat_at", "transaction_uid", "committed_at"},
               "notifications": {"claimed_by", "heartbeat_at"}, "studies": {"held_until"}}
# Added text columns that are empty (not NULL) in rows from before them.
NEW_TEXT_COLUMNS = {"studies": {"study_date", "modality", "study_description"}}


def _schema_3_database(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """A database loaded from the dump of a real schema-3 database; its URL."""
    if backend == "sqlite":
        path = tmp_path / "node.db"
        with sqlite3.connect(path) as connection:
            connection.executescript((DATA / "schema3-sqlite.sql").read_text())
        return f"sqlite:///{path}"
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    url = new_postgres_database(cluster)
    cluster.load(url.rsplit("/", 1)[1], DATA / "schema3-postgresql.sql")
    return url


def _engine(url: str) -> Engine:
    """A plain engine: these tests look at the tables as they are, around Database."""
    return create_engine(url)


def _rows(connection: Connection) -> dict[str, list[dict]]:
    """Every row of the schema-3 tables."""
    return {table: [dict(row._mapping) for row in connection.execute(text(f"SELECT * FROM {table} ORDER BY 1"))]
            for table in SCHEMA_3_TABLES}


def _shape(connection: Connection, tables: tuple[str, ...]) -> dict:
    """Tables as the database describes them: columns (type, nullability), keys, indexes."""
    found = inspect(connection)
    return {table: {
        "columns": [(c["name"], str(c["type"]), c["nullable"]) for c in found.get_columns(table)],
        "primary_key": found.get_pk_constraint(table)["constrained_columns"],
        "foreign_keys": sorted((tuple(k["constrained_columns"]), k["referred_table"]) for k in found.get_foreign_keys(table)),
        "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"])) for i in found.get_indexes(table)),
        "unique": sorted(tuple(u["column_names"]) for u in found.get_unique_constraints(table)),
    } for table in tables}


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_first_revision_is_exactly_the_schema_of_the_last_release_before_migrations(
        backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    old = _schema_3_database(backend, tmp_path, request)
    fresh = (f"sqlite:///{tmp_path / 'fresh.db'}" if backend == "sqlite"
             else new_postgres_database(request.getfixturevalue("postgres")))
    config = AlembicConfig()
    config.set_main_option("script_location", str(Path(storage.__file__).parent / "migrations"))
    with _engine(fresh).begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, BASELINE)
    with _engine(old).connect() as before, _engine(fresh).connect() as baseline:
        assert _shape(baseline, SCHEMA_3_TABLES) == _shape(before, SCHEMA_3_TABLES)
        assert baseline.execute(text("SELECT version FROM ichnode_schema")).scalar() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_schema_3_database_upgrades_with_nothing_lost(backend: str, tmp_path: Path,
                                                        request: pytest.FixtureRequest) -> None:
    url = _schema_3_database(backend, tmp_path, request)
    with _engine(url).connect() as connection:
        before = _rows(connection)
    assert len(before["studies"]) == 6 and len(before["instances"]) == 8 and len(before["deliveries"]) == 3

    # A node that may not upgrade refuses to start, naming the command.
    config_file = tmp_path / "node.toml"
    config_file.write_text(f'[storage]\nroot = "{tmp_path / "store"}"\ndatabase_url = "{url}"\nauto_upgrade = false\n')
    config = parse_config({"storage": {"root": str(tmp_path / "store"), "database_url": url,
                                       "auto_upgrade": False}}, tmp_path)
    with pytest.raises(StorageError, match=r"holds schema 3 \(from before migrations\); this ichnode needs revision "
                                           rf"{head()}: stop every node .* run `ichnode db upgrade`"):
        open_database(config, InstanceStore(config.storage.root))

    cli = [sys.executable, "-m", "node.cli", "db", "upgrade", "--config", str(config_file)]
    upgraded = subprocess.run(cli, capture_output=True, text=True, timeout=120)
    assert upgraded.returncode == 0, upgraded.stderr
    assert f"from schema 3 (from before migrations) to schema revision {head()}" in upgraded.stdout
    again = upgrade_database(config)
    assert again.upgraded_from is None and not again.created and again.revision == head()
    again.dispose()

    with _engine(url).connect() as connection:
        after = _rows(connection)
        assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
    for table in QUEUE_TABLES:
        rows = before[table]
        added = NEW_COLUMNS.get(table, set()) | NEW_TEXT_COLUMNS.get(table, set())
        kept = [{k: v for k, v in row.items() if k not in added} for row in after[table]]
        assert kept == rows, table  # every row, every value
        assert all(row[c] is None for row in after[table] for c in NEW_COLUMNS.get(table, ()))
        assert all(row[c] == "" for row in after[table] for c in NEW_TEXT_COLUMNS.get(table, ()))
    assert after["ichnode_schema"] == [{"version": 4}]  # the releases before migrations now refuse it

    # Today's code carries on with yesterday's rows.
    database = Database(url)
    with database.write() as session:
        delivery = claim_delivery(session, "serve-a", utcnow(), stale_seconds=120)
        assert (delivery.kind, delivery.attempts, delivery.study_instance_uid) == ("sr", 1, "1.1")
        assert claim_delivery(session, "serve-a", utcnow(), stale_seconds=120) is None  # sc sent, kos failed
        stale = requeue_stale(session, 120, 3, utcnow())  # its worker's heartbeat is from the old release's day
        assert [s.study_instance_uid for s in stale] == ["1.3"]
        assert [s.study_instance_uid for s in mark_ready(session, 30, utcnow())] == ["1.6"]
        claimed = claim_next_study(session, "worker-b", utcnow())
        assert claimed.study_instance_uid in {"1.3", "1.5", "1.6"} and claimed.instance_paths


def test_an_older_schema_is_upgraded_at_start_up_unless_told_not_to(tmp_path: Path,
                                                                    request: pytest.FixtureRequest) -> None:
    url = _schema_3_database("sqlite", tmp_path, request)
    config = parse_config({"storage": {"root": str(tmp_path / "store"), "database_url": url}}, tmp_path)
    assert config.storage.auto_upgrade  # the default: one host, nothing to coordinate
    with pytest.raises(StorageError, match="run `ichnode db upgrade`"):
        Database(url)  # `ichnode status` and the web pages never upgrade
    database = open_database(config, InstanceStore(config.storage.root))
    assert database.upgraded_from == "schema 3 (from before migrations)" and database.revision == head()
