"""Nothing acknowledged is lost: the node killed with SIGKILL while receiving and while
analysing, restarted, still stores, analyses and delivers every study exactly once."""

from __future__ import annotations

import datetime as dt
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
import torch
from pynetdicom import AE

from node.triagelog import read_events
from storage.db import Database, Instance, Study, StudyState
from tests.conftest import load_labels
from tests.peers import NodeProcess, Orthanc, free_port, node_config, storescu, wait_for
from tests.stress import CpuStress
from training.model.checkpoint import default_model_config, save_checkpoint
from training.model.architectures import create_model

# The longest a node start may take on a machine whose CPUs are all busy.
STARTUP_SECONDS = 600


def _send_until_refused(port: int, files: list[Path], acknowledged: list[str], lock: threading.Lock) -> None:
    """One association sending `files`; records each SOPInstanceUID answered Success."""
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", ["1.2.840.10008.1.2.1"])
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    if not assoc.is_established:
        return
    try:
        for path in files:
            if not assoc.is_established:
                return
            ds = pydicom.dcmread(path)
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) == 0x0000:
                with lock:
                    acknowledged.append(ds.SOPInstanceUID)
    except Exception:  # the node died mid-send, as intended
        return
    finally:
        if assoc.is_established:
            assoc.release()


def _start(node: NodeProcess) -> None:
    """Start the node and wait until it listens: with every CPU busy, loading the model
    takes minutes rather than seconds."""
    node.start(wait=False)
    node.wait_listening(timeout=STARTUP_SECONDS)


def _database(folder: Path) -> Database:
    return Database(f"sqlite:///{folder / 'node.db'}")


@pytest.fixture
def busy_cpus() -> Iterator[CpuStress]:
    """The node's CPU kept busy (two spinners on the one CPU the node shares with them):
    exactly once must not depend on the node getting a CPU the moment it wants one."""
    with CpuStress() as stress:
        yield stress


def test_sigkill_while_receiving_and_while_analysing_loses_nothing(
    tmp_path: Path, synthetic_root: Path, busy_cpus: CpuStress
) -> None:
    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "effclass.pt", create_model("effclass"), default_model_config("effclass"))
    studies = sorted(p for p in synthetic_root.iterdir() if p.is_dir())
    files = [sorted((s / "HEAD").glob("*.dcm")) for s in studies]
    pacs = Orthanc(tmp_path / "orthanc").start()
    port = free_port()
    config = node_config(tmp_path, port=port, checkpoint=checkpoint, stable_seconds=2,
                         heartbeat_seconds=1, stale_after_seconds=3,
                         destinations=[("pacs", "PACS", pacs.dicom_port)],
                         overrides={"output": {"kos_for": "all"}})  # three sets whatever random weights say
    node = NodeProcess(tmp_path, config, port)
    try:
        with busy_cpus.paused():  # the node loads torch at full speed; what it does next, on a busy CPU
            _start(node)
        # 1. Two associations sending two studies; SIGKILL once some are stored.
        acknowledged: list[str] = []
        lock = threading.Lock()
        senders = [threading.Thread(target=_send_until_refused, args=(port, f, acknowledged, lock)) for f in files]
        for sender in senders:
            sender.start()
        wait_for(lambda: len(acknowledged) >= 8, timeout=120, what="some acknowledged instances")
        node.stop(signal.SIGKILL)
        for sender in senders:
            sender.join(timeout=60)
        assert len(acknowledged) < sum(map(len, files)), "the kill came too late to test anything"

        # Every instance answered Success is on disk, readable, and in the database.
        database = _database(tmp_path)
        with database.read() as session:
            stored = {i.sop_instance_uid: i.path for i in session.query(Instance)}
        assert set(acknowledged) <= set(stored)
        for uid in acknowledged:
            assert pydicom.dcmread(tmp_path / "store" / stored[uid]).SOPInstanceUID == uid

        # 2. Restart; the scanner sends again (re-sends are idempotent).
        with busy_cpus.paused():
            _start(node)
        for study_files in files:
            assert storescu(port, study_files).returncode == 0
        uids = [load_labels(s)["study_instance_uid"] for s in studies]
        # Arriving and re-sent on a busy machine is what exactly once had to survive; the
        # rest (a kill mid-analysis, the stale heartbeat) needs no busy machine, and the
        # spinners would slow every other test running beside this one.
        busy_cpus.stop()

        # 3. SIGKILL again while a study is being analysed; the restarted node re-queues
        #    it once its heartbeat is stale.
        def processing() -> bool:
            with database.read() as session:
                return session.query(Study).filter(Study.state == StudyState.PROCESSING).count() > 0

        wait_for(processing, timeout=120, what="a study being analysed", every=0.05)
        node.stop(signal.SIGKILL)
        _start(node)

        def delivered(uid: str) -> bool:
            return {e["kind"] for e in read_events(tmp_path / "triage.log")
                    if e["event"] == "delivered" and e["study_instance_uid"] == uid} == {"sc", "sr", "kos"}

        for uid in uids:
            wait_for(lambda uid=uid: delivered(uid), timeout=300, what=f"delivery of study {uid}")
    finally:
        node.stop()
        results = [s for s in pacs.get("/series?expand")
                   if s["MainDicomTags"].get("Modality") == "OT"
                   and s["MainDicomTags"].get("SeriesDescription", "").startswith("AI ICH:")]
        pacs.stop()

    # Exactly once: one Secondary Capture series per study at the PACS, one delivery of
    # each object set (SC, SR, KOS).
    assert len(results) == len(studies)
    events = read_events(tmp_path / "triage.log")
    for uid in uids:
        kinds = [e["kind"] for e in events if e["event"] == "delivered" and e["study_instance_uid"] == uid]
        assert sorted(kinds) == ["kos", "sc", "sr"]
    with database.read() as session:
        assert session.query(Instance).count() == sum(map(len, files))
        assert {s.state for s in session.query(Study)} == {StudyState.DONE}
        # The study killed mid-analysis was claimed again after its heartbeat went stale.
        assert max(s.attempts for s in session.query(Study)) == 2


def test_after_a_restart_a_study_gets_a_whole_quiet_time_again(tmp_path: Path, synthetic_root: Path) -> None:
    """A study that went quiet while the node was down is not ready the moment the node is
    back: the scanner's re-send gets `completion.stable_seconds` from the restart."""
    stable = 8.0
    files = sorted((sorted(p for p in synthetic_root.iterdir() if p.is_dir())[0] / "HEAD").glob("*.dcm"))
    port = free_port()
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=None, stable_seconds=stable), port)
    node.start()
    try:
        assert storescu(port, files[:5]).returncode == 0
        node.stop()
        sent = time.time()
        wait_for(lambda: time.time() >= sent + stable, timeout=stable + 5, what="the study's quiet time to pass")
        restarted = time.time()
        node.start()

        def ready() -> list[dict]:
            return [e for e in read_events(tmp_path / "triage.log") if e["event"] == "ready"]

        wait_for(lambda: bool(ready()), timeout=stable + 60, what="the study to be ready")
    finally:
        node.stop()
    (event,) = ready()
    assert dt.datetime.fromisoformat(event["time"]).timestamp() >= restarted + stable
