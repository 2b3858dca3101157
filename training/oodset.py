"""`ichnode ood-set`: studies a head-CT triage model was not trained on, to measure abstention.

Synthetic studies of every `Shift` (after IV contrast, heavy noise, metal streaks, an
abdomen), whose headers do not give the shift away, beside real scans from the test
files of pydicom and pydicom-data: a real head CT slice, CT of the neck, the abdomen
after contrast and the thoracic spine, and MR. Each real file holds one image, so each
becomes a series of that one slice repeated along z (said so in its labels.json); an MR
or multi-frame file stays as it is. Every study is a folder in the layout of
`ichnode synth` (labels.json; the real scans' ICH labels are unknown, null), so
`ichnode evaluate` reads the set like any other.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import generate_uid

from training.errors import DataError
from training.synthetic import Shift, SyntheticOptions, write_studies

__all__ = ["REAL_SCANS", "RealScan", "write_ood_set"]


@dataclass(frozen=True)
class RealScan:
    file: str  # a test file of pydicom or pydicom-data
    what: str
    repeats: int  # slices of the series made from it (1: the file as it is)


REAL_SCANS = (
    RealScan("693_UNCI.dcm", "real head CT slice, 5 mm, no contrast (pydicom-data)", 28),
    RealScan("bad_sequence.dcm", "real CT of the neck (pydicom-data)", 28),
    RealScan("explicit_VR-UN.dcm", "real CT of the abdomen after IV contrast (pydicom-data)", 28),
    RealScan("CT_small.dcm", "real CT of the thoracic spine, 128 x 128 (pydicom)", 28),
    RealScan("MR_small.dcm", "real MR slice (pydicom)", 20),
    RealScan("emri_small.dcm", "real MR of the head, one multi-frame file (pydicom-data)", 1),
)
SLICE_STEP_MM = 5.0


def _test_file(name: str) -> Path:
    from pydicom.data import get_testdata_file

    with warnings.catch_warnings():  # pydicom notes the test files' own oddities
        warnings.simplefilter("ignore")
        path = get_testdata_file(name)
    if path is None:
        raise DataError(f"pydicom's test file {name} is not installed; `pip install pydicom-data` (make setup "
                        "installs it) provides the real scans of the out-of-distribution set")
    return Path(path)


_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def _valid_uids(ds: pydicom.Dataset, scan: RealScan) -> None:
    """Some test files carry anonymised UIDs that are not UIDs (hex digests): each becomes
    a UID derived from it, so every object the node writes from them stays valid DICOM."""
    def fix(dataset: pydicom.Dataset, element: pydicom.DataElement) -> None:
        if element.VR == "UI" and isinstance(element.value, str) and element.value \
                and not (_UID.match(element.value) and len(element.value) <= 64):
            element.value = generate_uid(entropy_srcs=["ichnode-ood", scan.file, element.value])

    ds.walk(fix)


def _write_real(folder: Path, scan: RealScan) -> None:
    """One real file as a study: `scan.repeats` copies along z with UIDs of their own."""
    with warnings.catch_warnings():  # anonymised UIDs that are not UIDs: mended below
        warnings.simplefilter("ignore")
        source = pydicom.dcmread(_test_file(scan.file))
    study, series = generate_uid(entropy_srcs=["ichnode-ood", scan.file, "study"]), \
        generate_uid(entropy_srcs=["ichnode-ood", scan.file, "series"])
    (folder / "HEAD").mkdir(parents=True, exist_ok=True)
    slices = []
    for number in range(1, scan.repeats + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(_test_file(scan.file))
            _valid_uids(ds, scan)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["ichnode-ood", scan.file, str(number)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = number
        if scan.repeats > 1 and "ImagePositionPatient" in ds:
            ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(source.ImagePositionPatient[2])
                                       + SLICE_STEP_MM * (number - 1)]
            ds.SliceThickness = ds.get("SliceThickness") or SLICE_STEP_MM
        name = f"HEAD/{number:04d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        slices.append({"instance_number": number, "file": name, "sop_instance_uid": ds.SOPInstanceUID,
                       "label": None, "subtypes": []})
    labels = {"synthetic": False, "source": scan.what, "test_file": scan.file,
              "made_by": f"ichnode ood-set: the one image of {scan.file}"
                         + (f" repeated {scan.repeats} times, {SLICE_STEP_MM:g} mm apart" if scan.repeats > 1 else "")
                         + "; UIDs new, and any that were not valid UIDs replaced",
              "study_instance_uid": study, "positive": None, "slices": slices}
    (folder / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")


def write_ood_set(out: Path, *, seed: int, studies_per_shift: int) -> dict[str, int]:
    """Write the set under `out` (study_0000, study_0001, …); returns the studies of each kind."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"{out} is not empty; ood-set writes a new folder")
    counts: dict[str, int] = {}
    index = 0
    for shift in Shift:
        written = write_studies(out / f"_{shift}", SyntheticOptions(studies=studies_per_shift, seed=seed, shift=shift))
        for labels in written:
            labels.folder.rename(out / f"study_{index:04d}")
            index += 1
        (out / f"_{shift}").rmdir()
        counts[str(shift)] = len(written)
    for scan in REAL_SCANS:
        _write_real(out / f"study_{index:04d}", scan)
        index += 1
        counts[scan.what] = 1
    return counts
