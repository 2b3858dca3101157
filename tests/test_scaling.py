"""Several hosts, one queue, on a real PostgreSQL server: two scanner-facing `serve`
processes and two `worker` processes share one database and one storage folder (each
process mounts it at its own path), DCMTK storescu is the scanner, Orthanc the PACS; a
worker killed mid-analysis; a database restarted and stopped under a running node.

The checkpoint has random weights (ResNet18, the paper's baseline, to keep the workers
light): these tests check the queue, not accuracy."""

from __future__ import annotations

import dataclasses
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from sqlalchemy import func, select

from node.triagelog import read_events
from node.worker import NO_CHECKPOINT
from storage.db import Database, Delivery, DeliveryState, Instance, Study, StudyState
from tests.conftest import load_labels, new_postgres_database
from tests.peers import (NodeProcess, Orthanc, PostgresCluster, c_store_status, free_port, node_config, storescu,
                         wait_for)
from training.model.architectures import create_model
from training.model.checkpoint import default_model_config, save_checkpoint
from training.model.scope import Scope
from training.synthetic import SyntheticOptions, write_studies

STUDIES = 16
SLICES = 8  # per study: small studies keep the run short; worker.min_slices is set to match
# The workers beat every second and are declared dead after 6 s without a beat.
LIVENESS = {"heartbeat_seconds": 1, "stale_after_seconds": 6}


def _uid(study: Path) -> str:
    return load_labels(study)["study_instance_uid"]


def _events(folders: list[Path], event: str) -> list[dict]:
    return [e for folder in folders for e in read_events(folder / "triage.log") if e["event"] == event]


def _series_by_study(orthanc: Orthanc) -> dict[str, list[str]]:
    """The modalities of the series the PACS holds, by StudyInstanceUID (Orthanc's REST API)."""
    return {study["MainDicomTags"]["StudyInstanceUID"]:
            sorted(orthanc.get(f"/series/{series}")["MainDicomTags"]["Modality"] for series in study["Series"])
            for study in orthanc.get("/studies?expand")}


@pytest.fixture
def cluster_of_four(tmp_path: Path, postgres: PostgresCluster):
    """Orthanc, two serve processes (no model: `worker.enabled_in_serve = false`) and two
    workers, all on one new PostgreSQL database and one storage folder."""
    url = new_postgres_database(postgres)
    shared = tmp_path / "shared-store"
    shared.mkdir()
    orthanc = Orthanc(tmp_path / "orthanc").start()
    torch.manual_seed(0)
    # Its scope admits the short studies (8 slices cover 32-40 mm, less than the default 80).
    checkpoint = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18"),
                                 dataclasses.replace(default_model_config("resnet18"), scope=Scope(min_coverage_mm=0)))
    processes: list[NodeProcess] = []

    def config(name: str, port: int, *, analyses: bool) -> tuple[Path, str]:
        folder = tmp_path / name
        folder.mkdir()
        mount = folder / "mnt"  # this host's path to the shared folder
        mount.symlink_to(shared)
        text = node_config(folder, port=port, checkpoint=checkpoint if analyses else None, stable_seconds=5,
                           destinations=[("pacs", "PACS", orthanc.dicom_port)],
                           overrides={"storage": {"root": str(mount), "database_url": url},
                                      "worker": {**LIVENESS, "enabled_in_serve": False, "min_slices": SLICES},
                                      "explain": {"key_slices": 2},
                                      "output": {"kos_for": "all"}})  # three sets whatever random weights say
        return folder, text

    try:
        for name in ("serve-a", "serve-b"):
            port = free_port()
            processes.append(NodeProcess(*config(name, port, analyses=False), port))
        for name in ("worker-1", "worker-2"):
            port = free_port()  # unused by a worker, but node.port must be valid
            processes.append(NodeProcess(*config(name, port, analyses=True), port, command="worker"))
        # The first process creates the tables; the others start together once it has.
        processes[0].start()
        for process in processes[1:]:
            process.start(wait=False)
        for process in processes[1:]:
            if process.command == "serve":
                process.wait_listening()
            else:
                process.wait_for_output("analysing studies from")
        yield processes, orthanc, Database(url), shared
    finally:
        for process in processes:
            process.stop()
        orthanc.stop()


def test_two_serve_and_two_worker_processes_analyse_and_deliver_each_study_once(
        cluster_of_four, tmp_path: Path) -> None:
    processes, orthanc, database, shared = cluster_of_four
    serve_a, serve_b, worker_1, worker_2 = processes
    data = tmp_path / "studies"
    # No bleeds: at this few slices the phantom covers only the skull base, too low for some
    # bleed types; the verdicts come from random weights anyway.
    write_studies(data, SyntheticOptions(studies=STUDIES, seed=21, positive_fraction=0.0, min_slices=SLICES,
                                         max_slices=SLICES))
    studies = sorted(data.iterdir())
    # Each study's slices alternate between the two scanner-facing processes, sent at once.
    halves = [[f for study in studies for f in sorted((study / "HEAD").glob("*.dcm"))[half::2]] for half in (0, 1)]
    with ThreadPoolExecutor(2) as pool:
        sent = list(pool.map(lambda pair: storescu(pair[0].port, pair[1]), zip((serve_a, serve_b), halves)))
    assert all(result.returncode == 0 for result in sent), [r.stderr[-500:] for r in sent]
    uids = {_uid(study) for study in studies}
    serves, workers = [serve_a.folder, serve_b.folder], [worker_1.folder, worker_2.folder]
    wait_for(lambda: len(_events(serves, "delivered")) >= 3 * STUDIES, timeout=240,
             what=f"the SC, SR and KOS of {STUDIES} studies delivered")

    # Every study was analysed once, by one of the two workers, each of which took some.
    analysed = [e["study_instance_uid"] for e in _events(workers, "analysed")]
    assert sorted(analysed) == sorted(uids)
    assert all(_events([folder], "analysed") for folder in workers)
    assert sorted(e["study_instance_uid"] for e in _events(serves, "ready")) == sorted(uids)  # ready once each
    # Every result object set went out once, and the PACS holds one result set per study.
    delivered = [(e["study_instance_uid"], e["kind"]) for e in _events(serves, "delivered")]
    assert sorted(delivered) == sorted((uid, kind) for uid in uids for kind in ("sc", "sr", "kos"))
    wait_for(lambda: len(_series_by_study(orthanc)) == STUDIES, timeout=30, what="every study in Orthanc")
    assert _series_by_study(orthanc) == {uid: ["KO", "OT", "SR"] for uid in uids}
    with database.read() as session:
        studies_rows = session.scalars(select(Study)).all()
        assert {(s.study_instance_uid, s.state, s.instance_count, s.analyses) for s in studies_rows} == {
            (uid, StudyState.DONE, SLICES, 1) for uid in uids}
        deliveries = session.scalars(select(Delivery)).all()
        assert {(d.state, d.attempts, d.claimed_by) for d in deliveries} == {(DeliveryState.SENT, 1, None)}
        # Paths are relative to storage.root: each process found the files under its own mount.
        paths = session.scalars(select(Instance.path)).all()
    assert len(paths) == STUDIES * SLICES and all((shared / p).is_file() for p in paths)
    assert not any(Path(p).is_absolute() for p in paths)

    # A worker dies during an analysis: the other takes the study once its heartbeat is stale.
    big = tmp_path / "big"
    write_studies(big, SyntheticOptions(studies=1, seed=22, min_slices=40, max_slices=40))
    (study,) = sorted(big.iterdir())
    uid = _uid(study)
    assert storescu(serve_a.port, sorted((study / "HEAD").glob("*.dcm"))).returncode == 0

    def claimant() -> str | None:
        with database.read() as session:
            row = session.scalar(select(Study).where(Study.study_instance_uid == uid))
            return row.claimed_by if row is not None and row.state == StudyState.PROCESSING else None

    holder = wait_for(claimant, timeout=120, what="a worker to claim the big study", every=0.05)
    victim, survivor = ((worker_1, worker_2) if f":{worker_1.process.pid}:" in holder else (worker_2, worker_1))
    assert f":{victim.process.pid}:" in holder
    victim.stop(signal.SIGKILL)
    wait_for(lambda: uid in {e["study_instance_uid"] for e in _events(serves, "delivered")} and
             len([e for e in _events(serves, "delivered") if e["study_instance_uid"] == uid]) == 3,
             timeout=180, what="the big study delivered after the worker died")
    assert not _events([victim.folder], "analysed") or uid not in {
        e["study_instance_uid"] for e in _events([victim.folder], "analysed")}
    assert [e["study_instance_uid"] for e in _events([survivor.folder], "analysed")].count(uid) == 1
    assert "stopped responding" in survivor.output()
    with database.read() as session:
        row = session.scalar(select(Study).where(Study.study_instance_uid == uid))
        assert (row.state, row.attempts, row.analyses) == (StudyState.DONE, 2, 1)
    wait_for(lambda: _series_by_study(orthanc).get(uid) == ["KO", "OT", "SR"], timeout=30,
             what="the big study's one result set in Orthanc")
    assert len(_series_by_study(orthanc)) == STUDIES + 1


def test_a_database_restart_and_outage_under_a_running_node(tmp_path: Path, negative_study: Path) -> None:
    """Stores while the database is away are refused (0xA700), never answered Success
    without a row; the node reconnects by itself, after a restart and after an outage."""
    files = sorted((negative_study / "HEAD").glob("*.dcm"))[:3]
    with PostgresCluster(durable=False) as cluster:  # its own: this test stops it
        url = cluster.create_database("node")
        port = free_port()
        node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=None, stable_seconds=2,
                                                 overrides={"storage": {"database_url": url}}), port).start()
        try:
            assert c_store_status(port, files[0]) == 0x0000
            cluster.restart()  # every pooled connection is dead now
            assert c_store_status(port, files[1]) == 0x0000
            cluster.stop()
            assert c_store_status(port, files[2]) == 0xA700
            node.wait_for_output(f"database {url} is unavailable", timeout=30)
            cluster.start()
            assert c_store_status(port, files[2]) == 0x0000
            node.wait_for_output(f"database {url} is available again", timeout=30)
            database = Database(url)

            def failed() -> bool:  # the completion job and the worker carry on: no model, so failed
                with database.read() as session:
                    study = session.scalar(select(Study))
                    return study.state == StudyState.FAILED and study.last_error == NO_CHECKPOINT

            wait_for(failed, timeout=60, what="the study to go through completion and the worker")
            with database.read() as session:
                assert session.scalar(select(Study.instance_count)) == 3
                assert session.scalar(select(func.count()).select_from(Instance)) == 3
            database.dispose()
        finally:
            node.stop()
        assert "Traceback" not in node.output()
