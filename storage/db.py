"""SQLAlchemy models and the engine/session factory (built once per process).

SQLite runs in WAL mode with synchronous=FULL, so a committed row survives a crash and
readers never block the SCP; PostgreSQL works unchanged for several worker hosts.
"""

from __future__ import annotations

import datetime as dt
import enum
from pathlib import Path

from sqlalchemy import (
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Integer,
    String,
    Text,
    create_engine,
    event,
    make_url,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship, sessionmaker

__all__ = [
    "StudyState",
    "DeliveryState",
    "Base",
    "Study",
    "Instance",
    "Delivery",
    "utcnow",
    "make_engine",
    "make_sessionmaker",
]


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
    SENT = "sent"
    FAILED = "failed"


class Base(DeclarativeBase):
    pass


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    accession_number: Mapped[str] = mapped_column(String(16), default="")
    state: Mapped[StudyState] = mapped_column(
        Enum(StudyState, native_enum=False, length=16), index=True
    )
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime)
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    # Claiming and liveness of the worker that analyses it.
    claimed_by: Mapped[str | None] = mapped_column(String(128), default=None)
    heartbeat_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
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
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True, index=True)
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


class Delivery(Base):
    """One result object set for one destination."""

    __tablename__ = "deliveries"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    destination: Mapped[str] = mapped_column(String(64))
    result_folder: Mapped[str] = mapped_column(Text)  # relative to storage.root
    priority_high: Mapped[bool] = mapped_column(default=False)
    state: Mapped[DeliveryState] = mapped_column(
        Enum(DeliveryState, native_enum=False, length=16), index=True
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime, index=True)
    last_error: Mapped[str | None] = mapped_column(Text, default=None)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime, default=utcnow)
    sent_at: Mapped[dt.datetime | None] = mapped_column(DateTime, default=None)

    study: Mapped[Study] = relationship(back_populates="deliveries")


def _sqlite_connect(dbapi_connection, _record) -> None:
    # pysqlite's own implicit transactions break SAVEPOINT and start too late; SQLAlchemy
    # emits BEGIN itself instead (see _sqlite_begin).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")  # a committed row is on disk
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin(connection) -> None:
    # IMMEDIATE takes the write lock at the start, so two writers never deadlock on a
    # lock upgrade (which busy_timeout cannot resolve); WAL readers are not blocked.
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str) -> Engine:
    """An engine for `url`, creating the SQLite file's folder and the tables if needed."""
    parsed = make_url(url)
    is_sqlite = parsed.get_backend_name() == "sqlite"
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, pool_pre_ping=not is_sqlite)
    if is_sqlite:
        event.listen(engine, "connect", _sqlite_connect)
        event.listen(engine, "begin", _sqlite_begin)
    Base.metadata.create_all(engine)
    if is_sqlite and parsed.database and parsed.database != ":memory:":
        Path(parsed.database).chmod(0o600)
    return engine


def make_sessionmaker(engine: Engine) -> sessionmaker:
    return sessionmaker(engine, expire_on_commit=False)
