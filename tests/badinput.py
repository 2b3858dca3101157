"""A corpus of what scanners and PACS really send, broken and odd, built from synthetic
studies. Each case says what the node is expected to make of it."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.uid import JPEG2000Lossless, RLELossless, generate_uid

from tests.conftest import load_labels, require_tool
from training.synthetic import SyntheticOptions, write_studies


@dataclass
class Case:
    """One study of the corpus and what must come of it."""

    name: str
    study_uid: str
    files: list[Path]
    failure: str = ""  # words of the reason the study must fail with; empty: it must be analysed
    skipped: int = 0  # slices left out of the analysis
    passed_over: list[str] = field(default_factory=list)  # words in the passed-over reasons
    slice_order: str = "position along the slice normal"
    storescu_args: list[str] = field(default_factory=list)  # e.g. the compressed syntax to propose


def _fresh_uids(ds: pydicom.Dataset, study: str, series: str) -> None:
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()


def _copy_series(study: Path, out: Path) -> list[Path]:
    shutil.copytree(study / "HEAD", out)
    return sorted(out.glob("*.dcm"))


def _rewrite(paths: list[Path], change) -> None:
    for path in paths:
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


def build_corpus(root: Path) -> tuple[list[Case], dict[str, Path]]:
    """Studies for storescu (as cases) and raw files that only a byte-level sender sends."""
    source = root / "source"
    write_studies(source, SyntheticOptions(studies=12, seed=31, positive_fraction=0.3, min_slices=16, max_slices=16))
    studies = sorted(p for p in source.iterdir() if p.is_dir())
    cases = []

    # 1. One messy study: three unusable slices among good ones, an MR object and an
    #    Enhanced CT (multi-frame) object in the same study.
    files = _copy_series(studies[0], root / "messy")
    uid = load_labels(studies[0])["study_instance_uid"]
    _rewrite([files[2]], lambda ds: delattr(ds, "PixelData"))
    _rewrite([files[4]], lambda ds: setattr(ds, "Rows", 700))  # Rows × Columns ≠ pixel data
    def rgb(ds: pydicom.Dataset) -> None:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = np.zeros((ds.Rows, ds.Columns, 3), np.uint8).tobytes()
    _rewrite([files[6]], rgb)
    mr = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    _fresh_uids(mr, uid, generate_uid())
    mr.save_as(root / "messy" / "mr.dcm", enforce_file_format=True)
    enhanced = pydicom.dcmread(files[0])
    _fresh_uids(enhanced, uid, generate_uid())
    enhanced.SOPClassUID = enhanced.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2.1"
    enhanced.NumberOfFrames = 2
    enhanced.PixelData = enhanced.PixelData * 2
    enhanced.save_as(root / "messy" / "enhanced.dcm", enforce_file_format=True)
    cases.append(Case("messy", uid, sorted((root / "messy").glob("*.dcm")), skipped=3,
                      passed_over=["modality MR", "Enhanced CT"]))

    # 2. MONOCHROME1 with a gantry tilt of 15°: analysed as usual.
    files = _copy_series(studies[1], root / "mono1_tilt")
    tilt = np.radians(15)
    def mono1_tilted(ds: pydicom.Dataset) -> None:
        ds.PhotometricInterpretation = "MONOCHROME1"
        ds.GantryDetectorTilt = "15"
        ds.ImageOrientationPatient = [1, 0, 0, 0, float(np.cos(tilt)), float(np.sin(tilt))]
    _rewrite(files, mono1_tilted)
    cases.append(Case("mono1_tilt", load_labels(studies[1])["study_instance_uid"], files))

    # 3. No ImagePositionPatient: ordered by InstanceNumber, and the log says so.
    files = _copy_series(studies[2], root / "no_position")
    _rewrite(files, lambda ds: delattr(ds, "ImagePositionPatient"))
    cases.append(Case("no_position", load_labels(studies[2])["study_instance_uid"], files,
                      slice_order="InstanceNumber (ImagePositionPatient missing)"))

    # 4. Two slices at the same position (a repeated acquisition).
    files = _copy_series(studies[3], root / "duplicate_position")
    position = pydicom.dcmread(files[5]).ImagePositionPatient
    _rewrite([files[6]], lambda ds: setattr(ds, "ImagePositionPatient", position))
    cases.append(Case("duplicate_position", load_labels(studies[3])["study_instance_uid"], files,
                      slice_order="position along the slice normal (1 slices repeat another's position; all kept)"))

    # 5-6. Two studies whose instances alternate in one association.
    a = _copy_series(studies[4], root / "interleaved" / "a")
    b = _copy_series(studies[5], root / "interleaved" / "b")
    mixed = [f for pair in zip(a, b) for f in pair]
    cases.append(Case("interleaved_a", load_labels(studies[4])["study_instance_uid"], mixed))
    cases.append(Case("interleaved_b", load_labels(studies[5])["study_instance_uid"], []))

    # 7-9. Compressed transfer syntaxes: JPEG Lossless (DCMTK dcmcjpeg), JPEG 2000, RLE.
    dcmcjpeg = require_tool("dcmcjpeg")
    files = _copy_series(studies[6], root / "jpeg_lossless")
    for path in files:
        subprocess.run([dcmcjpeg, str(path), str(path)], check=True, capture_output=True, timeout=60)
    cases.append(Case("jpeg_lossless", load_labels(studies[6])["study_instance_uid"], files, storescu_args=["-xs"]))
    for name, syntax, study, propose in (("jpeg2000", JPEG2000Lossless, studies[7], "-xv"),
                                         ("rle", RLELossless, studies[8], "-xr")):
        files = _copy_series(study, root / name)
        _rewrite(files, lambda ds, syntax=syntax: ds.compress(syntax))
        cases.append(Case(name, load_labels(study)["study_instance_uid"], files, storescu_args=[propose]))

    # 10-11. Pixels that cannot give true HU: a study must fail saying why, never come
    #    back "not detected" (RescaleSlope 0 made a bleeding study look normal).
    for name, study, change, failure in (
            ("slope_zero", studies[9], lambda ds: setattr(ds, "RescaleSlope", 0), "RescaleSlope 0"),
            ("bits_mismatch", studies[10], lambda ds: setattr(ds, "BitsAllocated", 8), "BitsAllocated 8")):
        files = _copy_series(study, root / name)
        _rewrite(files, change)
        cases.append(Case(name, load_labels(study)["study_instance_uid"], files, failure=failure))

    # 12. A study whose SOPInstanceUIDs repeat those of another (mono1_tilt): a modality
    #    bug or a re-import. Both studies keep every instance and are analysed.
    files = _copy_series(studies[11], root / "reused_uids")
    reused = [pydicom.dcmread(f).SOPInstanceUID for f in sorted((root / "mono1_tilt").glob("*.dcm"))]
    for path, sop in zip(files, reused):
        ds = pydicom.dcmread(path)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
        ds.save_as(path, enforce_file_format=True)
    cases.append(Case("reused_uids", load_labels(studies[11])["study_instance_uid"], files))

    # Raw files, in a study of their own: cut short, and garbage after a valid preamble
    # and file meta. Only a byte-level sender sends these (storescu refuses to read them).
    raw = root / "raw"
    raw.mkdir()
    ds = pydicom.dcmread(sorted((root / "mono1_tilt").glob("*.dcm"))[0])
    _fresh_uids(ds, generate_uid(), generate_uid())
    ds.save_as(raw / "whole.dcm", enforce_file_format=True)
    data = (raw / "whole.dcm").read_bytes()
    (raw / "truncated.dcm").write_bytes(data[: len(data) // 2])
    meta_end = 132 + 12 + int.from_bytes(data[140:144], "little")  # preamble, DICM, group length
    (raw / "garbage.dcm").write_bytes(data[:meta_end] + np.random.default_rng(0).bytes(4096))
    return cases, {"truncated": raw / "truncated.dcm", "garbage": raw / "garbage.dcm"}
