"""A study the model cannot answer for ends NOT TRIAGED: never flagged, never "not detected".
The analysis stage on real synthetic studies with a real (random-weight) model; the result
objects checked by dciodvfy, DCMTK dsrdump and highdicom."""

from __future__ import annotations

import dataclasses
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.analysis import AnalysisResult, AnalysisSettings, analyse
from node.output import DEMO_WARNING, ResultKind, encode, source_image
from node.reference import result_reference
from node.structured import ResultContext, Unanswered, build_not_triaged_sr
from node.worker import read_slice
from tests.conftest import require_tool
from tests.peers import dciodvfy_errors
from training.inference.predictor import Predictor
from training.inference.settings import Device
from training.model.architectures import create_model
from training.model.checkpoint import Provenance, default_model_config
from training.model.inputs import InputProfile
from training.model.rule import TriageRule
from training.model.scope import NOT_TRIAGED_LABEL, Reason, ReasonCode, Scope
from training.model.series import SliceHeader, read_header
from training.synthetic import Shift, SyntheticOptions, write_studies

SETTINGS = AnalysisSettings(rule=TriageRule(slice_threshold=0.0), min_slices=10, max_unusable_fraction=0.1,
                            key_slices=2, aug_smooth=False, objects=tuple(ResultKind), manufacturer="ichnode",
                            institution_name="Test Hospital", device_uid="1.2.826.0.1.3680043.8.498.77",
                            device_name="ICHNODE")


def _predictor(limit: float | None = None, scope: Scope = Scope()) -> Predictor:
    """A random ResNet18 declaring `scope`; with `limit`, an input profile at its pooled
    features (512) that every study is inside (a huge limit) or outside (a tiny one)."""
    config = dataclasses.replace(default_model_config("resnet18", Provenance(training_data="synthetic")), scope=scope)
    if limit is not None:
        config = dataclasses.replace(config, inputs=InputProfile(
            "avgpool", np.zeros(512), np.eye(512), limit, limit * 10, "test slices", "a test", 10))
    return Predictor(create_model("resnet18"), config, device=Device("cpu"), batch_size=8)


class CountingReader:
    def __init__(self) -> None:
        self.reads: list[str] = []

    def __call__(self, header: SliceHeader) -> Dataset:
        self.reads.append(header.sop_instance_uid)
        return read_slice(header)


def _headers(study: Path, **changes: str) -> list[SliceHeader]:
    return [dataclasses.replace(read_header(path), **changes) for path in sorted(study.rglob("*.dcm"))]


@pytest.fixture(scope="module")
def abdomen_label(positive_study: Path) -> AnalysisResult:
    """A bleeding head study whose header says ABDOMEN: stopped before the model."""
    return analyse(_headers(positive_study, body_part="ABDOMEN"), CountingReader(), _predictor(), SETTINGS,
                   series_number=9900)


def test_out_of_scope_is_not_triaged_before_the_model_runs(positive_study: Path) -> None:
    reader = CountingReader()
    result = analyse(_headers(positive_study, body_part="ABDOMEN"), reader, _predictor(), SETTINGS,
                     series_number=9900)
    assert not result.triaged and not result.positive and result.verdict is None
    assert result.label == NOT_TRIAGED_LABEL and len(result.probabilities) == 0
    assert [r.code for r in result.reasons] == [ReasonCode.NOT_HEAD]
    assert len(reader.reads) == 3  # the middle slices, for the image check; no slice went through the model
    assert "inference" not in result.timings
    assert {kind: len(ds) for kind, ds in result.objects.items()} == {ResultKind.SC: 1, ResultKind.SR: 1}


def test_the_picture_says_not_triaged_and_why(abdomen_label: AnalysisResult, tmp_path: Path) -> None:
    (sc,) = abdomen_label.objects[ResultKind.SC]
    assert "AI ICH TRIAGE: NOT TRIAGED" in sc.ImageComments and "BodyPartExamined is ABDOMEN" in sc.ImageComments
    assert "neither flagged nor cleared" in sc.ImageComments
    assert "SUSPECTED" not in sc.ImageComments and "not detected" not in sc.ImageComments
    assert sc.SeriesDescription == "AI ICH: NOT TRIAGED (DEMO, NOT CLINICAL)"
    assert sc.DerivationDescription.startswith("Scope and input checks")
    path = tmp_path / "sc.dcm"
    path.write_bytes(encode(sc))
    report = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert not errors, errors


def test_the_sr_says_the_finding_was_not_evaluated(abdomen_label: AnalysisResult, tmp_path: Path) -> None:
    (sr,) = abdomen_label.objects[ResultKind.SR]
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(sr))
    report = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True)
    assert not [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    dump = subprocess.run([require_tool("dsrdump"), "+Pu", "+Pl", str(path)], capture_output=True, text=True,
                          timeout=60)
    assert dump.returncode == 0, dump.stderr
    assert '"Not Evaluated")' in dump.stdout and '"Not a head CT")' in dump.stdout
    assert "Suspected" not in dump.stdout and "Not detected" not in dump.stdout
    read = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    (group,) = hd.sr.MeasurementReport.from_sequence([read]).get_image_measurement_groups()
    evaluations = [(e.name.meaning, e.value.meaning) for e in group.get_qualitative_evaluations()]
    assert evaluations == [("Intracranial hemorrhage (disorder)", "Not Evaluated"),
                           ("Reason the study was not triaged", "Not a head CT")]
    assert group.get_measurements() == []  # no ICH score: it would mean nothing
    assert '<contains TEXT:(,,"Qualitative Evaluations")="Not a head CT: BodyPartExamined is ABDOMEN' in dump.stdout


def test_each_kind_of_reason_is_coded_once_with_every_finding_in_words(positive_study: Path,
                                                                       tmp_path: Path) -> None:
    """Two checks can find the same kind of reason (the header and the images both say it
    is not a head): the SR codes it once, and says what each found in one TEXT item."""
    header = _headers(positive_study)[0]
    reference = result_reference(read_slice(header))
    reasons = [Reason(ReasonCode.NOT_HEAD, "BodyPartExamined is ABDOMEN"),
               Reason(ReasonCode.CONTRAST, "IV contrast was given (ContrastBolusAgent)"),
               Reason(ReasonCode.NOT_HEAD, "the images do not show a head"),
               Reason(ReasonCode.NOT_HEAD, "BodyPartExamined is ABDOMEN")]
    context = ResultContext("ichnode", "Test Hospital", "1.2.826.0.1.3680043.8.498.77", "ICHNODE", "resnet18",
                            "test", [DEMO_WARNING])
    sr = build_not_triaged_sr(reference, [source_image(header)], Unanswered(reasons, TriageRule()), context,
                              series_number=9901, series_description="AI ICH: NOT TRIAGED report")
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode(sr))
    assert dciodvfy_errors(path) == []
    dump = subprocess.run([require_tool("dsrdump"), "+Pl", str(path)], capture_output=True, text=True, timeout=60)
    assert dump.returncode == 0, dump.stderr
    coded = [line.strip() for line in dump.stdout.splitlines() if '"Reason the study was not triaged")' in line]
    assert coded == ['<contains CODE:(,,"Reason the study was not triaged")=(not-head,99ICHNODE,"Not a head CT")>',
                     '<contains CODE:(,,"Reason the study was not triaged")=(contrast,99ICHNODE,'
                     '"Scan after IV contrast")>']
    texts = [line.strip() for line in dump.stdout.splitlines() if '"Qualitative Evaluations")' in line]
    assert texts == ['<contains TEXT:(,,"Qualitative Evaluations")="Not a head CT: BodyPartExamined is ABDOMEN; '
                     'the images do not show a head">',
                     '<contains TEXT:(,,"Qualitative Evaluations")="Scan after IV contrast: IV contrast was given '
                     '(ContrastBolusAgent)">']


def test_a_study_without_a_ct_series_is_not_triaged(positive_study: Path) -> None:
    scout_only = [h for h in _headers(positive_study) if "LOCALIZER" in h.image_type]
    result = analyse(scout_only, read_slice, _predictor(), SETTINGS, series_number=9900)
    assert not result.triaged and result.choice is None
    assert [r.code for r in result.reasons] == [ReasonCode.NO_SERIES] and "a localizer" in result.reasons[0].text
    (sr,) = result.objects[ResultKind.SR]
    assert sr.StudyInstanceUID == pydicom.dcmread(scout_only[0].path).StudyInstanceUID  # into the study itself
    cited = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert [c.ReferencedSOPInstanceUID for c in cited] == [scout_only[0].sop_instance_uid]


def test_inputs_unlike_the_training_data_are_not_triaged_after_the_model(positive_study: Path) -> None:
    result = analyse(_headers(positive_study), read_slice, _predictor(limit=1e-6), SETTINGS, series_number=9900)
    assert not result.triaged and not result.positive and result.verdict is None
    assert [r.code for r in result.reasons] == [ReasonCode.OUT_OF_DISTRIBUTION]
    assert result.inputs is not None and result.inputs.outside and result.inputs.slices == len(result.probabilities)
    assert len(result.probabilities) > 0  # the model ran: its raw output is kept for the log, not shown
    assert "out-of-distribution score" in result.reasons[0].text
    assert ResultKind.KOS not in result.objects  # no key slices of interest
    (sc,) = result.objects[ResultKind.SC]
    assert "NOT TRIAGED" in sc.ImageComments


def test_inside_the_training_inputs_the_verdict_stands(positive_study: Path) -> None:
    result = analyse(_headers(positive_study), read_slice, _predictor(limit=1e12), SETTINGS, series_number=9900)
    assert result.triaged and result.positive and result.reasons == ()
    assert result.inputs is not None and not result.inputs.outside


def test_without_abstention_the_raw_verdict_is_given_and_the_findings_kept(positive_study: Path) -> None:
    """A silent trial (triage.abstain = false) sees what the model says and what the checks found."""
    settings = dataclasses.replace(SETTINGS, abstain=False)
    result = analyse(_headers(positive_study, body_part="ABDOMEN"), read_slice, _predictor(limit=1e-6), settings,
                     series_number=9900)
    assert result.triaged and result.positive and result.verdict is not None
    assert [r.code for r in result.reasons] == [ReasonCode.NOT_HEAD, ReasonCode.OUT_OF_DISTRIBUTION]


def test_an_unreadable_series_fails_saying_why_even_out_of_scope(positive_study: Path) -> None:
    """Broken pixels tell an admin more than the scope does: the study fails, as before."""
    from node.errors import InvalidInstance

    def broken(header: SliceHeader) -> Dataset:
        ds = read_slice(header)
        ds.RescaleSlope = 0
        return ds

    with pytest.raises(InvalidInstance, match="RescaleSlope 0"):
        analyse(_headers(positive_study, body_part="ABDOMEN"), broken, _predictor(), SETTINGS, series_number=9900)


def test_every_reason_has_a_code_in_the_sr() -> None:
    from node.structured import REASON_CODES

    assert set(REASON_CODES) == set(ReasonCode)
    assert len({code.value for code in REASON_CODES.values()}) == len(ReasonCode)


def _clips(folder: Path, slices: int) -> list[SliceHeader]:
    (labels,) = write_studies(folder, SyntheticOptions(studies=1, seed=23, shift=Shift.METAL, min_slices=slices,
                                                       max_slices=slices))
    return _headers(labels.folder)


def test_a_study_with_clips_is_not_triaged_for_its_metal(tmp_path: Path) -> None:
    """The clips lie below the middle of 32 slices: the scan finds them on the slices it
    reads, each slice read once; the reason is in the result and the SR codes it. A
    scope that supports metal gives a verdict."""
    headers = _clips(tmp_path, 32)
    reader = CountingReader()
    result = analyse(headers, reader, _predictor(), SETTINGS, series_number=9900)
    assert not result.triaged and result.verdict is None
    (reason,) = result.reasons
    assert reason.code == ReasonCode.METAL and "inside the skull on 6 of 32 slices" in reason.text
    assert sorted(reader.reads) == sorted(h.sop_instance_uid for h in headers)
    read = hd.sr.Comprehensive3DSR.from_dataset(result.objects[ResultKind.SR][0])
    (group,) = hd.sr.MeasurementReport.from_sequence([read]).get_image_measurement_groups()
    assert [e.value.meaning for e in group.get_qualitative_evaluations()] == ["Not Evaluated",
                                                                               "Metal inside the skull"]
    assert analyse(headers, read_slice, _predictor(scope=Scope(metal_check=False)), SETTINGS,
                   series_number=9900).triaged


def test_streaks_through_the_middle_slices_are_named_for_their_metal(tmp_path: Path) -> None:
    """Over 22 slices the clips' streaks cross the middle slices the head check reads and
    hide the brain's density: the reason is the metal, found before the model runs."""
    reader = CountingReader()
    result = analyse(_clips(tmp_path, 22), reader, _predictor(), SETTINGS, series_number=9900)
    assert [r.code for r in result.reasons] == [ReasonCode.METAL]
    assert "of 3 middle slices" in result.reasons[0].text and len(reader.reads) == 3
