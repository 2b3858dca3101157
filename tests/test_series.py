"""training.model.series: choosing the head CT series of a study and ordering its slices."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from node.errors import NoAnalysableSeries
from training.model.series import SliceHeader, choose_head_series, order_slices, read_header
from training.synthetic import SyntheticOptions, write_studies

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
SAGITTAL = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
TILT = np.radians(20.0)
# Rows along x, columns tilted 20° out of the axial plane: normal (0, sin, cos).
TILTED = (1.0, 0.0, 0.0, 0.0, float(np.cos(TILT)), -float(np.sin(TILT)))


def make_series(
    uid: str,
    count: int = 20,
    *,
    modality: str = "CT",
    sop_class_uid: str = CT,
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    orientation: tuple[float, ...] | None = AXIAL,
    thickness: float | None = 5.0,
    kernel: str = "H30s",
    description: str = "HEAD",
    positions: Sequence[tuple[float, float, float] | None] | None = None,
) -> list[SliceHeader]:
    """`count` slices of one series, z = 5 mm × index unless `positions` are given."""
    if positions is None:
        positions = [(0.0, 0.0, 5.0 * i) for i in range(count)]
    return [
        SliceHeader(
            path=Path("x"),
            sop_instance_uid=f"{uid}.{i + 1}",
            series_instance_uid=uid,
            sop_class_uid=sop_class_uid,
            modality=modality,
            image_type=image_type,
            orientation=orientation,
            position=positions[i],
            thickness=thickness,
            kernel=kernel,
            description=description,
            instance_number=i + 1,
        )
        for i in range(len(positions))
    ]


def shuffled(slices: list[SliceHeader], seed: int = 0) -> list[SliceHeader]:
    copy = list(slices)
    random.Random(seed).shuffle(copy)
    assert copy != slices
    return copy


# --- choose_head_series ------------------------------------------------------------


def test_localizer_is_passed_over() -> None:
    scout = make_series("1.1", 20, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    head = make_series("1.2")
    choice = choose_head_series(scout + head, 10)
    assert choice.series_instance_uid == "1.2"
    assert choice.passed_over["1.1"].endswith(": a localizer (scout)")


def test_non_ct_modality_is_passed_over() -> None:
    mr = make_series("1.1", 30, modality="MR", sop_class_uid=MR)
    head = make_series("1.2")
    choice = choose_head_series(mr + head, 10)
    assert choice.series_instance_uid == "1.2"
    assert "MR" in choice.passed_over["1.1"]
    assert "not CT" in choice.passed_over["1.1"]


def test_ct_modality_with_other_sop_class_is_passed_over() -> None:
    secondary = make_series("1.1", 30, sop_class_uid="1.2.840.10008.5.1.4.1.1.7")
    choice = choose_head_series(secondary + make_series("1.2"), 10)
    assert choice.series_instance_uid == "1.2"
    assert "not a CT image (Secondary Capture Image Storage)" in choice.passed_over["1.1"]


def test_a_private_sop_class_is_not_named_by_its_uid() -> None:
    private = "1.3.12.2.1107.5.9.1"  # a vendor's private non-image class, sent with Modality CT
    with pytest.raises(NoAnalysableSeries) as info:
        choose_head_series(make_series("1.1", 30, sop_class_uid=private, description="CSA"), 10)
    assert str(info.value) == ("no axial head CT series to analyse: CT 'CSA', 30 slices, 5 mm: "
                               "not a CT image (a private or unknown SOP class)")


def test_series_with_too_few_slices_is_passed_over() -> None:
    short = make_series("1.1", 5)
    head = make_series("1.2", 12)
    choice = choose_head_series(short + head, 10)
    assert choice.series_instance_uid == "1.2"
    assert "5 slices" in choice.passed_over["1.1"]
    assert "min_slices" in choice.passed_over["1.1"]


def test_exactly_min_slices_qualifies() -> None:
    assert choose_head_series(make_series("1.1", 10), 10).series_instance_uid == "1.1"


def test_sagittal_series_is_not_axial() -> None:
    sagittal = make_series("1.1", 40, orientation=SAGITTAL)
    head = make_series("1.2")
    choice = choose_head_series(sagittal + head, 10)
    assert choice.series_instance_uid == "1.2"
    assert choice.passed_over["1.1"].endswith(": not axial")


def test_missing_orientation_is_passed_over() -> None:
    choice = choose_head_series(make_series("1.1", 30, orientation=None) + make_series("1.2"), 10)
    assert choice.series_instance_uid == "1.2"
    assert "ImageOrientationPatient" in choice.passed_over["1.1"]


def test_tilted_axial_series_qualifies() -> None:
    tilted = make_series("1.1", 20, orientation=TILTED)
    choice = choose_head_series(tilted, 10)
    assert choice.series_instance_uid == "1.1"
    assert choice.passed_over == {}


@pytest.mark.parametrize("bone", [
    {"kernel": "H70h"},
    {"kernel": "BONE"},
    {"kernel": "Hr60"},
    {"kernel": "", "description": "HEAD BONE 5mm"},
])
def test_soft_kernel_preferred_over_bone(bone: dict[str, str]) -> None:
    # The bone series has more slices, so only the kernel can make the soft one win.
    sharp = make_series("1.1", 40, **bone)
    soft = make_series("1.2", 20, kernel="H30s")
    choice = choose_head_series(sharp + soft, 10)
    assert choice.series_instance_uid == "1.2"
    assert list(choice.passed_over) == ["1.1"]
    assert choice.passed_over["1.1"].endswith(": another qualifying series was preferred")
    assert "soft-tissue" in choice.reason


def test_bone_series_alone_is_still_analysed() -> None:
    choice = choose_head_series(make_series("1.1", 20, kernel="H70h"), 10)
    assert choice.series_instance_uid == "1.1"
    assert "sharp" in choice.reason


def test_among_soft_kernels_3_to_5_mm_preferred_over_1_mm() -> None:
    thin = make_series("1.1", 120, thickness=1.0,
                       positions=[(0.0, 0.0, float(i)) for i in range(120)])
    thick = make_series("1.2", 25, thickness=5.0)
    choice = choose_head_series(thin + thick, 10)
    assert choice.series_instance_uid == "1.2"
    assert choice.passed_over["1.1"].endswith(": another qualifying series was preferred")


def test_thin_series_reason_says_outside_preferred_thickness() -> None:
    choice = choose_head_series(make_series("1.1", 20, thickness=1.0), 10)
    assert "outside the preferred 3-5 mm" in choice.reason


def test_nothing_qualifies_raises_with_every_reason() -> None:
    headers = (
        make_series("1.1", 2, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
        + make_series("1.2", 30, orientation=SAGITTAL)
        + make_series("1.3", 4)
        + make_series("1.4", 30, modality="MR", sop_class_uid=MR)
    )
    with pytest.raises(NoAnalysableSeries) as info:
        choose_head_series(headers, 10)
    message = str(info.value)
    # Each series as a person sees it in the series list, not by its UID.
    assert "CT 'HEAD', 2 slices, 5 mm: a localizer (scout)" in message
    assert "CT 'HEAD', 30 slices, 5 mm: not axial" in message
    assert "CT 'HEAD', 4 slices, 5 mm: 4 slices, fewer than worker.min_slices" in message
    assert "MR 'HEAD', 30 slices, 5 mm: modality MR" in message
    assert not any(uid in message for uid in ("1.1", "1.2", "1.3", "1.4"))


def test_no_instances_raises() -> None:
    with pytest.raises(NoAnalysableSeries, match="no instances"):
        choose_head_series([], 10)


# --- order_slices ------------------------------------------------------------------


def test_shuffled_slices_come_back_inferior_to_superior() -> None:
    series = make_series("1.1", 20)
    choice = choose_head_series(shuffled(series), 10)
    assert [s.sop_instance_uid for s in choice.slices] == [s.sop_instance_uid for s in series]
    assert choice.ordering == "position along the slice normal"


def test_order_uses_position_not_instance_number() -> None:
    # InstanceNumber counts from the vertex down: the order must follow position anyway.
    series = make_series("1.1", 12)
    reversed_numbers = [
        replace(s, instance_number=12 - i) for i, s in enumerate(series)
    ]
    ordered, how = order_slices(shuffled(reversed_numbers, seed=3))
    z = [s.position[2] for s in ordered]
    assert z == sorted(z)
    assert how == "position along the slice normal"


def test_tilted_series_is_ordered_along_the_slice_normal() -> None:
    # Slices 5 mm apart along the tilted normal, each shifted within its own plane
    # (along the tilted column direction) so that z alone would give a wrong order.
    row, column = np.array(TILTED[:3]), np.array(TILTED[3:])
    normal = np.cross(row, column)
    offsets = [40.0 * (-1) ** i for i in range(15)]
    positions = [
        tuple(float(v) for v in 5.0 * i * normal + offsets[i] * column + 3.0 * i * row)
        for i in range(15)
    ]
    series = make_series("1.1", orientation=TILTED, positions=positions)
    z = [p[2] for p in positions]
    assert z != sorted(z)  # the test would be meaningless if z already gave the order
    ordered, how = order_slices(shuffled(series, seed=1))
    assert [s.sop_instance_uid for s in ordered] == [s.sop_instance_uid for s in series]
    assert how == "position along the slice normal"


def test_missing_positions_fall_back_to_instance_number() -> None:
    positions: list[tuple[float, float, float] | None] = [(0.0, 0.0, 5.0 * i) for i in range(12)]
    positions[4] = None
    series = make_series("1.1", positions=positions)
    choice = choose_head_series(shuffled(series, seed=2), 10)
    assert [s.instance_number for s in choice.slices] == list(range(1, 13))
    assert "InstanceNumber" in choice.ordering
    assert "missing" in choice.ordering


def test_instance_number_fallback_puts_unnumbered_last() -> None:
    series = make_series("1.1", positions=[None] * 4)
    unnumbered = replace(series[0], sop_instance_uid="u", instance_number=None)
    ordered, _ = order_slices([unnumbered, series[3], series[1], series[0], series[2]])
    assert [s.sop_instance_uid for s in ordered] == ["1.1.1", "1.1.2", "1.1.3", "1.1.4", "u"]


# --- read_header on real files -----------------------------------------------------


@pytest.fixture(scope="module")
def synthetic_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("series_synthetic")
    write_studies(root, SyntheticOptions(studies=1, seed=5, localizer=True, bone_series=True))
    return root / "study_0000"


def test_read_header_of_synthetic_head_slice(synthetic_study: Path) -> None:
    labels = json.loads((synthetic_study / "labels.json").read_text())
    first = labels["slices"][0]
    header = read_header(synthetic_study / first["file"])
    assert header.path == synthetic_study / first["file"]
    assert header.sop_instance_uid == first["sop_instance_uid"]
    assert header.series_instance_uid == labels["head_series_instance_uid"]
    assert header.sop_class_uid == CT
    assert header.modality == "CT"
    assert header.image_type == ("ORIGINAL", "PRIMARY", "AXIAL")
    assert header.orientation == AXIAL
    assert header.position is not None and header.position[2] == pytest.approx(first["z"], abs=1e-3)
    assert header.thickness in (4.0, 5.0)
    assert header.kernel == "H30s"
    assert header.instance_number == first["instance_number"]
    assert header.frames == 1


def test_choose_head_series_on_synthetic_study(synthetic_study: Path) -> None:
    labels = json.loads((synthetic_study / "labels.json").read_text())
    headers = [read_header(p) for p in sorted(synthetic_study.glob("*/*.dcm"))]
    by_folder = {p.name: read_header(next(p.glob("*.dcm"))).series_instance_uid
                 for p in synthetic_study.iterdir() if p.is_dir()}
    assert set(by_folder) == {"HEAD", "BONE", "SCOUT"}

    choice = choose_head_series(headers, 10)
    assert choice.series_instance_uid == labels["head_series_instance_uid"] == by_folder["HEAD"]
    assert choice.passed_over[by_folder["SCOUT"]].endswith(": a localizer (scout)")
    assert choice.passed_over[by_folder["BONE"]].endswith(": another qualifying series was preferred")
    assert [s.sop_instance_uid for s in choice.slices] == [
        s["sop_instance_uid"] for s in labels["slices"]
    ]
    assert choice.ordering == "position along the slice normal"


@pytest.mark.parametrize("orientation", [(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)])
def test_feet_first_orientations_still_go_inferior_to_superior(orientation: tuple[float, ...]) -> None:
    # Row × column points inferior for these orientations; the order must not flip.
    series = make_series("1.1", 12, orientation=orientation)
    ordered, _ = order_slices(shuffled(series))
    assert [s.position[2] for s in ordered] == [5.0 * i for i in range(12)]


def test_a_series_inside_the_scope_is_preferred_and_the_other_named_with_its_reasons() -> None:
    thin = make_series("1.1", 40, thickness=3.0, description="HEAD 3mm")
    thick = make_series("1.2", 24, thickness=5.0, description="HEAD 5mm")

    def judge(slices: list[SliceHeader]) -> list[str]:
        return [f"slices are {slices[0].thickness:g} mm thick"] if slices[0].thickness < 4 else []

    assert choose_head_series(thin + thick, 10).series_instance_uid == "1.1"  # without a scope: more slices
    choice = choose_head_series(thin + thick, 10, judge)
    assert choice.series_instance_uid == "1.2"
    assert choice.passed_over["1.1"] == "CT 'HEAD 3mm', 40 slices, 3 mm: outside the model's scope: slices are 3 mm thick"
