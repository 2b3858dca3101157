"""Pull mode against a real Orthanc with its DICOMweb plugin: QIDO-RS + WADO-RS, C-FIND +
C-MOVE (to the node's own SCP) and C-FIND + C-GET bring new head CT into the node's
store and database once; what is not CT or does not match the filters stays on the
PACS; a PACS that is down fails the poll without moving the window on."""

from __future__ import annotations

import datetime as dt
import io
import itertools
import json
import logging
import subprocess
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.commitment import Commitments
from node.config import Config, Retrieve, Source, SourceKind, parse_config
from node.errors import ConfigError
from node.ingest import Ingest
from node.pull import Puller
from node.delivery import Deliveries, DicomSender
from node.notify import Notifier
from node.scp import start_scp
from node.service import Node, _scheduler
from node.status import print_status
from node.triagelog import TriageLog
from storage.db import Database, Instance, PulledSeries, SourcePoll, Study, utcnow
from storage.pull import claim_poll, finish_poll, renew_poll
from storage.store import InstanceStore
from tests.conftest import require_tool
from tests.peers import Orthanc, free_port, wait_for
from training.synthetic import SyntheticOptions, write_studies

NODE_AET = "ICHNODE"
HEAD = "HEAD"  # the synthetic study's series folders: SCOUT (1 topogram), HEAD and BONE (8 slices each)


@pytest.fixture(scope="module")
def study_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    """One small synthetic head CT study, its files by series."""
    root = tmp_path_factory.mktemp("pull_study")
    write_studies(root, SyntheticOptions(studies=1, seed=3, positive_fraction=0.0, localizer=True, bone_series=True,
                                         min_slices=8, max_slices=8))
    return {series.name: sorted(series.glob("*.dcm")) for series in sorted((root / "study_0000").iterdir())
            if series.is_dir()}


@pytest.fixture(scope="module")
def node_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory, node_port: int) -> Iterator[Orthanc]:
    """One Orthanc for the module, which knows the node (C-MOVE destination)."""
    orthanc = Orthanc(tmp_path_factory.mktemp("orthanc"), dicomweb=True,
                      modalities={"ichnode": (NODE_AET, node_port)}).start()
    yield orthanc
    orthanc.stop()


@pytest.fixture
def empty_pacs(pacs: Orthanc) -> Orthanc:
    """The module's Orthanc with nothing stored: each test loads what it needs."""
    for study in pacs.get("/studies"):
        request = urllib.request.Request(f"{pacs.url}/studies/{study}", method="DELETE")
        urllib.request.urlopen(request, timeout=10).close()
    return pacs


def _upload(orthanc: Orthanc, datasets: list[pydicom.Dataset]) -> None:
    """Into Orthanc by its REST API (POST /instances), as a scanner would have sent them."""
    for ds in datasets:
        path = Path(orthanc.folder) / "upload.dcm"
        ds.save_as(path, enforce_file_format=True)
        request = urllib.request.Request(f"{orthanc.url}/instances", data=path.read_bytes(), method="POST",
                                         headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert json.loads(response.read())["Status"] in ("Success", "AlreadyStored")


def _study(files: dict[str, list[Path]], when: dt.datetime, *, with_mr: bool = True) -> list[pydicom.Dataset]:
    """The study dated `when` (local time, as a scanner writes it), with an MR series in it too."""
    datasets = []
    for series in files.values():
        for path in series:
            ds = pydicom.dcmread(path)
            ds.StudyDate, ds.StudyTime = f"{when:%Y%m%d}", f"{when:%H%M%S}"
            datasets.append(ds)
    if with_mr:
        mr = pydicom.dcmread(files[HEAD][0])
        mr.StudyDate, mr.StudyTime = f"{when:%Y%m%d}", f"{when:%H%M%S}"
        mr.Modality, mr.SeriesDescription = "MR", "HEAD T2 FLAIR"
        mr.SeriesInstanceUID, mr.SOPInstanceUID = generate_uid(), generate_uid()
        mr.file_meta.MediaStorageSOPInstanceUID = mr.SOPInstanceUID
        datasets.append(mr)
    return datasets


def _series_uid(files: dict[str, list[Path]], name: str) -> str:
    return pydicom.dcmread(files[name][0], stop_before_pixels=True).SeriesInstanceUID


class _Node:
    """The node's store, database and ingest in this process, its SCP on `port`."""

    def __init__(self, folder: Path, port: int, sources: list[dict]) -> None:
        self.config: Config = parse_config({
            "node": {"ae_title": NODE_AET, "host": "127.0.0.1", "port": port},
            "storage": {"root": str(folder / "store"), "database_url": f"sqlite:///{folder / 'node.db'}"},
            "sources": sources}, folder)
        self.store = InstanceStore(self.config.storage.root)
        self.store.ensure()
        self.database = Database(self.config.storage.database_url, create=True)
        self.ingest = Ingest(self.store, self.database, TriageLog(folder / "triage.log"))
        self.server = start_scp(self.config.node, self.ingest)

    def puller(self, index: int = 0) -> Puller:
        return Puller(self.config, self.config.sources[index], self.database, self.ingest)

    def instances(self) -> list[Instance]:
        with self.database.read() as session:
            return session.query(Instance).order_by(Instance.id).all()

    def pulled(self) -> list[PulledSeries]:
        with self.database.read() as session:
            return session.query(PulledSeries).order_by(PulledSeries.id).all()

    def poll_row(self, source: str) -> SourcePoll | None:
        with self.database.read() as session:
            return session.get(SourcePoll, source)


@pytest.fixture
def make_node(tmp_path: Path, node_port: int) -> Iterator:
    made: list[_Node] = []

    def make(sources: list[dict]) -> _Node:
        made.append(_Node(tmp_path, node_port, sources))
        return made[-1]

    make.port = node_port
    yield make
    for node in made:
        node.server.shutdown()
        node.database.dispose()


def _qido(pacs: Orthanc, **keys: object) -> dict:
    return {"name": "pacs-web", "kind": "qido", "url": pacs.dicomweb_url, "settle_seconds": 0, **keys}


def _cfind(pacs: Orthanc, retrieve: str, **keys: object) -> dict:
    return {"name": f"pacs-{retrieve}", "kind": "cfind", "ae_title": pacs.ae_title, "host": "127.0.0.1",
            "port": pacs.dicom_port, "retrieve": retrieve, "settle_seconds": 0, **keys}


def test_qido_and_wado_pull_the_matching_ct_series_once(empty_pacs: Orthanc, make_node, study_files) -> None:
    _upload(empty_pacs, _study(study_files, dt.datetime.now() - dt.timedelta(minutes=10)))
    # "H30s" is in the HEAD series' description only: the topogram, the bone kernel and the MR stay.
    node = make_node([_qido(empty_pacs, description="h30S", body_part="head|brain")])
    puller = node.puller()

    assert puller.poll() == 1
    instances = node.instances()
    head_uid = _series_uid(study_files, HEAD)
    assert len(instances) == len(study_files[HEAD]) == 8
    assert {i.series_instance_uid for i in instances} == {head_uid}
    assert {i.calling_aet for i in instances} == {"pacs-web"}
    stored = {pydicom.dcmread(node.store.absolute(i.path)).SOPInstanceUID for i in instances}
    assert stored == {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in study_files[HEAD]}
    with node.database.read() as session:
        study = session.query(Study).one()
    assert (study.instance_count, study.state.value) == (8, "receiving")  # completion and analysis take it from here
    [row] = node.pulled()
    assert (row.series_instance_uid, row.source, row.pulled_instances) == (head_uid, "pacs-web", 8)
    first_poll = node.poll_row("pacs-web")
    assert first_poll.last_error is None and first_poll.succeeded_from is not None

    # The next poll looks back over the same study (overlap): nothing is pulled again.
    assert puller.poll() == 0
    assert [(i.id, i.received_at) for i in node.instances()] == [(i.id, i.received_at) for i in instances]
    assert [(r.id, r.pulled_at) for r in node.pulled()] == [(row.id, row.pulled_at)]
    with node.database.read() as session:
        again = session.query(Study).one()
    assert (again.last_received_at, again.state) == (study.last_received_at, study.state)
    assert node.poll_row("pacs-web").succeeded_from > first_poll.succeeded_from


def test_a_series_still_arriving_waits_to_settle_and_more_instances_are_pulled_later(
        empty_pacs: Orthanc, make_node, study_files) -> None:
    when = dt.datetime.now() - dt.timedelta(minutes=5)
    head = [ds for ds in _study(study_files, when, with_mr=False) if ds.SeriesDescription.endswith("H30s")]
    _upload(empty_pacs, head[:5])
    node = make_node([_qido(empty_pacs, description="H30s", settle_seconds=1)])
    puller = node.puller()

    assert puller.poll() == 0  # first seen: not pulled until its count has held for settle_seconds
    assert node.instances() == [] and node.pulled()[0].pulled_at is None
    wait_for(lambda: puller.poll() == 1, timeout=30, what="the settled series to be pulled")
    assert len(node.instances()) == 5

    _upload(empty_pacs, head[5:])  # the rest reaches the PACS later
    assert puller.poll() == 0  # its count changed: it settles again first
    wait_for(lambda: puller.poll() == 1, timeout=30, what="the grown series to be pulled again")
    assert len(node.instances()) == 8  # the five already stored are not duplicated
    assert node.pulled()[0].pulled_instances == 8


@pytest.mark.parametrize("retrieve", ["cmove", "cget"])
def test_cfind_then_cmove_or_cget_pulls_the_study(retrieve: str, empty_pacs: Orthanc, make_node,
                                                  study_files) -> None:
    _upload(empty_pacs, _study(study_files, dt.datetime.now() - dt.timedelta(minutes=30)))
    node = make_node([_cfind(empty_pacs, retrieve, description="CT HEAD"), _qido(empty_pacs)])

    assert node.puller(0).poll() == 3  # SCOUT, HEAD and BONE: the study's description matches; the MR is not CT
    instances = node.instances()
    assert len(instances) == 17
    # C-MOVE's instances come in through the SCP from the PACS's AE; C-GET's on the node's own association.
    assert {i.calling_aet for i in instances} == {empty_pacs.ae_title if retrieve == "cmove" else "pacs-cget"}
    assert {r.pulled_instances for r in node.pulled() if r.series_instance_uid == _series_uid(study_files, HEAD)} \
        == {8}
    # Another source that sees the same series (a second PACS route, the same archive) pulls none of them again.
    assert node.puller(1).poll() == 0
    assert len(node.instances()) == 17


def test_the_node_asks_what_findscu_asks(empty_pacs: Orthanc, make_node, study_files) -> None:
    """DCMTK findscu with the node's study-level keys finds the same studies as the node."""
    when = dt.datetime.now() - dt.timedelta(minutes=20)
    _upload(empty_pacs, _study(study_files, when))
    node = make_node([_cfind(empty_pacs, "cget")])
    found = node.puller().client.find(when - dt.timedelta(minutes=1))
    answer = subprocess.run(
        [require_tool("findscu"), "-S", "-aet", NODE_AET, "-aec", empty_pacs.ae_title, "127.0.0.1",
         str(empty_pacs.dicom_port), "-k", "QueryRetrieveLevel=STUDY", "-k", "ModalitiesInStudy=CT",
         "-k", f"StudyDate={when:%Y%m%d}-", "-k", "StudyInstanceUID", "-k", "StudyTime"],
        capture_output=True, text=True, timeout=30)
    assert answer.returncode == 0, answer.stderr
    study_uid = pydicom.dcmread(study_files[HEAD][0], stop_before_pixels=True).StudyInstanceUID
    assert study_uid in answer.stdout + answer.stderr
    assert {f.study_instance_uid for f in found} == {study_uid}
    assert {f.series_instance_uid for f in found} == {_series_uid(study_files, s) for s in study_files}


@pytest.mark.parametrize("kind", ["qido", "cfind"])
def test_a_pacs_that_is_down_fails_the_poll_and_the_window_stays(kind: str, tmp_path: Path, make_node, study_files,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    later = Orthanc(tmp_path / "later", ae_title="LATER", dicomweb=True,  # ports chosen, not started yet
                    modalities={"ichnode": (NODE_AET, make_node.port)})
    node = make_node([_qido(later, name="later") if kind == "qido" else _cfind(later, "cget", name="later")])
    puller = node.puller()
    with caplog.at_level(logging.WARNING, logger="node.pull"):
        assert puller.poll() == 0
    [line] = [r.getMessage() for r in caplog.records if r.name == "node.pull"]
    assert line.startswith("source later: poll failed, tried again in 60 s with the same window")
    assert ("QIDO-RS query" if kind == "qido" else "LATER@127.0.0.1") in line
    failed = node.poll_row("later")
    assert failed.succeeded_from is None and failed.last_error and failed.claimed_by is None
    status = io.StringIO()
    print_status(node.config, status)
    assert f"sources:       later ({kind}): no successful poll yet; poll at " in status.getvalue()
    assert f"failed: {failed.last_error}" in status.getvalue()

    later.start()
    try:
        # Scanned 20 hours ago: inside the first poll's lookback (24 h), which the failure kept.
        _upload(later, _study(study_files, dt.datetime.now() - dt.timedelta(hours=20), with_mr=False))
        assert puller.poll() == 3
    finally:
        later.stop()
    assert len(node.instances()) == 17
    recovered = node.poll_row("later")
    assert recovered.last_error is None and recovered.succeeded_from is not None
    status = io.StringIO()
    print_status(node.config, status)
    assert f"later ({kind}): last successful poll {recovered.succeeded_from:%Y-%m-%d %H:%M:%S} UTC\n" \
        in status.getvalue()


def test_serve_polls_each_source_on_its_interval(empty_pacs: Orthanc, make_node, study_files) -> None:
    """The scheduler of `ichnode serve` runs the poll as one of its jobs."""
    _upload(empty_pacs, _study(study_files, dt.datetime.now() - dt.timedelta(minutes=3), with_mr=False))
    node = make_node([_qido(empty_pacs, interval_seconds=1)])
    triage_log = TriageLog(node.config.log.path)
    built = Node(node.config, node.database, node.store, triage_log, None)
    commitments = Commitments(node.config, node.database, triage_log)
    scheduler = _scheduler(built, node.ingest,
                           Deliveries(node.config, node.database, node.store, DicomSender(NODE_AET, 5), triage_log,
                                      commitments=commitments),
                           Notifier(node.config, node.database, triage_log), commitments)
    [job] = [j for j in scheduler.get_jobs() if j.name == "pull pacs-web"]
    assert job.trigger.interval == dt.timedelta(seconds=1) and job.max_instances == 1 and job.coalesce
    scheduler.start()
    try:
        wait_for(lambda: len(node.instances()) == 17, timeout=60, what="the scheduled poll to pull the study")
        wait_for(lambda: node.poll_row("pacs-web").succeeded_from is not None, timeout=30, what="the poll recorded")
    finally:
        scheduler.shutdown(wait=True)
    assert len(node.pulled()) == 3


def test_processes_sharing_the_database_take_turns_polling_a_source(database_url: str) -> None:
    database = Database(database_url, create=True)
    now = utcnow()
    with database.write() as session:
        assert claim_poll(session, "pacs", "serve-a", now, now + dt.timedelta(minutes=2)) == (True, None)
    with database.write() as session:
        assert claim_poll(session, "pacs", "serve-b", now, now + dt.timedelta(minutes=2))[0] is False
    later = now + dt.timedelta(minutes=3)  # serve-a died: its claim went stale
    with database.write() as session:
        assert claim_poll(session, "pacs", "serve-b", later, later + dt.timedelta(minutes=2))[0] is True
    with database.write() as session:
        assert renew_poll(session, "pacs", "serve-a", later) is False  # serve-a, back, lost it
        finish_poll(session, "pacs", "serve-b", later, later, None)
    with database.write() as session:
        assert claim_poll(session, "pacs", "serve-a", later, later + dt.timedelta(minutes=2)) == (True, later)
    database.dispose()


@pytest.mark.parametrize("source, message", [
    ({"kind": "qido"}, r"sources\[0\]\.url is required"),
    ({"kind": "qido", "url": "http://pacs/dicom-web", "port": 104}, r"sources\[0\]\.port is not a key of a kind"),
    ({"kind": "qido", "url": "http://pacs/dicom-web", "auth": "basic"}, r"sources\[0\]\.auth = \"basic\" needs "
                                                                         r"sources\[0\]\.credentials_file"),
    ({"kind": "cfind", "ae_title": "PACS", "host": "pacs"}, r"sources\[0\]\.port is required"),
    ({"kind": "cfind", "ae_title": "PACS", "host": "pacs", "port": 104, "url": "http://x"},
     r"sources\[0\]\.url is not a key"),
    ({"kind": "cfind", "ae_title": "PACS", "host": "pacs", "port": 104, "retrieve": "ftp"},
     r"sources\[0\]\.retrieve must be one of cmove, cget"),
    ({"kind": "nfs"}, r"sources\[0\]\.kind must be one of qido, cfind"),
    ({"kind": "qido", "url": "http://pacs/dicom-web", "interval_seconds": 0}, r"sources\[0\]\.interval_seconds"),
    ({"kind": "qido", "url": "http://pacs/dicom-web", "name": "a-name-far-too-long"}, r"sources\[0\]\.name"),
])
def test_config_errors_name_the_key(tmp_path: Path, source: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"sources": [{"name": "pacs", **source}]}, tmp_path)


def test_the_documented_sources_examples_parse_with_the_default_values() -> None:
    """config.toml's commented [[sources]] examples say the defaults and are valid as written."""
    text = (Path(__file__).resolve().parent.parent / "config.toml").read_text()
    web, dimse = ("[[sources]]\n" + "\n".join(line[2:] for line in itertools.takewhile(
        lambda line: line.startswith("# "), block.splitlines())) for block in text.split("# [[sources]]\n")[1:])
    config = parse_config(tomllib.loads(web + "\n" + dimse), Path("."))
    assert config.sources[0] == Source("pacs-web", SourceKind.QIDO, url="https://pacs.example.org/dicom-web")
    assert config.sources[1] == Source("pacs-dimse", SourceKind.CFIND, ae_title="PACS", host="pacs.example.org",
                                       port=104, retrieve=Retrieve.CMOVE)


def test_source_names_are_unique(tmp_path: Path) -> None:
    web = {"name": "pacs", "kind": "qido", "url": "http://pacs/dicom-web"}
    with pytest.raises(ConfigError, match=r"sources: names must be unique, repeated: \['pacs'\]"):
        parse_config({"sources": [web, web]}, tmp_path)
