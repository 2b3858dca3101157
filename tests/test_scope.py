"""training.model.scope: each check on a constructed series, and the image check on real and
synthetic slices (a header may lie or say nothing)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest

from training.errors import ConfigError
from training.configfile import section_from_table
from training.model.preprocess import hu_from_dataset
from training.model.scope import (METAL_HU, ReasonCode, Scope, age_in_years, coverage_mm, head_image_reason,
                                  header_reasons, metal_depth_mm, metal_reason, middle_slices, scope_reasons)
from training.model.series import SliceHeader, read_header
from training.synthetic import Shift, SyntheticOptions, write_studies


def _series(count: int = 30, thickness: float = 5.0, **values: object) -> list[SliceHeader]:
    """An axial series of `count` slices `thickness` apart, every header carrying `values`."""
    return [SliceHeader(Path(f"{i}.dcm"), f"1.2.3.{i}", "1.2.3", "1.2.840.10008.5.1.4.1.1.2", "CT", ("AXIAL",),
                        (1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (0.0, 0.0, thickness * i), thickness,
                        **values) for i in range(count)]  # type: ignore[arg-type]


def _codes(slices: list[SliceHeader], scope: Scope = Scope()) -> list[ReasonCode]:
    return [reason.code for reason in header_reasons(slices, scope)]


def test_an_ordinary_adult_head_ct_is_in_scope() -> None:
    assert _codes(_series(body_part="HEAD", description="HEAD 5mm H30s", patient_age="054Y")) == []


@pytest.mark.parametrize("values, said", [
    ({"body_part": "ABDOMEN"}, "BodyPartExamined is ABDOMEN"),
    ({"description": "CT CHEST 1.0 B70f"}, "CHEST"),
    ({"study_description": "ABDOMEN PELVIS", "protocol": "Routine"}, "ABDOMEN"),
])
def test_another_body_part_is_named(values: dict, said: str) -> None:
    (reason,) = header_reasons(_series(**values), Scope())
    assert reason.code == ReasonCode.NOT_HEAD and said in reason.text


def test_a_head_described_with_other_words_stays_in_scope() -> None:
    assert _codes(_series(description="HEAD AND NECK ANGLE", study_description="CT HEAD")) == []
    assert _codes(_series(body_part="brain")) == []  # BodyPartExamined compared without case


@pytest.mark.parametrize("values", [
    {"contrast": "ContrastBolusAgent OMNIPAQUE 350"},
    {"description": "CTA HEAD 0.75"},
    {"description": "HEAD W CONTRAST"},
    {"protocol": "Post-contrast brain"},
])
def test_contrast_is_out_of_scope_unless_declared(values: dict) -> None:
    assert _codes(_series(**values)) == [ReasonCode.CONTRAST]
    assert _codes(_series(**values), Scope(contrast=True)) == []


def test_without_contrast_is_not_mistaken_for_contrast() -> None:
    assert _codes(_series(description="HEAD WO CONTRAST", protocol="CT HEAD W/O")) == []


def test_slice_thickness_and_coverage_outside_the_scope() -> None:
    (thin,) = header_reasons(_series(200, 0.625), Scope())
    assert thin.code == ReasonCode.SLICE_THICKNESS and "0.625 mm" in thin.text and "2.5-5 mm" in thin.text
    (partial,) = header_reasons(_series(8, 5.0), Scope())
    assert partial.code == ReasonCode.COVERAGE and "covers 40 mm" in partial.text
    assert coverage_mm(_series(30, 5.0)) == pytest.approx(150.0)
    assert _codes(_series(200, 0.625), Scope(slice_thickness_mm=(0.5, 5.0))) == []


def test_a_child_is_out_of_scope_when_the_age_is_known() -> None:
    (reason,) = header_reasons(_series(patient_age="006Y"), Scope())
    assert reason.code == ReasonCode.AGE and "6.0 years old" in reason.text
    born = _series(birth_date="20200101", study_date="20240101")
    assert _codes(born) == [ReasonCode.AGE]
    assert _codes(_series()) == []  # no age given: nothing to say
    assert _codes(_series(patient_age="006Y"), Scope(min_age_years=0)) == []
    assert age_in_years("018M", "", "") == pytest.approx(1.5)
    assert age_in_years("", "20100230", "20200101") is None  # not a date


def test_several_reasons_are_all_given() -> None:
    reasons = _codes(_series(10, 1.0, body_part="CHEST", contrast="ContrastBolusRoute IV", patient_age="010Y"))
    assert reasons == [ReasonCode.NOT_HEAD, ReasonCode.CONTRAST, ReasonCode.SLICE_THICKNESS, ReasonCode.COVERAGE,
                       ReasonCode.AGE]


def test_the_scope_checks_its_values_and_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"slice_thickness_mm must be \[low, high\]"):
        Scope(slice_thickness_mm=(5.0, 2.0))
    with pytest.raises(ConfigError, match=r"scope.min_age_years must be in \[0, 150\)"):
        section_from_table(Scope, "scope", {"min_age_years": -1})
    with pytest.raises(ConfigError, match="unknown key scope.bodypart"):
        section_from_table(Scope, "scope", {"bodypart": ["HEAD"]})
    scope = section_from_table(Scope, "scope", {"body_parts": ["head"], "slice_thickness_mm": [4, 5]})
    assert scope.body_parts == ("HEAD",) and scope.slice_thickness_mm == (4.0, 5.0)
    assert Scope.from_dict(scope.to_dict()) == scope


@pytest.fixture(scope="module")
def shifted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One synthetic study of each kind: an ordinary head and each shift."""
    root = tmp_path_factory.mktemp("shifted")
    folders = {}
    for shift in (None, *Shift):
        (labels,) = write_studies(root / str(shift), SyntheticOptions(studies=1, seed=21, shift=shift,
                                                                      min_slices=12, max_slices=12))
        folders[str(shift)] = labels.folder
    return folders


def _middle_hu(folder: Path) -> list[tuple[np.ndarray, tuple[float, float] | None]]:
    headers = [read_header(path) for path in sorted((folder / "HEAD").glob("*.dcm"))]
    return [(hu_from_dataset(pydicom.dcmread(h.path)), h.pixel_spacing) for h in middle_slices(headers)]


def test_the_images_of_a_head_pass_and_an_abdomen_fails(shifted: dict[str, Path]) -> None:
    for kind in ("None", "contrast", "noise", "metal"):
        assert head_image_reason(_middle_hu(shifted[kind])) is None, kind
    reason = head_image_reason(_middle_hu(shifted["body"]))
    assert reason is not None and reason.code == ReasonCode.NOT_HEAD and "the images do not show a head" in reason.text


def test_the_abdomen_says_nothing_of_itself_in_its_header(shifted: dict[str, Path]) -> None:
    """The shifted studies hide what they are: only the image check finds the abdomen."""
    headers = sorted((read_header(p) for p in (shifted["body"] / "HEAD").glob("*.dcm")),
                     key=lambda h: h.instance_number or 0)
    scope = Scope(min_coverage_mm=50)  # the fixture's 12 slices cover 48-60 mm
    assert header_reasons(headers, scope) == []
    reasons = scope_reasons(headers, scope, lambda h: hu_from_dataset(pydicom.dcmread(h.path)))
    assert [r.code for r in reasons] == [ReasonCode.NOT_HEAD]
    assert scope_reasons(headers, dataclasses.replace(scope, head_image_check=False), lambda h: None) == []


def test_real_ct_a_head_passes_and_the_neck_does_not() -> None:
    from pydicom.data import get_testdata_file

    def middle(name: str) -> list:
        ds = pydicom.dcmread(get_testdata_file(name))
        return [(hu_from_dataset(ds), tuple(float(v) for v in ds.PixelSpacing))] * 3

    assert head_image_reason(middle("693_UNCI.dcm")) is None  # a real head CT slice (pydicom-data)
    for other in ("bad_sequence.dcm", "explicit_VR-UN.dcm", "CT_small.dcm"):  # neck, abdomen, spine
        assert head_image_reason(middle(other)) is not None, other


def test_unreadable_middle_slices_are_left_to_the_analysis(shifted: dict[str, Path]) -> None:
    headers = sorted((read_header(p) for p in (shifted["None"] / "HEAD").glob("*.dcm")),
                     key=lambda h: h.instance_number or 0)

    def fails(_header: SliceHeader) -> np.ndarray:
        raise ValueError("damaged")

    assert scope_reasons(headers, Scope(min_coverage_mm=0), fails) == []


def _skull(metal_at: tuple[int, int] | None = None, radius: float = 3.0) -> np.ndarray:
    """A 256 × 256 slice at 1 mm: brain inside a 6 mm skull of 180 × 200 mm, and metal of
    `radius` pixels at `metal_at` (row, column) when given."""
    rows, cols = np.indices((256, 256), dtype=np.float32)
    r = np.hypot((rows - 128) / 100, (cols - 128) / 90)
    hu = np.where(r <= 1.0, 1400.0, -1000.0).astype(np.float32)
    hu[np.hypot((rows - 128) / 94, (cols - 128) / 84) <= 1.0] = 35.0
    if metal_at is not None:
        hu[np.hypot(rows - metal_at[0], cols - metal_at[1]) <= radius] = METAL_HU + 71
    return hu


def test_metal_deep_inside_the_skull_is_found_and_elsewhere_is_not() -> None:
    assert metal_depth_mm(_skull(), (1.0, 1.0)) is None  # bone alone is no metal
    depth = metal_depth_mm(_skull((128, 110)), (1.0, 1.0))  # a clip near the circle of Willis
    assert depth is not None and depth > 60
    assert metal_depth_mm(_skull((128, 110)), (0.2, 0.2)) is None  # at 0.2 mm: 1 mm², 14 mm deep
    assert metal_depth_mm(_skull((28, 128)), (1.0, 1.0)) is None  # in the skull: a burr-hole cover, no streaks inside
    assert metal_depth_mm(_skull((20, 128)), (1.0, 1.0)) is None  # on the scalp: an electrode
    assert metal_depth_mm(_skull((128, 110), radius=0.5), (1.0, 1.0)) is None  # one stray pixel


def test_metal_reason_names_how_deep_and_on_how_many_slices() -> None:
    assert metal_reason([None, None]) is None and metal_reason([]) is None
    reason = metal_reason([None, 42.4, 61.0, None])
    assert reason is not None and reason.code == ReasonCode.METAL
    assert "up to 61 mm inside the skull on 2 of 4 slices" in reason.text


def test_only_the_study_with_clips_shows_metal_inside_the_skull(shifted: dict[str, Path]) -> None:
    """Every slice is looked at: the clips lie away from the middle of the series."""
    def metal(kind: str) -> ReasonCode | None:
        slices = [read_header(p) for p in sorted((shifted[kind] / "HEAD").glob("*.dcm"))]
        found = metal_reason([metal_depth_mm(hu_from_dataset(pydicom.dcmread(h.path)), h.pixel_spacing)
                              for h in slices])
        return found.code if found else None

    assert metal("metal") == ReasonCode.METAL
    assert metal("None") is metal("contrast") is metal("noise") is metal("body") is None
    assert "metal inside the skull not supported" in Scope().describe()
    assert "metal inside the skull supported" in Scope(metal_check=False).describe()
