"""The Storage SCP in-process, spoken to by a pynetdicom SCU: statuses and storage."""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage

from node.config import NodeSection
from node.ingest import Ingest, Status
from node.scp import start_scp
from node.triagelog import TriageLog, read_events
from storage.db import Database, Instance, Study
from storage.store import InstanceStore
from tests.peers import free_port, wait_for


@pytest.fixture
def scp(tmp_path: Path):
    store = InstanceStore(tmp_path / "store")
    store.ensure()
    database = Database(f"sqlite:///{tmp_path / 'node.db'}", create=True)
    ingest = Ingest(store, database, TriageLog(tmp_path / "triage.log"))
    port = free_port()
    server = start_scp(NodeSection(host="127.0.0.1", port=port), ingest)
    yield port, store, database, ingest, tmp_path
    server.shutdown()


def _send(port: int, ds: pydicom.Dataset) -> int:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    try:
        return assoc.send_c_store(ds).Status
    finally:
        assoc.release()


def test_compressed_instance_is_stored_as_received(scp) -> None:
    port, store, database, _, _ = scp
    ds = pydicom.dcmread(get_testdata_file("693_J2KI.dcm"))
    assert _send(port, ds) == Status.SUCCESS
    with database.read() as session:
        row = session.query(Instance).one()
    stored = pydicom.dcmread(store.absolute(row.path))
    assert stored.file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID
    assert stored.PixelData == ds.PixelData  # not decompressed, not re-encoded
    assert row.sop_class_uid == CTImageStorage
    assert oct(store.absolute(row.path).stat().st_mode & 0o777) == "0o600"


def test_missing_identifier_is_refused_with_a900(scp) -> None:
    port, _, database, _, tmp_path = scp
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.StudyInstanceUID
    assert _send(port, ds) == Status.DATASET_MISMATCH
    with database.read() as session:
        assert session.query(Instance).count() == 0
    assert read_events(tmp_path / "triage.log") == []


def test_storage_failure_answers_a700_and_records_nothing(scp) -> None:
    port, store, database, ingest, _ = scp
    ingest.store = InstanceStore(store.root / "blocked")
    (store.root / "blocked").write_text("a file where the store's folder should be")
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert _send(port, ds) == Status.OUT_OF_RESOURCES
    with database.read() as session:
        assert session.query(Instance).count() == 0


def test_resent_instance_is_recorded_once_and_new_study_logged_once(scp) -> None:
    port, _, database, _, tmp_path = scp
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert _send(port, ds) == Status.SUCCESS
    assert _send(port, ds) == Status.SUCCESS
    with database.read() as session:
        assert session.query(Instance).count() == 1
    events = read_events(tmp_path / "triage.log")
    assert [e["event"] for e in events] == ["received"]
    assert events[0]["calling_aet"] == "SCU" and "patient_id" not in events[0]


def test_below_the_free_disk_floor_stores_are_refused(scp) -> None:
    port, store, database, ingest, _ = scp
    ingest.min_free_mb = store.free_mb() + 10**9  # more than any disk has free
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assert _send(port, ds) == Status.OUT_OF_RESOURCES
    with database.read() as session:
        assert session.query(Instance).count() == 0
    assert not list(store.root.rglob("*.dcm"))
    ingest.min_free_mb = 0
    assert _send(port, ds) == Status.SUCCESS


def _associate(port: int, ds: pydicom.Dataset) -> Association:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    return assoc


def _held(database: Database) -> dict[str, bool]:
    """Each study's UID → whether an open association holds it."""
    with database.read() as session:
        return {s.study_instance_uid: s.held_until is not None for s in session.query(Study)}


@pytest.mark.parametrize("end", ["release", "abort"])
def test_an_open_association_holds_its_study_until_it_ends(scp, end: str) -> None:
    """A study is not quiet while the association sending it is open, however long the
    sender pauses; released or aborted, the association lets it go."""
    port, _, database, _, _ = scp
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    assoc = _associate(port, ds)
    assert assoc.send_c_store(ds).Status == Status.SUCCESS
    assert _held(database) == {ds.StudyInstanceUID: True}
    getattr(assoc, end)()
    wait_for(lambda: _held(database) == {ds.StudyInstanceUID: False}, timeout=30, what=f"the hold to go at {end}")


def test_a_sender_moving_on_to_another_study_lets_the_first_go(scp) -> None:
    port, _, database, _, _ = scp
    first = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    second = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    second.StudyInstanceUID, second.SOPInstanceUID = generate_uid(), generate_uid()
    assoc = _associate(port, first)
    try:
        assert assoc.send_c_store(first).Status == Status.SUCCESS
        assert assoc.send_c_store(second).Status == Status.SUCCESS
        assert _held(database) == {first.StudyInstanceUID: False, second.StudyInstanceUID: True}
    finally:
        assoc.release()
