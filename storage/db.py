"""SQLAlchemy models and the database a process opens once (`Database`).

One transaction policy for the whole project: the caller owns the transaction. The state
functions in `storage/state.py` only read and flush; `Database.write()` commits (or rolls
back) one short transaction around them, and `Database.read()` gives a snapshot that
never takes the write lock. No transaction stays open across network or model work.

Two backends, each with its settings chosen here:

- SQLite (the default, one host): WAL mode with synchronous=FULL, so a committed row
  survives a crash and readers never block writers; write transactions start with BEGIN
  IMMEDIATE, which serialises writers, so two never deadlock upgrading a lock. Once
  open, connections may not create the file again: a database deleted under a running
  node is noticed (DatabaseMissing), not silently replaced by an empty one.
- PostgreSQL through psycopg 3 (several processes and hosts): READ COMMITTED, so a
  statement sees what others committed before it (the queue's claims lock their rows,
  FOR UPDATE SKIP LOCKED); a pool checked before each use (pool_pre_ping), so a
  database that restarted is reconnected to without an error; bounded connect and lock
  waits and TCP keepalives, so an unreachable server becomes a retryable StorageError
  instead of a thread that hangs.

The schema is versioned with Alembic (`storage/schema.py`); opening a database checks
it, creates it or upgrades it as the caller allows.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import enum
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from sqlalchemy import (
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    make_url,
    select,
)
from sqlalchemy import func as sql_func
from sqlalchemy.engine import URL, Engine
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, relationship, sessionmaker

from storage.errors import DatabaseMissing, StorageError
from storage.schema import lock_schema, prepare

__all__ = [
    "StoreMarker",
    "StudyState",
    "DeliveryState",
    "Base",
    "Study",
    "Instance",
    "Delivery",
    "Notification",
    "PulledSeries",
    "SourcePoll",
    "utcnow",
    "DESTINATION_NAME_LENGTH",
    "anchor_sqlite_url",
    "sqlite_file",
    "Database",
    "Session",  # what Database.write()/read() hand out, for callers' type hints
]

log = logging.getLogger(__name__)

DESTINATION_NAME_LENGTH = 64  # the deliveries' column; PostgreSQL refuses a longer value


def utcnow() -> dt.datetime:
    """Naive UTC: SQLite keeps no time zones, so every timestamp here is UTC."""
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class StudyState(str, enum.Enum):
    RECEIVING = "receiving"
    READY = "ready"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


class DeliveryState(str, enum.Enum):
    PENDING = "pending"
    # Stored at a destination with Storage Commitment, whose report is awaited: not yet
    # delivered (deliveries only; a notification never waits in it).
    COMMITTING = "committing"
    SENT = "sent"
    FAILED = "failed"


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    # What names a study to a person when it has no accession number (the pages).
    study_date: Mapped[str] = mapped_column(String(8), default="")  # DICOM DA, YYYYMMDD
    modality: Mapped[str] = mapped_column(String(16), default="")
    study_description: Mapped[str] = mapped_column(String(64), default="")
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16), index=True
    )
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    # An association that sent the study's latest instance is still open (or was when its
    # process died): the study is not quiet before this time, whatever its quiet time.
    held_until: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Claiming and liveness of the worker that analyses it.
    claimed_by: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Failures of the environment (disk full, database busy) since the last success: the
    # study waits until retry_at, longer after each, without using up `attempts`.
    retries: Mapped[int] = mapped_column(Integer, default=0)
    retry_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    analyses: Mapped[int] = mapped_column(Integer, default=0)  # finished analyses
    purged_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)  # retention
    # Outcome of the latest analysis.
    verdict: Mapped[str | None] = mapped_column(String(32), default=None)
    study_score: Mapped[float | None] = mapped_column(Float, default=None)
    result_series_uid: Mapped[str | None] = mapped_column(String(64), default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow, onupdate=utcnow)

    instances: Mapped[list["Instance"]] = relationship(back_populates="study")
    deliveries: Mapped[list["Delivery"]] = relationship(back_populates="study")


class Instance(Base):
    """One stored instance. A SOPInstanceUID is unique only within its study and series:
    modalities, re-imports and anonymisers do reuse them, and each copy is kept."""

    __tablename__ = "instances"
    __table_args__ = (UniqueConstraint("study_id", "series_instance_uid", "sop_instance_uid"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str] = mapped_column(String(16), default="")
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(Text)  # relative to storage.root
    size: Mapped[int] = mapped_column(Integer)
    calling_aet: Mapped[str] = mapped_column(String(16), default="")
    received_at: Mapped[dt.datetime] = mapped_column(DateTime)

    study: Mapped[Study] = relationship(back_populates="instances")


class _Outgoing:
    """What every row of an outgoing queue keeps: its state, its attempts so far, and the
    process sending it now (claimed_by, heartbeat_at renewed while it sends)."""

    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16), index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    claimed_by: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)


class Delivery(_Outgoing, Base):
    """One result object set (Secondary Capture, SR or KOS) for one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    destination: Mapped[str] = mapped_column(String(DESTINATION_NAME_LENGTH))
    kind: Mapped[str] = mapped_column(String(8))  # which object set: its files are <kind>-*.dcm
    result_folder: Mapped[str] = mapped_column(Text)  # relative to storage.root
    priority_high: Mapped[bool] = mapped_column(default=False)
    # Storage Commitment (destinations with commitment = true): the Transaction UID of the
    # latest request, which the destination's N-EVENT-REPORT names, and when it reported
    # every object committed. sent_at is when the C-STOREs ended.
    transaction_uid: Mapped[str | None] = mapped_column(String(64), default=None, index=True)
    committed_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)

    study: Mapped[Study] = relationship(back_populates="deliveries")


class Notification(_Outgoing, Base):
    """One message for one webhook, retried like a delivery."""

    __tablename__ = "notifications"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    url: Mapped[str] = mapped_column(Text)
    payload: Mapped[str] = mapped_column(Text)  # the JSON body, fixed when the outcome was recorded

    study: Mapped[Study] = relationship()


class PulledSeries(Base):
    """A series a [[sources]] PACS reported (pull mode): seen, and pulled once it settled.
    A SeriesInstanceUID is pulled once whichever source or poll sees it, again only when
    the PACS reports more instances in it than were pulled."""

    __tablename__ = "pulled_series"

    id: Mapped[int] = mapped_column(primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), index=True)
    source: Mapped[str] = mapped_column(String(16))  # the source that reported it first
    reported_instances: Mapped[int | None] = mapped_column(Integer, default=None)  # as the PACS last said
    changed_at: Mapped[dt.datetime] = mapped_column(DateTime)  # first seen, or its count last changed
    pulled_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    pulled_instances: Mapped[int] = mapped_column(Integer, default=0)  # stored by the last pull


class SourcePoll(Base):
    """Each [[sources]] PACS's polls: where the next window starts, the latest error, and
    the process polling it now (so processes sharing the database never poll it together)."""

    __tablename__ = "source_polls"

    source: Mapped[str] = mapped_column(String(16), primary_key=True)
    succeeded_from: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)  # start of the last good poll
    attempted_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)  # of the latest poll; None when it succeeded
    claimed_by: Mapped[str | None] = mapped_column(String(128), default=None)
    claimed_until: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)


class SchemaVersion(Base):
    """The version marker of the releases before migrations (Alembic's alembic_version
    says which revision the database holds). Kept, at 4, so that those releases refuse
    a database they no longer know rather than run on it."""

    __tablename__ = "ichnode_schema"

    version: Mapped[int] = mapped_column(Integer, primary_key=True)


class StoreMarker(Base):
    """The marker of the storage folder this database's paths are relative to; the same
    value is in `.ichnode-store` in that folder (storage/store.py)."""

    __tablename__ = "ichnode_store"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)  # always 1: one row
    marker: Mapped[str] = mapped_column(String(64), nullable=False)


def anchor_sqlite_url(url: str, base: Path) -> str:
    """sqlite[+driver]:///relative.db → the same URL with the file's path made absolute
    under `base` (the config file's folder); other URLs unchanged. ValueError when `url`
    is not a database URL."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise ValueError(str(exc)) from None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:" \
            or database.startswith("file:") or Path(database).is_absolute():
        return url
    return parsed.set(database=str(base / database)).render_as_string(hide_password=False)


def sqlite_file(url: str) -> Path | None:
    """The database file of an SQLite URL; None for another backend or an in-memory
    database."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def _sqlite_connect(dbapi_connection, _record) -> None:
    # pysqlite's own implicit transactions break SAVEPOINT and start too late; SQLAlchemy
    # emits BEGIN itself instead (see Database).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed row is on disk
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(connection) -> None:
    # IMMEDIATE takes the write lock at the start, so two writers never deadlock on a
    # lock upgrade (which busy_timeout cannot resolve).
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_begin_deferred(connection) -> None:
    # A reader: in WAL mode it sees a snapshot and never waits for, or blocks, a writer.
    connection.exec_driver_sql("BEGIN")


# PostgreSQL: each process keeps up to POOL_SIZE connections open and opens up to
# POOL_OVERFLOW more under load (SCP associations, senders, worker, web); a site sizes
# max_connections for (POOL_SIZE + POOL_OVERFLOW) per process (docs/scaling.md).
POOL_SIZE, POOL_OVERFLOW = 5, 15
_CONNECT_TIMEOUT_SECONDS = 10  # a server that does not answer: a retryable error, not a hung thread
_LOCK_TIMEOUT_MS = 30_000  # a row lock held this long (a stuck process) fails the statement, retryably
_SUPPORTED = {"sqlite": ("sqlite", "sqlite+pysqlite"), "postgresql": ("postgresql", "postgresql+psycopg")}


def _postgresql_engine(url: URL) -> Engine:
    return create_engine(
        url.set(drivername="postgresql+psycopg"),
        isolation_level="READ COMMITTED",
        pool_pre_ping=True,  # a connection the server closed (restart, failover) is replaced before use
        pool_size=POOL_SIZE,
        max_overflow=POOL_OVERFLOW,
        pool_timeout=30,
        pool_recycle=3600,
        connect_args={
            "connect_timeout": _CONNECT_TIMEOUT_SECONDS,
            "application_name": f"ichnode {socket.gethostname()}:{os.getpid()}"[:63],
            "options": f"-c lock_timeout={_LOCK_TIMEOUT_MS}",
            # A server that vanished mid-query (host down, network cut) is noticed within about a minute.
            "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3,
        },
    )


class Database:
    """The database at one URL, opened once per process.

    `create=True` makes the file and tables when the database does not exist yet or is
    empty (`serve`, `worker` and `ichnode db upgrade` do that, on a first start);
    otherwise a missing database is a DatabaseMissing error naming the URL. An older
    schema is upgraded when `upgrade=True`, else refused naming `ichnode db upgrade`; a
    schema this code does not know is always refused.
    """

    def __init__(self, url: str, *, create: bool = False, upgrade: bool = False) -> None:
        self.url = make_url(url)
        self.backend = self.url.get_backend_name()
        self.created = False  # this process made the tables (of several starting together, one does)
        self._made_file = False
        self.revision = ""  # the schema revision it holds, once checked
        self.upgraded_from: str | None = None
        self._file: Path | None = None
        self._identity: tuple[int, int] | None = None
        self._outage_lock = threading.Lock()
        self._outage_since: float | None = None  # monotonic time of the first failure of an outage
        if self.url.drivername not in _SUPPORTED.get(self.backend, ()):
            raise StorageError(f"storage.database_url {self.url.drivername}://…: ichnode runs on SQLite "
                               "(sqlite:///PATH) or PostgreSQL through psycopg 3 (postgresql+psycopg://USER@HOST/DB)",
                               retryable=False)
        self._file = sqlite_file(url)
        if self._file is not None:
            self._open_sqlite_file(create)
        try:
            self._writer = self._engine(writer=True)
        except ModuleNotFoundError as exc:
            raise StorageError(f"storage.database_url {self.url.drivername}://…: its Python driver "
                               f"{exc.name!r} is not installed", retryable=False) from exc
        self._reader = self._engine(writer=False) if self._file is not None else self._writer
        self._prepare_schema(create, upgrade)
        self._write_sessions = sessionmaker(self._writer, expire_on_commit=False)
        self._read_sessions = sessionmaker(self._reader, expire_on_commit=False)

    @property
    def shown(self) -> str:
        """The URL without its password, for messages."""
        return self.url.render_as_string(hide_password=True)

    def _open_sqlite_file(self, create: bool) -> None:
        assert self._file is not None
        if not self._file.exists():
            if not create:
                raise DatabaseMissing(f"database {self._file} does not exist; `ichnode serve` creates it "
                                      "on first start (check storage.database_url)")
            self._file.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(self._file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another process of the node made it a moment ago
                pass
            else:
                os.close(fd)
                self._made_file = True
        stat = self._file.stat()
        self._identity = (stat.st_dev, stat.st_ino)

    def _engine(self, *, writer: bool) -> Engine:
        if self.backend == "postgresql":
            return _postgresql_engine(self.url)
        if self._file is None:
            return create_engine(self.url)
        # mode=rw: a connection opened later never creates a new, empty file.
        url = URL.create("sqlite", database=f"file:{self._file}", query={"mode": "rw", "uri": "true"})
        engine = create_engine(url)
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin_immediate if writer else _sqlite_begin_deferred)
        return engine

    def _prepare_schema(self, create: bool, upgrade: bool) -> None:
        """Check, create or upgrade the schema in one transaction under the schema lock."""
        try:
            with self._writer.connect() as connection, connection.begin():
                lock_schema(connection)
                state = prepare(connection, create=create or self._made_file, upgrade=upgrade, shown=self.shown)
        except SQLAlchemyError as exc:
            raise StorageError(f"cannot open the database {self.shown}: {_reason(exc)}", retryable=False) from exc
        self.created = state.created
        self.upgraded_from = state.upgraded_from
        self.revision = state.revision

    def check(self) -> None:
        """DatabaseMissing when the SQLite file was deleted or replaced since it was opened."""
        if self._file is None:
            return
        try:
            stat = self._file.stat()
        except FileNotFoundError:
            identity = None
        else:
            identity = (stat.st_dev, stat.st_ino)
        if identity != self._identity:
            raise DatabaseMissing(f"the database file {self._file} was deleted or replaced while the node ran; "
                                  "nothing more is recorded: stop the node and restore the file")

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Database failures as StorageError: an unreachable, restarting or busy database
        may pass (retryable), anything else will not. An outage is logged when it starts
        and when it ends, not at every failed transaction."""
        try:
            yield
        except DBAPIError as exc:
            if isinstance(exc, OperationalError) or exc.connection_invalidated:
                self._outage(exc)
                raise StorageError(f"database {self.shown}: {_reason(exc)}", retryable=True) from exc
            raise StorageError(f"database {self.shown}: {exc}", retryable=False) from exc
        except SQLAlchemyError as exc:
            raise StorageError(f"database {self.shown}: {exc}", retryable=False) from exc
        self._recovered()

    def _outage(self, exc: Exception) -> None:
        with self._outage_lock:
            if self._outage_since is not None:
                return
            self._outage_since = time.monotonic()
        log.error("database %s is unavailable (%s); stores are refused with 0xA700 and queued work waits until "
                  "it is back", self.shown, _reason(exc))

    def _recovered(self) -> None:
        if self._outage_since is None:
            return
        with self._outage_lock:
            since, self._outage_since = self._outage_since, None
        if since is not None:
            log.warning("database %s is available again after %.1f s", self.shown, time.monotonic() - since)

    @contextlib.contextmanager
    def write(self) -> Iterator[Session]:
        """One short write transaction: committed on success, rolled back on error."""
        self.check()
        with self._translated(), self._write_sessions.begin() as session:
            yield session

    def session(self) -> Session:
        """A write session whose transactions the caller ends itself (tests and scripts
        that step through several); the node uses `write()` and `read()`."""
        self.check()
        return self._write_sessions()

    @contextlib.contextmanager
    def read(self) -> Iterator[Session]:
        """A read-only snapshot; it never takes the write lock (nothing is committed)."""
        self.check()
        with self._translated(), self._read_sessions() as session:
            yield session

    def clock_offset_seconds(self) -> float:
        """How far this host's clock is ahead of the database server's (0 for SQLite,
        which runs on this host). Quiet times and heartbeats are compared across hosts,
        so their clocks must agree."""
        if self.backend != "postgresql":
            return 0.0
        with self.read() as session:
            before = time.time()
            server = session.scalar(select(sql_func.now()))
            after = time.time()
        return (before + after) / 2 - server.timestamp()

    def dispose(self) -> None:
        self._writer.dispose()
        self._reader.dispose()


def _reason(exc: SQLAlchemyError) -> str:
    """The driver's own message, without SQLAlchemy's SQL and background link."""
    original = getattr(exc, "orig", None)
    return str(original or exc).strip().replace("\n", "; ")
