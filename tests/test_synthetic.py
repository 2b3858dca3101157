"""Synthetic head-CT studies: valid DICOM, realistic HU, labels that match the pixels."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.errors import SyntheticDataError
from training.phantom import BLEED_HU_RANGE, SUBTYPE_BITS, SUBTYPES
from training.model.preprocess import hu_from_dataset
from training.synthetic import SyntheticOptions, read_mask, write_studies
from tests.conftest import load_labels, require_tool
from tests.phantoms import rendered_bleed

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _files(study: Path) -> list[Path]:
    return sorted(study.glob("*/*.dcm"))


def _head_slices(study: Path) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(study / s["file"]) for s in load_labels(study)["slices"]]


def test_study_layout_and_ct_attributes(positive_study: Path) -> None:
    labels = load_labels(positive_study)
    slices = _head_slices(positive_study)
    assert 20 <= len(slices) <= 40
    assert {p.name for p in positive_study.iterdir()} == {
        "HEAD", "BONE", "SCOUT", "labels.json", "mask.npz"
    }
    for ds in slices:
        assert ds.SOPClassUID == CT_IMAGE_STORAGE
        assert ds.Modality == "CT"
        assert (ds.Rows, ds.Columns) == (512, 512)
        assert ds.pixel_array.dtype == np.int16
        assert float(ds.RescaleSlope) == 1.0 and float(ds.RescaleIntercept) == -1024.0
        assert ds.StudyInstanceUID == labels["study_instance_uid"]
        assert ds.SeriesInstanceUID == labels["head_series_instance_uid"]
        assert ds.AccessionNumber == labels["accession_number"]
        assert ds.ImageComments == "SYNTHETIC PHANTOM - NOT PATIENT DATA"
        assert [float(v) for v in ds.ImageOrientationPatient] == [1, 0, 0, 0, 1, 0]
        assert len(ds.PixelSpacing) == 2 and ds.SliceThickness > 0
    z = np.array([float(ds.ImagePositionPatient[2]) for ds in slices])
    assert np.allclose(np.diff(z), float(slices[0].SliceThickness))
    assert len({ds.SOPInstanceUID for ds in slices}) == len(slices)


def test_scout_and_bone_series(positive_study: Path) -> None:
    scout = pydicom.dcmread(positive_study / "SCOUT" / "0001.dcm")
    assert "LOCALIZER" in scout.ImageType
    head = _head_slices(positive_study)
    bone = [pydicom.dcmread(p) for p in sorted((positive_study / "BONE").glob("*.dcm"))]
    assert len(bone) == len(head)
    assert bone[0].SeriesInstanceUID != head[0].SeriesInstanceUID
    assert bone[0].StudyInstanceUID == head[0].StudyInstanceUID == scout.StudyInstanceUID
    assert bone[0].ConvolutionKernel != head[0].ConvolutionKernel
    # The bone kernel is noisier than the soft-tissue kernel: compare the robust spread of
    # neighbouring-pixel differences, which edges barely move.
    middle = len(head) // 2

    def noise(ds: pydicom.Dataset) -> float:
        return float(np.median(np.abs(np.diff(hu_from_dataset(ds)[156:356, 156:356], axis=1))))

    assert noise(bone[middle]) > 3 * noise(head[middle])


def test_hu_anatomy_is_realistic(negative_study: Path) -> None:
    slices = _head_slices(negative_study)
    hu = hu_from_dataset(slices[len(slices) // 2])
    assert np.percentile(hu, 5) < -950  # air around the head
    bone = hu[hu > 400]
    assert bone.size > 2000 and 700 <= np.median(bone) <= 1500
    centre = hu[200:312, 200:312]
    brain = centre[(centre > 15) & (centre < 60)]
    assert 25 <= np.median(brain) <= 45
    assert np.count_nonzero((hu > 0) & (hu < 15)) > 200  # CSF: ventricles and sulci


def test_labels_match_the_hu_content(positive_study: Path, negative_study: Path) -> None:
    for study in (positive_study, negative_study):
        labels = load_labels(study)
        mask = read_mask(study)
        slices = _head_slices(study)
        assert mask.shape == (len(slices), 512, 512)
        for entry, ds, slice_mask in zip(labels["slices"], slices, mask):
            assert entry["sop_instance_uid"] == ds.SOPInstanceUID
            assert entry["label"] == int(slice_mask.any())
            assert entry["subtypes"] == [
                name for name in SUBTYPES if np.any(slice_mask & SUBTYPE_BITS[name])
            ]
            if slice_mask.any():
                blood = hu_from_dataset(ds)[slice_mask > 0]
                inside = np.mean((blood >= 50) & (blood <= 90))
                assert inside >= 0.98, f"{entry['file']}: {inside:.1%} of bleed in 50-90 HU"
        assert labels["positive"] == bool(mask.any())
    assert load_labels(positive_study)["subtypes"]
    assert sum(s["label"] for s in load_labels(positive_study)["slices"]) >= 1
    assert not read_mask(negative_study).any()


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_every_subtype_renders_as_blood(subtype: str) -> None:
    found = rendered_bleed(subtype)
    assert found is not None, f"no {subtype} bleed became visible"
    hu, mask = found
    assert np.all(mask[mask > 0] == SUBTYPE_BITS[subtype])
    assert BLEED_HU_RANGE[0] - 15 < np.median(hu[mask > 0]) < BLEED_HU_RANGE[1] + 15


def _digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_same_seed_same_bytes(tmp_path: Path) -> None:
    options = SyntheticOptions(studies=1, seed=3, positive_fraction=1.0, localizer=True)
    write_studies(tmp_path / "a", options)
    write_studies(tmp_path / "b", options)
    write_studies(tmp_path / "c", SyntheticOptions(studies=1, seed=4, positive_fraction=1.0))
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a")["study_0000/HEAD/0001.dcm"] != _digest(tmp_path / "c")[
        "study_0000/HEAD/0001.dcm"
    ]


def test_positive_fraction_is_an_exact_count(tmp_path: Path) -> None:
    from training.synthetic import _positive_flags

    assert sum(_positive_flags(SyntheticOptions(studies=10, positive_fraction=0.3))) == 3
    assert sum(_positive_flags(SyntheticOptions(studies=7, positive_fraction=0.0))) == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"studies": 0}, "--studies"),
        ({"studies": 1, "positive_fraction": 1.5}, "--positive-fraction"),
        ({"studies": 1, "min_slices": 30, "max_slices": 20}, "slice counts"),
    ],
)
def test_bad_options_are_refused(kwargs: dict, message: str) -> None:
    with pytest.raises(SyntheticDataError, match=message):
        SyntheticOptions(**kwargs)


def test_dcmtk_reads_every_file(synthetic_root: Path) -> None:
    dcmdump = require_tool("dcmdump")
    for path in _files(next(synthetic_root.iterdir())):
        result = subprocess.run([dcmdump, "-q", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"dcmdump {path}: {result.stderr}"
        assert "(0008,0060) CS [CT]" in result.stdout


def test_dciodvfy_finds_no_errors(synthetic_root: Path) -> None:
    dciodvfy = require_tool("dciodvfy")
    study = next(synthetic_root.iterdir())
    for path in [study / "SCOUT" / "0001.dcm", *_files(study)[::7]]:
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True)
        report = result.stdout + result.stderr
        assert "CTImage" in report, report  # it recognised the IOD
        errors = [line for line in report.splitlines() if line.startswith("Error")]
        assert not errors, f"{path}: {errors}"


def test_a_short_series_still_gets_its_bleeds(tmp_path: Path) -> None:
    """Eight slices end below where some subtypes are placed: the bleed goes to the nearest height."""
    labels = write_studies(tmp_path, SyntheticOptions(studies=4, seed=3, positive_fraction=1.0, min_slices=8,
                                                      max_slices=8))
    assert all(len(study.slice_labels) == 8 for study in labels)
