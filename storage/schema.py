"""Which schema a database holds, and bringing it to the one this code uses (Alembic).

The revisions live in `storage/migrations/versions/`. `prepare` runs on one connection
inside one transaction that holds the schema lock (SQLite: the write lock of BEGIN
IMMEDIATE; PostgreSQL: an advisory lock), so any number of processes starting together
check, create or upgrade the schema one after the other, and each sees the result of the
one before. A database made by the releases before migrations (table `ichnode_schema`,
version 3) is recognised and stamped with the first revision, which is exactly its
schema, then upgraded like any other.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection

from storage.errors import DatabaseMissing, StorageError

__all__ = ["SchemaState", "BASELINE", "head", "prepare", "lock_schema"]

_MIGRATIONS = Path(__file__).parent / "migrations"
BASELINE = "0001"  # the schema of the releases before migrations (ichnode_schema.version = 3)
_LEGACY_VERSION = 3
_LEGACY = f"schema {_LEGACY_VERSION} (from before migrations)"
# pg_advisory_xact_lock key of the schema check ("ichnode" in ASCII).
_SCHEMA_LOCK = 0x6963686E6F6465


def _alembic_config(connection: Connection | None = None) -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(_MIGRATIONS))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@functools.cache
def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(_alembic_config())


def head() -> str:
    """The newest revision: the schema this code uses."""
    return _scripts().get_current_head()


@dataclass(frozen=True)
class SchemaState:
    """What `prepare` found and did."""

    revision: str  # the revision the database holds now: head()
    created: bool = False  # the tables were made just now
    upgraded_from: str | None = None  # what it held before an upgrade, in words


def lock_schema(connection: Connection) -> None:
    """Hold the schema lock until the connection's transaction ends (SQLite holds its
    write lock from BEGIN IMMEDIATE already)."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK})


def _current(connection: Connection, shown: str) -> str | None:
    """The revision the database holds, _LEGACY for one of the releases before
    migrations, None when it is empty; StorageError for tables of no known schema."""
    tables = set(inspect(connection).get_table_names())
    if "alembic_version" in tables:
        return MigrationContext.configure(connection).get_current_revision()
    if "ichnode_schema" in tables:
        version = connection.execute(text("SELECT version FROM ichnode_schema")).scalar()
        if version == _LEGACY_VERSION:
            return _LEGACY
        raise StorageError(
            f"database {shown} holds tables of schema {version}, from a release older than any migration "
            f"starts from ({_LEGACY}): stop the node, move the database aside (and storage.root with it) and "
            "start again, then re-send the studies you need", retryable=False)
    if tables:
        raise StorageError(
            f"database {shown} holds tables of schema 1, or tables that are not ichnode's "
            f"({', '.join(sorted(tables))}): point storage.database_url at ichnode's own database, or move this "
            "one aside (and storage.root with it) and start again", retryable=False)
    return None


def prepare(connection: Connection, *, create: bool, upgrade: bool, shown: str) -> SchemaState:
    """Check the schema inside the caller's transaction (which must hold `lock_schema`):
    create the tables of an empty database when `create`, upgrade an older schema when
    `upgrade`, and refuse anything else naming what to do. `shown` names the database."""
    newest = head()
    current = _current(connection, shown)
    if current is None:
        if not create:
            raise DatabaseMissing(f"database {shown} has no ichnode tables; `ichnode serve` creates them on first "
                                  "start, as does `ichnode db upgrade`")
        command.upgrade(_alembic_config(connection), "head")
        return SchemaState(newest, created=True)
    if current == newest:
        return SchemaState(newest)
    known = {script.revision for script in _scripts().walk_revisions()}
    if current != _LEGACY and current not in known:
        raise StorageError(
            f"database {shown} holds schema revision {current}, which this ichnode does not know (its newest is "
            f"{newest}): a newer ichnode upgraded it. Run that release (or a newer one) on every host of this "
            "database, or restore the backup taken before the upgrade", retryable=False)
    before = current if current == _LEGACY else f"revision {current}"
    if not upgrade:
        raise StorageError(
            f"database {shown} holds {before}; this ichnode needs revision {newest}: stop every node that uses "
            "this database, back it up, then run `ichnode db upgrade` (or set storage.auto_upgrade = true)",
            retryable=False)
    config = _alembic_config(connection)
    if current == _LEGACY:
        command.stamp(config, BASELINE)
    command.upgrade(config, "head")
    return SchemaState(newest, upgraded_from=before)
