"""node.structured: the TID 1500 SR and the Key Object Selection document of a real analysis
(synthetic study), checked by dciodvfy, DCMTK dsrdump and highdicom reading them back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from node.analysis import AnalysisResult, AnalysisSettings, analyse
from node.output import KosFor, ResultKind, encode
from node.structured import NOT_DETECTED
from node.worker import read_slice
from tests.conftest import require_tool
from tests.peers import dciodvfy_errors
from training.inference.predictor import Predictor
from training.inference.settings import Device
from training.model.architectures import create_model
from training.model.checkpoint import Provenance, default_model_config
from training.model.rule import TriageRule
from training.model.series import read_header

DEVICE_UID = "1.2.826.0.1.3680043.8.498.77"


def _analysis(study: Path, rule: TriageRule, *, objects: tuple[ResultKind, ...] = tuple(ResultKind),
              kos_for: KosFor = KosFor.FLAGGED) -> AnalysisResult:
    config = default_model_config("resnet18", Provenance(training_data="synthetic"))
    predictor = Predictor(create_model("resnet18"), config, device=Device("cpu"))
    settings = AnalysisSettings(rule=rule, min_slices=10, max_unusable_fraction=0.1, key_slices=3, aug_smooth=False,
                                objects=objects, manufacturer="ichnode", institution_name="Test Hospital",
                                device_uid=DEVICE_UID, device_name="ICHNODE", kos_for=kos_for)
    headers = [read_header(path) for path in sorted(study.rglob("*.dcm"))]
    return analyse(headers, read_slice, predictor, settings, series_number=9900)


@pytest.fixture(scope="module")
def flagged(positive_study: Path) -> AnalysisResult:
    return _analysis(positive_study, TriageRule(slice_threshold=0.0))  # every slice above: SUSPECTED


@pytest.fixture(scope="module")
def cleared(negative_study: Path) -> AnalysisResult:
    return _analysis(negative_study, TriageRule(slice_threshold=0.999))  # no slice above: not detected


def _written(result: AnalysisResult, kind: ResultKind, folder: Path) -> Path:
    (ds,) = result.objects[kind]
    path = folder / f"{kind}.dcm"
    path.write_bytes(encode(ds))
    return path


def _key_slice_uids(result: AnalysisResult) -> list[str]:
    return [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in result.objects[ResultKind.SC][:-1]]


@pytest.mark.parametrize("kind", [ResultKind.SR, ResultKind.KOS])
def test_dciodvfy_finds_no_errors(kind: ResultKind, flagged: AnalysisResult, tmp_path: Path) -> None:
    report = subprocess.run([require_tool("dciodvfy"), str(_written(flagged, kind, tmp_path))],
                            capture_output=True, text=True)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


@pytest.mark.parametrize(("fixture", "finding"), [("flagged", "Suspected"), ("cleared", "Not detected")])
def test_dsrdump_shows_the_finding_and_the_key_slices(fixture: str, finding: str, tmp_path: Path,
                                                      request: pytest.FixtureRequest) -> None:
    result = request.getfixturevalue(fixture)
    dump = subprocess.run([require_tool("dsrdump"), "+Pu", "+Pl", str(_written(result, ResultKind.SR, tmp_path))],
                          capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert 'CODE:(,,"Intracranial hemorrhage (disorder)")' in dump.stdout and f'"{finding}")' in dump.stdout
    assert '"Computed tomography of head (procedure)"' in dump.stdout  # the procedure, not the algorithm
    assert "DEMO MODEL - SYNTHETIC DATA - NOT FOR CLINICAL USE" in dump.stdout
    for uid in _key_slice_uids(result):
        assert uid in dump.stdout
    # Slice counts read as whole numbers, not "30.0".
    assert f'"Slices analysed")="{result.verdict.total_slices}" ' in dump.stdout
    assert f'"Slices above the slice threshold")="{result.verdict.positive_slices}" ' in dump.stdout


def test_the_sr_reads_back_with_its_coded_content(flagged: AnalysisResult) -> None:
    (sr,) = flagged.objects[ResultKind.SR]
    read = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode(sr))))
    (group,) = hd.sr.MeasurementReport.from_sequence([read]).get_image_measurement_groups()
    evaluations = {e.name.meaning: e.value.meaning for e in group.get_qualitative_evaluations()}
    assert evaluations == {"Intracranial hemorrhage (disorder)": "Suspected"}
    measured = {m.name.meaning: m.value for m in group.get_measurements()}
    assert measured["Slices analysed"] == flagged.verdict.total_slices
    assert measured["Maximum slice probability of ICH"] == pytest.approx(flagged.verdict.study_score, abs=1e-4)
    assert sorted(i.referenced_sop_instance_uid for i in group.source_images) == sorted(_key_slice_uids(flagged))
    assert read.SeriesDescription == "AI ICH: SUSPECTED - PRIORITY report (DEMO, NOT CLINICAL)"
    purposes = {e.PurposeOfReferenceCodeSequence[0].CodeMeaning: e for e in read.ContributingEquipmentSequence}
    assert purposes["Processing Algorithm"].ManufacturerModelName == "ichnode resnet18"
    assert read.VerificationFlag == "UNVERIFIED" and read.CompletionFlag == "COMPLETE"


def test_the_kos_selects_exactly_the_key_slices(flagged: AnalysisResult) -> None:
    (kos,) = flagged.objects[ResultKind.KOS]
    read = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(pydicom.filebase.DicomBytesIO(encode(kos))))
    assert read.ConceptNameCodeSequence[0].CodeMeaning == "Of Interest"
    referenced = [ref.ReferencedSOPInstanceUID for item in read.CurrentRequestedProcedureEvidenceSequence
                  for series in item.ReferencedSeriesSequence for ref in series.ReferencedSOPSequence]
    assert sorted(referenced) == sorted(_key_slice_uids(flagged))
    assert read.SeriesDescription == "AI ICH: SUSPECTED - PRIORITY slices (DEMO, NOT CLINICAL)"
    (said,) = [item.TextValue for item in read.ContentSequence
               if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeMeaning == "Key Object Description"]
    assert said == f"{read.SeriesDescription}. DEMO MODEL - SYNTHETIC DATA - NOT FOR CLINICAL USE"


def test_a_study_not_flagged_gets_no_kos_by_default(cleared: AnalysisResult) -> None:
    assert cleared.verdict.positive is False and NOT_DETECTED.meaning == "Not detected"
    assert list(cleared.objects) == [ResultKind.SC, ResultKind.SR]  # output.kos_for = "flagged"


def test_kos_for_all_selects_the_key_slices_of_a_study_not_flagged(negative_study: Path, tmp_path: Path) -> None:
    result = _analysis(negative_study, TriageRule(slice_threshold=0.999), objects=(ResultKind.SR, ResultKind.KOS),
                       kos_for=KosFor.ALL)
    assert not result.positive and list(result.objects) == [ResultKind.SR, ResultKind.KOS]
    (kos,) = result.objects[ResultKind.KOS]
    assert kos.SeriesDescription == "AI ICH: not detected slices (DEMO, NOT CLINICAL)"
    assert dciodvfy_errors(_written(result, ResultKind.KOS, tmp_path)) == []


def test_a_kos_alone_for_a_study_not_flagged_gives_the_sr(negative_study: Path, tmp_path: Path) -> None:
    """Only a KOS asked for, and none due: the SR goes instead, as every result has an object set."""
    result = _analysis(negative_study, TriageRule(slice_threshold=0.999), objects=(ResultKind.KOS,))
    assert list(result.objects) == [ResultKind.SR]
    assert dciodvfy_errors(_written(result, ResultKind.SR, tmp_path)) == []
