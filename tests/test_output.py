"""node.output and node.render: the Secondary Capture result series and its pictures."""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from node.output import (ResultKind, ResultTexts, SourceImage, build_result_series, encode, not_triaged_texts,
                         result_texts)
from node.render import PANEL_SIZE, SCALE_WIDTH, key_slice_image, summary_image
from tests.conftest import require_tool
from training.model.checkpoint import Provenance
from training.model.rule import TriageRule, Verdict
from training.synthetic import SyntheticOptions, write_studies

SC_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.7"
RULE = TriageRule()
DEMO = "DEMO MODEL - SYNTHETIC DATA - NOT FOR CLINICAL USE"
Result = tuple[str, list[Dataset], list[np.ndarray]]


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("output_synthetic")
    write_studies(root, SyntheticOptions(studies=1, seed=5, localizer=True, bone_series=True))
    return root / "study_0000"


@pytest.fixture(scope="module")
def ct(study: Path) -> Dataset:
    labels = json.loads((study / "labels.json").read_text())
    return pydicom.dcmread(study / labels["slices"][len(labels["slices"]) // 2]["file"])


@pytest.fixture(scope="module")
def positive() -> Verdict:
    return RULE.apply(np.array([0.1] * 27 + [0.85, 0.9, 0.97]))


@pytest.fixture(scope="module")
def negative() -> Verdict:
    return RULE.apply(np.array([0.1] * 29 + [0.5]))


# --- result_texts ------------------------------------------------------------------


VERDICTS = {"positive": "AI ICH: SUSPECTED - PRIORITY", "negative": "AI ICH: not detected",
            "not triaged": "AI ICH: NOT TRIAGED", "failed": "AI ICH: NOT TRIAGED, analysis failed"}
MODELS = {"synthetic": "(DEMO, NOT CLINICAL)", "none": "(UNTRAINED MODEL)", "rsna": ""}
SETS = {ResultKind.SC: "", ResultKind.SR: " report", ResultKind.KOS: " slices"}  # each set's series told apart


def _texts(verdict: str, training_data: str, request: pytest.FixtureRequest) -> ResultTexts:
    provenance = Provenance(training_data=training_data)
    if verdict in ("positive", "negative"):
        return result_texts(request.getfixturevalue(verdict), provenance, "effclass")
    return not_triaged_texts(["the series is described as 'ABDOMEN'"], provenance, "effclass",
                             failed=verdict == "failed")


@pytest.mark.parametrize("training_data", MODELS)
@pytest.mark.parametrize("verdict", VERDICTS)
def test_every_series_description_leads_with_the_verdict_and_fits(
    verdict: str, training_data: str, request: pytest.FixtureRequest
) -> None:
    """What a series list shows: the verdict first, the object set, a demo or untrained
    model's tag, in at most 64 characters (LO), for every verdict, model and object set."""
    texts = _texts(verdict, training_data, request)
    tag = f" {MODELS[training_data]}" if MODELS[training_data] else ""
    assert texts.descriptions == {kind: f"{VERDICTS[verdict]}{SETS[kind]}{tag}" for kind in ResultKind}
    for description in texts.descriptions.values():
        assert len(description) <= 64, description
        if verdict != "positive":
            assert "PRIORITY" not in description
    if training_data == "synthetic":  # the whole warning stays in the comments and on the pictures
        assert texts.warnings == [DEMO] and DEMO in texts.image_comments


def test_untrained_is_the_default_provenance(positive: Verdict) -> None:
    texts = result_texts(positive, Provenance(), "effclass")
    assert texts.series_description == "AI ICH: SUSPECTED - PRIORITY (UNTRAINED MODEL)"
    assert any("UNTRAINED" in w for w in texts.warnings)
    assert DEMO not in texts.warnings


def test_demo_warning_for_synthetic_training_data(positive: Verdict) -> None:
    texts = result_texts(positive, Provenance(training_data="synthetic"), "effclass")
    assert texts.warnings == [DEMO]
    assert DEMO in texts.image_comments


def test_no_warnings_for_real_training_data(positive: Verdict) -> None:
    texts = result_texts(positive, Provenance(training_data="rsna", description="RSNA 2019"), "effclass")
    assert texts.warnings == []
    assert "rsna (RSNA 2019)" in texts.image_comments


@pytest.mark.parametrize("training_data", ["synthetic", "none", "rsna"])
def test_image_comments_say_not_for_diagnostic_use(positive: Verdict, training_data: str) -> None:
    texts = result_texts(positive, Provenance(training_data=training_data), "effclass")
    assert "NOT FOR DIAGNOSTIC USE" in texts.image_comments
    assert texts.verdict_line in texts.image_comments
    assert "effclass" in texts.image_comments


def test_rule_line_states_the_counts(positive: Verdict) -> None:
    texts = result_texts(positive, Provenance(training_data="rsna"), "effclass")
    assert texts.rule_line.startswith("3 of 30 slices with P(ICH) > 0.8 (positive when >= 2)")
    assert "max P(ICH) 0.970" in texts.rule_line


def test_negative_verdict_texts(negative: Verdict) -> None:
    texts = result_texts(negative, Provenance(training_data="synthetic"), "effclass")
    assert texts.verdict_line == "AI ICH TRIAGE: not detected"
    assert "SUSPECTED" not in texts.image_comments


# --- render ------------------------------------------------------------------------


def test_key_slice_image_is_rgb_uint8_two_panels_and_a_colour_scale_wide() -> None:
    rng = np.random.default_rng(0)
    brain, cam = rng.random((224, 224)), rng.random((224, 224))
    image = key_slice_image(
        brain, cam, mask=np.ones((224, 224), dtype=bool), probability=0.93, slice_number=12, total_slices=30, position_mm=41.5,
        verdict_line="AI ICH TRIAGE: SUSPECTED - PRIORITY", positive=True, warnings=[DEMO],
    )
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] == 2 * PANEL_SIZE + SCALE_WIDTH
    assert image.shape[0] > 512  # the panels plus the burned-in header and footer
    assert image.std() > 0


def test_key_slice_image_shows_the_brain_window() -> None:
    """A uniform mid-grey brain window appears as mid-grey in the left panel."""
    image = key_slice_image(
        np.full((64, 64), 0.5), np.zeros((64, 64)), mask=np.ones((64, 64), dtype=bool), probability=0.1, slice_number=1,
        total_slices=20, position_mm=None, verdict_line="AI ICH TRIAGE: not detected",
        positive=False, warnings=[],
    )
    height = image.shape[0]
    centre = image[height // 2, 256]
    assert np.all(np.abs(centre.astype(int) - 128) <= 1)


def test_key_slice_image_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        key_slice_image(
            np.zeros((224, 224)), np.zeros((112, 112)), mask=np.ones((224, 224), dtype=bool), probability=0.5, slice_number=1,
            total_slices=10, position_mm=None, verdict_line="x", positive=False, warnings=[],
        )


def test_summary_image_is_rgb_uint8_1024_wide() -> None:
    probabilities = np.array([0.1] * 27 + [0.85, 0.9, 0.97])
    image = summary_image(
        probabilities, slice_threshold=0.8, key_slices=[29, 28, 27],
        verdict_line="AI ICH TRIAGE: SUSPECTED - PRIORITY", rule_line="3 of 30 slices",
        positive=True, warnings=[],
    )
    assert image.dtype == np.uint8
    assert image.ndim == 3 and image.shape[2] == 3
    assert image.shape[1] == 1024
    # Slices above the threshold are drawn in red.
    red = (image[..., 0] > 200) & (image[..., 1] < 100) & (image[..., 2] < 100)
    assert red.any()


def test_summary_image_of_a_single_slice() -> None:
    image = summary_image(
        np.array([0.3]), slice_threshold=0.8, key_slices=[0], verdict_line="x", rule_line="y",
        positive=False, warnings=[],
    )
    assert image.shape[1] == 1024 and image.dtype == np.uint8


# --- build_result_series and encode ------------------------------------------------


def images_for(positive: Verdict) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    texts = result_texts(positive, Provenance(training_data="synthetic"), "effclass")
    key = key_slice_image(
        rng.random((128, 128)), rng.random((128, 128)), mask=np.ones((128, 128), dtype=bool), probability=0.97, slice_number=30,
        total_slices=30, position_mm=60.0, verdict_line=texts.verdict_line, positive=True,
        warnings=texts.warnings,
    )
    summary = summary_image(
        np.array([0.1] * 27 + [0.85, 0.9, 0.97]), slice_threshold=0.8, key_slices=[29],
        verdict_line=texts.verdict_line, rule_line=texts.rule_line, positive=True,
        warnings=texts.warnings,
    )
    return [key, summary]


@pytest.fixture(scope="module")
def result(ct: Dataset, positive: Verdict) -> Result:
    texts = result_texts(positive, Provenance(training_data="synthetic"), "effclass")
    images = images_for(positive)
    series_uid, objects = build_result_series(
        ct, images, texts=texts, series_number=9901, manufacturer="ichnode",
        institution_name="Test Hospital", software_version="0.1.0", sources=[SourceImage(ct.SOPClassUID, ct.SOPInstanceUID), None],
    )
    return series_uid, objects, images


def test_result_series_is_new_and_shared(ct: Dataset, result: Result) -> None:
    series_uid, objects, _ = result
    assert len(objects) == 2
    assert {o.SeriesInstanceUID for o in objects} == {series_uid}
    assert series_uid != ct.SeriesInstanceUID
    assert len({o.SOPInstanceUID for o in objects}) == 2
    assert ct.SOPInstanceUID not in {o.SOPInstanceUID for o in objects}
    assert [int(o.InstanceNumber) for o in objects] == [1, 2]


def test_result_series_keeps_patient_and_study(ct: Dataset, result: Result) -> None:
    _, objects, _ = result
    for sc in objects:
        assert sc.SOPClassUID == SC_IMAGE_STORAGE
        assert sc.StudyInstanceUID == ct.StudyInstanceUID
        assert sc.PatientID == ct.PatientID
        assert sc.AccessionNumber == ct.AccessionNumber
        assert str(sc.PatientName) == str(ct.PatientName)
        assert sc.SeriesNumber == 9901
        assert sc.BodyPartExamined == "HEAD"
        assert list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert sc.SeriesDescription == "AI ICH: SUSPECTED - PRIORITY (DEMO, NOT CLINICAL)"
        assert "AI ICH TRIAGE: SUSPECTED - PRIORITY" in sc.ImageComments
        assert "NOT FOR DIAGNOSTIC USE" in sc.ImageComments
        assert sc.BurnedInAnnotation == "YES"


def test_source_image_reference_on_key_slice_only(ct: Dataset, result: Result) -> None:
    _, (key, summary), _ = result
    (item,) = key.SourceImageSequence
    assert item.ReferencedSOPInstanceUID == ct.SOPInstanceUID
    assert item.ReferencedSOPClassUID == ct.SOPClassUID
    assert "SourceImageSequence" not in summary


def test_encoded_objects_read_back_equal(ct: Dataset, result: Result) -> None:
    series_uid, objects, images = result
    for sc, pixels in zip(objects, images):
        data = encode(sc)
        assert data[128:132] == b"DICM"
        back = pydicom.dcmread(io.BytesIO(data))
        assert back.SOPInstanceUID == sc.SOPInstanceUID
        assert back.SeriesInstanceUID == series_uid
        assert back.StudyInstanceUID == ct.StudyInstanceUID
        assert back.PatientID == ct.PatientID
        assert back.AccessionNumber == ct.AccessionNumber
        assert back.SeriesNumber == 9901
        assert back.BodyPartExamined == "HEAD"
        assert list(back.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert back.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
        assert back.PhotometricInterpretation == "RGB"
        assert back.pixel_array.shape == pixels.shape
        assert np.array_equal(back.pixel_array, pixels)
    key_back = pydicom.dcmread(io.BytesIO(encode(objects[0])))
    assert key_back.SourceImageSequence[0].ReferencedSOPInstanceUID == ct.SOPInstanceUID


def test_encoded_objects_pass_dciodvfy(result: Result, tmp_path: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    _, objects, _ = result
    for number, sc in enumerate(objects, start=1):
        path = tmp_path / f"{number:04d}.dcm"
        path.write_bytes(encode(sc))
        run = subprocess.run([dciodvfy, str(path)], check=False, capture_output=True, text=True, timeout=120)
        report = run.stdout + run.stderr
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert errors == [], report
        assert "SCImage" in report  # checked against the Secondary Capture IOD


def test_mismatched_images_and_sources_raise(ct: Dataset, positive: Verdict) -> None:
    texts = result_texts(positive, Provenance(training_data="synthetic"), "effclass")
    with pytest.raises(ValueError, match="2 images but 1 source"):
        build_result_series(
            ct, images_for(positive), texts=texts, series_number=9900, manufacturer="ichnode",
            institution_name="", software_version="0.1.0", sources=[SourceImage(ct.SOPClassUID, ct.SOPInstanceUID)],
        )


def test_each_build_makes_a_new_series(ct: Dataset, positive: Verdict, result: Result) -> None:
    texts = result_texts(positive, Provenance(training_data="synthetic"), "effclass")
    again, objects = build_result_series(
        ct, images_for(positive)[:1], texts=texts, series_number=9902, manufacturer="ichnode",
        institution_name="", software_version="0.1.0", sources=[None],
    )
    assert again != result[0]
    assert objects[0].SeriesNumber == 9902
    assert "InstitutionName" not in objects[0] or not objects[0].InstitutionName
