"""Real scanner headers never end in a code error.

The one attribute reader (training/model/attributes.py) answers absent, empty and
malformed values alike; every attribute the node reads, except those the standard makes
Type 1 for a CT image, is stripped from a series in turn and the study still ends
*analysed* with SC, SR and KOS that pass dciodvfy; odd but real header values (PatientSex
"MALE", a 1980 birth date, ISO 2022 character sets, an over-long AccessionNumber) give
valid results too; Enhanced CT frames give the classic slices' probabilities exactly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import torch
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid

from node.analysis import AnalysisResult, AnalysisSettings, analyse, failure_notice
from node.output import KosFor, ResultKind, encode
from node.reference import COPIED, result_reference
from storage.errors import InvalidInstance
from tests.peers import dciodvfy_errors
from training.inference.predictor import Predictor
from training.inference.settings import Device
from training.model import attributes as attr
from training.model.architectures import create_model
from training.model.checkpoint import Provenance, default_model_config
from training.model.rule import TriageRule
from training.model.scope import NOT_TRIAGED_LABEL, Scope
from training.model.series import read_headers
from training.model.slices import CONTRAST_ATTRIBUTES, HEADER_ATTRIBUTES, read_slice
from training.synthetic import SyntheticOptions, write_studies

SETTINGS = AnalysisSettings(rule=TriageRule(slice_threshold=0.5), min_slices=10, max_unusable_fraction=0.1,
                            key_slices=2, aug_smooth=False, objects=tuple(ResultKind), manufacturer="ichnode",
                            institution_name="Test Hospital", device_uid="1.2.826.0.1.3680043.8.498.77",
                            device_name="ICHNODE", kos_for=KosFor.ALL)  # a KOS (its frames) whatever the verdict
# Type 1 in the modules of a CT Image (PS3.3 A.3): a file without them is not a CT image.
CT_TYPE_1 = {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "ImageType",
             "FrameOfReferenceUID", "ImageOrientationPatient", "ImagePositionPatient", "PixelSpacing",
             "SamplesPerPixel", "PhotometricInterpretation", "Rows", "Columns", "BitsAllocated", "BitsStored",
             "HighBit", "PixelRepresentation", "RescaleIntercept", "RescaleSlope", "PixelData"}
READ = sorted(({*HEADER_ATTRIBUTES, *CONTRAST_ATTRIBUTES, *(k for k, _, _ in COPIED), "SpecificCharacterSet"})
              - CT_TYPE_1)


# --- the reader -----------------------------------------------------------------------


def _raw(ds: Dataset, tag: int, vr: str, value: bytes) -> None:
    ds[tag] = RawDataElement(Tag(tag), vr, len(value), value, 0, False, True)


def test_absent_empty_and_malformed_read_alike() -> None:
    ds = Dataset()
    _raw(ds, 0x00200013, "IS", b"abc ")  # InstanceNumber
    _raw(ds, 0x00180050, "DS", b"")  # SliceThickness, empty
    _raw(ds, 0x00200032, "DS", b"1\\x\\3 ")  # ImagePositionPatient, one part not a number
    _raw(ds, 0x00100030, "DA", b"19800231")  # PatientBirthDate, no such day
    for keyword in ("InstanceNumber", "SliceThickness", "PatientAge"):
        assert attr.integer(ds, keyword) is None and attr.number(ds, keyword) is None
    assert attr.numbers(ds, "ImagePositionPatient", 3) is None
    assert attr.date(ds, "PatientBirthDate") is None and attr.text(ds, "PatientBirthDate") == "19800231"
    assert attr.items(ds, "AnatomicRegionSequence") == [] and attr.words(ds, "ImageType") == ()
    assert attr.number_or_error(ds, "RescaleSlope") is None  # absent
    with pytest.raises(attr.MalformedAttribute, match="InstanceNumber"):
        attr.number_or_error(ds, "InstanceNumber")  # present, not a number


def test_a_whole_decimal_counts_as_an_integer() -> None:
    ds = Dataset()
    _raw(ds, 0x00200013, "IS", b"12.0")
    assert attr.integer(ds, "InstanceNumber") == 12


# --- stripping every attribute the node reads ------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("headers")
    write_studies(root, SyntheticOptions(studies=1, seed=3, positive_fraction=1.0, min_slices=10, max_slices=10))
    return root / "study_0000" / "HEAD"


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    torch.manual_seed(0)
    # Ten slices keep the test short; the scope's coverage check would refuse them.
    config = dataclasses.replace(default_model_config("resnet18", Provenance(training_data="synthetic")),
                                 scope=Scope(min_coverage_mm=0.0))
    return Predictor(create_model("resnet18"), config, device=Device("cpu"), batch_size=8)


def _variant(study: Path, folder: Path, change) -> list[Path]:
    """The series with `change(ds)` applied to every slice, written to `folder`."""
    folder.mkdir()
    paths = []
    for source in sorted(study.glob("*.dcm")):
        ds = pydicom.dcmread(source)
        change(ds)
        paths.append(folder / source.name)
        ds.save_as(paths[-1])
    return paths


def _analysed(paths: list[Path], predictor: Predictor, tmp_path: Path) -> AnalysisResult:
    """The study analysed, with every result object passing dciodvfy."""
    headers = [header for path in paths for header in read_headers(path)]
    result = analyse(headers, read_slice, predictor, SETTINGS, series_number=9900)
    assert result.label in ("SUSPECTED - PRIORITY", "not detected", NOT_TRIAGED_LABEL)
    if not result.triaged:
        assert result.reasons and all(reason.text for reason in result.reasons)
    assert ResultKind.SR in result.objects
    for kind, datasets in result.objects.items():
        for number, ds in enumerate(datasets):
            path = tmp_path / f"{kind}-{number}.dcm"
            path.write_bytes(encode(ds))
            assert dciodvfy_errors(path) == [], f"{kind} {number}"
    return result


@pytest.mark.parametrize("keyword", READ)
def test_a_series_without_each_attribute_is_analysed_with_valid_results(
    keyword: str, study: Path, predictor: Predictor, tmp_path: Path
) -> None:
    def strip(ds: Dataset) -> None:
        if keyword in ds:
            delattr(ds, keyword)

    result = _analysed(_variant(study, tmp_path / "series", strip), predictor, tmp_path)
    (sc, *_) = result.objects[ResultKind.SC]
    if keyword in {k for k, _, kind in COPIED if kind == "2"}:
        assert keyword in sc and sc[keyword].value in ("", None)  # Type 2: present and empty


# Values real headers hold that their VR does not allow, or that only a few readers know.
ODD_VALUES = {
    "sex U": {"PatientSex": "U"}, "sex m": {"PatientSex": "m"}, "sex MALE": {"PatientSex": "MALE"},
    "birth year only": {"PatientBirthDate": "1980"}, "birth 31 Feb": {"PatientBirthDate": "19800231"},
    "birth ISO": {"PatientBirthDate": "1980-02-03"}, "time 25:61": {"StudyTime": "25:61"},
    "accession 20 chars": {"AccessionNumber": "A" * 20},
    "japanese": {"SpecificCharacterSet": ["", "ISO 2022 IR 87"], "PatientName": "Yamada^Tarou=山田^太郎"},
    "korean": {"SpecificCharacterSet": ["", "ISO 2022 IR 149"], "PatientName": "Hong^Gildong=洪^吉洞"},
    "latin-1": {"SpecificCharacterSet": "ISO_IR 100", "PatientName": "Müller^Jürgen"},
    "unknown charset": {"SpecificCharacterSet": "ISO_IR 999"},
    "instance number text": {"InstanceNumber": "abc"}, "thickness text": {"SliceThickness": "x.5"},
    "kernel multi-valued": {"ConvolutionKernel": ["Hr38", "3"]},
    "name not UTF-8": {"SpecificCharacterSet": "ISO_IR 192", "PatientName": b"M\xfcller^J\xfcrgen"},
}


@pytest.mark.parametrize("name", ODD_VALUES)
def test_odd_header_values_give_valid_results(name: str, study: Path, predictor: Predictor, tmp_path: Path) -> None:
    values = ODD_VALUES[name]

    def change(ds: Dataset) -> None:
        for keyword, value in values.items():
            if keyword in ("InstanceNumber", "SliceThickness", "StudyTime", "PatientBirthDate", "PatientName") \
                    and not isinstance(value, list) and (keyword != "PatientName" or isinstance(value, bytes)):
                tag = Tag(keyword)
                raw = value if isinstance(value, bytes) else value.encode()
                _raw(ds, int(tag), pydicom.datadict.dictionary_VR(tag), raw + (b" " if len(raw) % 2 else b""))
            else:
                setattr(ds, keyword, value)

    result = _analysed(_variant(study, tmp_path / "series", change), predictor, tmp_path)
    assert len(result.probabilities) == 10  # no slice was dropped for a value the analysis does not need
    (sc, *_) = result.objects[ResultKind.SC]
    # Carried through where highdicom can write it (it names the default "ISO 2022 IR 6"); UTF-8 otherwise.
    expected = {"japanese": ["ISO 2022 IR 6", "ISO 2022 IR 87"], "korean": "ISO_IR 192", "latin-1": "ISO_IR 100",
                "unknown charset": "ISO_IR 192"}
    if name in expected:
        assert sc.SpecificCharacterSet == expected[name]
    if isinstance(values.get("PatientName"), str):
        assert str(sc.PatientName) == values["PatientName"]
    if name == "name not UTF-8":  # the name as its bytes meant it, or empty: never another name
        assert str(sc.PatientName) in ("", "Müller^Jürgen")


def test_the_reference_keeps_valid_values_and_empties_invalid_type_2() -> None:
    source = Dataset()
    source.PatientName, source.PatientSex, source.PatientBirthDate = "Doe^Jane", "MALE", "19800203"
    source.StudyInstanceUID, source.AccessionNumber, source.StudyTime = "1.2.3", "X" * 17, "101500.25"
    source.Manufacturer = "GE MEDICAL SYSTEMS"
    reference = result_reference(source)
    assert (str(reference.PatientName), reference.PatientBirthDate, reference.StudyTime) == ("Doe^Jane", "19800203",
                                                                                            "101500.25")
    assert reference.PatientSex == "" and reference.AccessionNumber == "" and reference.StudyID == ""
    assert reference.Manufacturer == "GE MEDICAL SYSTEMS" and "StudyDescription" not in reference


# --- Enhanced CT ------------------------------------------------------------------------


def test_enhanced_ct_frames_give_the_classic_slices_probabilities(
    study: Path, predictor: Predictor, tmp_path: Path
) -> None:
    paths = sorted(study.glob("*.dcm"))
    classic = analyse([h for p in paths for h in read_headers(p)], read_slice, predictor, SETTINGS,
                      series_number=9900)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        [pydicom.dcmread(p) for p in paths], series_instance_uid=generate_uid(), series_number=50,
        sop_instance_uid=generate_uid(), instance_number=1)
    enhanced.save_as(tmp_path / "enhanced.dcm")
    frames = read_headers(tmp_path / "enhanced.dcm")
    assert len(frames) == len(paths) and {f.frame for f in frames} == set(range(1, len(paths) + 1))
    result = _analysed([tmp_path / "enhanced.dcm"], predictor, tmp_path)
    assert result.triaged and result.label == classic.label
    np.testing.assert_array_equal(result.probabilities, classic.probabilities)
    assert result.key_slices == classic.key_slices

    # SR, KOS and SC cite the key slices by frame number.
    keys = {result.choice.slices[i].frame for i in result.key_slices}
    (kos,) = result.objects[ResultKind.KOS]
    cited = [item.ReferencedSOPSequence[0] for item in kos.ContentSequence if item.ValueType == "IMAGE"]
    assert [c.ReferencedSOPInstanceUID for c in cited] == [enhanced.SOPInstanceUID]
    assert set(np.atleast_1d(cited[0].ReferencedFrameNumber)) == keys
    (sr,) = result.objects[ResultKind.SR]
    sr_frames = {int(f) for e in sr.iterall() if e.keyword == "ReferencedFrameNumber" for f in np.atleast_1d(e.value)}
    assert sr_frames == keys
    sc_frames = {sc.SourceImageSequence[0].ReferencedFrameNumber for sc in result.objects[ResultKind.SC]
                 if "SourceImageSequence" in sc}
    assert sc_frames == keys



def test_a_failed_analysis_gets_a_notice_a_radiologist_can_read(
    study: Path, predictor: Predictor, tmp_path: Path
) -> None:
    headers = [h for p in sorted(study.glob("*.dcm")) for h in read_headers(p)]
    notice = failure_notice(headers, read_slice, predictor, SETTINGS, "only 3 of 10 slices are usable",
                            series_number=9900)
    assert notice is not None and not notice.triaged and notice.label == NOT_TRIAGED_LABEL
    assert set(notice.objects) == {ResultKind.SC, ResultKind.SR}  # no key slices, no KOS
    (sc,) = notice.objects[ResultKind.SC]
    assert "analysis failed" in sc.ImageComments and "only 3 of 10 slices" in sc.ImageComments
    (sr,) = notice.objects[ResultKind.SR]
    codes = {e.value for e in sr.iterall() if e.keyword == "CodeValue"}
    assert {"analysis-failed", "373121007"} <= codes  # the reason, and the finding "Not evaluated"
    for kind, (ds,) in notice.objects.items():
        (tmp_path / f"{kind}.dcm").write_bytes(encode(ds))
        assert dciodvfy_errors(tmp_path / f"{kind}.dcm") == [], kind
    assert failure_notice([], read_slice, predictor, SETTINGS, "why", series_number=9900) is None


def test_every_slice_left_out_is_counted_and_the_fraction_rule_applies_to_all(
    study: Path, predictor: Predictor
) -> None:
    headers = [h for p in sorted(study.glob("*.dcm")) for h in read_headers(p)]
    unreadable = {"broken.dcm": "the file cannot be read (InvalidDicomError)"}
    settings = dataclasses.replace(SETTINGS, max_unusable_fraction=0.1)
    result = analyse(headers, read_slice, predictor, settings, series_number=9900, unreadable=unreadable)
    assert result.skipped_slices == unreadable and len(result.probabilities) == 10
    (sc, *_) = result.objects[ResultKind.SC]
    assert "1 unreadable slices of the series were left out" in sc.ImageComments
    (sr,) = result.objects[ResultKind.SR]
    left_out = [item for item in sr.iterall() if item.keyword == "ConceptNameCodeSequence"
                and item.value[0].CodeValue == "left-out-slices"]
    assert left_out  # the SR says how many slices the verdict did not see
    # Two of twelve files left out is more than 10 %: no verdict on what remains.
    with pytest.raises(InvalidInstance, match="2 of 12 slices are unusable"):
        analyse(headers, read_slice, predictor, settings, series_number=9900,
                unreadable={**unreadable, "other.dcm": "the file cannot be read (InvalidDicomError)"})


def test_a_name_its_character_set_cannot_decode_is_left_empty_not_mangled() -> None:
    source = Dataset()
    source.SpecificCharacterSet = "ISO_IR 192"
    source.PatientName = "M\ufffdller^J"  # what pydicom decodes bytes it cannot read to
    source.StudyInstanceUID = "1.2.3"
    assert result_reference(source).PatientName == ""
