"""Shared fixtures: synthetic studies are made once per session (they take seconds); one
throw-away PostgreSQL cluster serves the session, with a fresh database per test."""

from __future__ import annotations

import os


def _a_cpu_share_per_worker() -> None:
    """Under pytest-xdist, each worker and everything it starts (nodes, torch, ONNX
    Runtime) keeps to its own share of the CPUs: torch's and ONNX Runtime's thread pools
    otherwise each take every core and spin against the other worker's, which made the
    suite about twice as slow on 2 cores."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    if worker.startswith("gw") and 1 < count <= len(cpus):
        os.sched_setaffinity(0, cpus[int(worker[2:]) % count::count])


_a_cpu_share_per_worker()  # before anything imports torch, whose thread pool is sized once

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from demo.peers import PostgresCluster, find_tool
from storage.db import Database, Delivery, DeliveryState, Study, StudyState, utcnow
from training.synthetic import SyntheticOptions, write_studies

BACKENDS = ["sqlite", "postgresql"]
_databases = itertools.count()


@pytest.fixture(scope="session")
def training_studies(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six small studies (six patients), half with bleeds; with seed 20 the paper's split
    puts a study with bleeds in each of train, validation and test."""
    root = tmp_path_factory.mktemp("training_studies")
    write_studies(root, SyntheticOptions(studies=6, seed=20, positive_fraction=0.5, min_slices=10, max_slices=12))
    return root


@pytest.fixture(scope="session")
def training_prepared(training_studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.prepare import prepare

    out = tmp_path_factory.mktemp("training_prepared")
    prepare(training_studies, out, workers=2, progress=False)
    return out


@pytest.fixture(scope="session")
def reference_run(training_prepared: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The experiment folder of one uninterrupted tests.trainrun.REFERENCE run."""
    from tests.trainrun import write_train_config
    from training.train import load_train_config, train

    root = tmp_path_factory.mktemp("reference_run")
    config = load_train_config(write_train_config(root / "train.toml", training_prepared, root / "experiments",
                                                  "reference"))
    train(config, progress=False)
    return config.folder


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two studies (seed 11): one with bleeds, one without, each with scout and bone series."""
    root = tmp_path_factory.mktemp("synthetic")
    write_studies(
        root,
        SyntheticOptions(
            studies=2, seed=11, positive_fraction=0.5, localizer=True, bone_series=True
        ),
    )
    return root


def add_delivery(database: Database, result_folder: str, state: DeliveryState, **fields: object) -> None:
    """A done study (1.2.3) with one Secondary Capture delivery to "pacs", due now, in
    `state`; `fields` set the rest (attempts, last_error)."""
    with database.write() as session:
        study = Study(study_instance_uid="1.2.3", state=StudyState.DONE, first_received_at=utcnow(),
                      last_received_at=utcnow())
        session.add(study)
        session.flush()
        session.add(Delivery(study_id=study.id, destination="pacs", kind="sc", result_folder=result_folder,
                             state=state, next_attempt_at=utcnow(), **fields))


def load_labels(study: Path) -> dict:
    return json.loads((study / "labels.json").read_text())


@pytest.fixture(scope="session")
def positive_study(synthetic_root: Path) -> Path:
    return next(s for s in sorted(synthetic_root.iterdir()) if load_labels(s)["positive"])


@pytest.fixture(scope="session")
def negative_study(synthetic_root: Path) -> Path:
    return next(s for s in sorted(synthetic_root.iterdir()) if not load_labels(s)["positive"])


def require_tool(name: str) -> str:
    """Path of a real peer program; its absence fails the test (`make test` installs it)."""
    try:
        return find_tool(name)
    except FileNotFoundError as exc:
        pytest.fail(str(exc))


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A PostgreSQL cluster of the test session's own (initdb + pg_ctl, fsync off), removed
    at the end. Its absence fails the tests that need it: `make test` installs it."""
    try:
        cluster = PostgresCluster(durable=False)
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.remove()


@pytest.fixture(scope="session")
def postgres_template(postgres: PostgresCluster) -> str:
    """A database at the newest schema that test databases copy (faster than migrating each)."""
    Database(postgres.create_database("ichnode_template"), create=True).dispose()
    return "ichnode_template"


def new_postgres_database(cluster: PostgresCluster, template: str | None = None) -> str:
    """The URL of a new database of its own on `cluster`: empty, or a copy of `template`."""
    return cluster.create_database(f"test_{next(_databases)}", template=template)


@pytest.fixture(params=BACKENDS)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A database at the newest schema for one test, on each backend in turn: an SQLite file
    that Database(url, create=True) makes, or a new PostgreSQL database with the tables."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'node.db'}"
    return new_postgres_database(request.getfixturevalue("postgres"), request.getfixturevalue("postgres_template"))
