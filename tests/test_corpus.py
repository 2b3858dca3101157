"""The conformance corpus: real scanner CT of several vendors (tests/data/README.md, with
each file's source and licence) sent by DCMTK storescu through the node, with the shipped
demonstration model, to Orthanc. No study ends *failed*: each is analysed, on the series
a radiographer would choose, or NOT TRIAGED for a named reason; every result passes
dciodvfy. The demonstration model was trained on synthetic phantoms, so real CT is
expected to lie outside its training inputs: the test checks the node, not the model."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from node.triagelog import read_events
from tests.peers import (
    NodeProcess,
    Orthanc,
    dciodvfy_errors,
    free_port,
    node_config,
    storescu,
    wait_for,
)

CORPUS = Path(__file__).parent / "data" / "corpus"
DEMO_MODEL = Path(__file__).parent.parent / "models" / "effclass-synthetic-demo.pt"
# What each study must come to with the demonstration model: the reasons it is not
# triaged (real CT is unlike its synthetic training data; single slices are no series; a
# phantom has no skull around brain).
EXPECTED_REASONS = {
    "elscint-head-jpeg-lossless": ["no_series"],
    "toshiba-aquilion-head-j2k": ["no_series"],
    "hitachi-supria-head-j2k": ["no_series"],
    "ge-hispeed-head-tilt": ["out_of_distribution"],
    "ge-hispeed-head-tilt-enhanced-dcmulti": ["out_of_distribution"],
    "philips-ingenuity-head-phantom": ["not_head"],
}


# The storescu option that proposes a compressed transfer syntax, so each file is sent as
# the scanner wrote it (storescu proposes uncompressed syntaxes otherwise).
PROPOSE = {"1.2.840.10008.1.2.4.70": ["-xs"], "1.2.840.10008.1.2.4.80": ["-xt"], "1.2.840.10008.1.2.4.81": ["-xu"],
           "1.2.840.10008.1.2.4.90": ["-xv"], "1.2.840.10008.1.2.4.91": ["-xw"], "1.2.840.10008.1.2.5": ["-xr"]}


def _by_transfer_syntax(files: list[Path]) -> dict[str, list[Path]]:
    groups: dict[str, list[Path]] = {}
    for path in files:
        groups.setdefault(str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID),
                          []).append(path)
    return groups


def _manifest() -> dict[str, dict]:
    return {study["name"]: study for study in json.loads((CORPUS / "manifest.json").read_text())}


def _as_own_study(folder: Path, out: Path) -> tuple[str, list[Path]]:
    """The corpus study's files, under a StudyInstanceUID of its own when another corpus
    study shares it (the Enhanced CT copy of the GE series)."""
    study_uid = generate_uid()
    out.mkdir(parents=True)
    files = []
    for path in sorted(folder.rglob("*.dcm")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID = study_uid
        ds.save_as(out / path.name)
        files.append(out / path.name)
    return study_uid, files


def test_the_manifest_names_a_source_and_licence_for_every_study() -> None:
    manifest = _manifest()
    assert set(manifest) == set(EXPECTED_REASONS) == {p.name for p in CORPUS.iterdir() if p.is_dir()}
    vendors = {study["vendor"] for study in manifest.values() if study["vendor"]}
    assert len(vendors) >= 4, vendors
    for name, study in manifest.items():
        assert study["source"] and study["licence"], name
        assert len(list((CORPUS / name).rglob("*.dcm"))) == study["files"], name


@pytest.mark.timeout(900)
def test_every_corpus_study_ends_analysed_with_valid_results(tmp_path: Path) -> None:
    manifest = _manifest()
    studies: dict[str, tuple[str, list[Path]]] = {}
    for name in EXPECTED_REASONS:
        files = sorted((CORPUS / name).rglob("*.dcm"))
        uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        if name.endswith("-enhanced-dcmulti"):
            uid, files = _as_own_study(CORPUS / name, tmp_path / name)
        studies[name] = (uid, files)
    orthanc = Orthanc(tmp_path / "orthanc").start()
    port = free_port()
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=DEMO_MODEL,
                                             destinations=[("pacs", "PACS", orthanc.dicom_port)]), port)
    node.start()

    def outcomes() -> dict[str, dict]:
        return {e["study_instance_uid"]: e for e in read_events(tmp_path / "triage.log")
                if e["event"] in ("analysed", "failed")}

    try:
        for name, (_, files) in studies.items():
            for syntax, group in _by_transfer_syntax(files).items():
                sent = storescu(port, group, extra=PROPOSE.get(syntax, []))
                assert sent.returncode == 0, f"{name}: {sent.stderr}"
        wait_for(lambda: len(outcomes()) == len(studies), timeout=600, what="every corpus study analysed")
        delivered = sum(len(e["result_sets"]) for e in outcomes().values() if e["event"] == "analysed")
        wait_for(lambda: sum(e["event"] == "delivered" for e in read_events(tmp_path / "triage.log")) == delivered,
                 timeout=300, what="every result delivered")
        results = [(s["MainDicomTags"].get("SeriesDescription", ""), i) for s in orthanc.get("/series?expand")
                   for i in s["Instances"] if s["MainDicomTags"].get("SeriesDescription", "").startswith("AI ICH")]
        files = []
        for description, instance in results:
            files.append(tmp_path / f"result-{instance}.dcm")
            files[-1].write_bytes(orthanc.get_bytes(f"/instances/{instance}/file"))
    finally:
        node.stop()
        orthanc.stop()

    found = outcomes()
    for name, (uid, _) in studies.items():
        event = found[uid]
        assert event["event"] == "analysed", f"{name} failed: {event.get('reason')}"
        assert [r["code"] for r in event["not_triaged"]] == EXPECTED_REASONS[name], name
        expected_series = manifest[name]["expected_series"]
        if EXPECTED_REASONS[name] != ["no_series"]:
            assert event["series_instance_uid"] == expected_series, name
    assert len(files) >= 2 * len(studies)  # an SC and an SR for each study at the least
    for path in files:
        assert dciodvfy_errors(path) == [], path.name
