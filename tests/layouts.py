"""Public data-set layouts (RSNA 2019, CQ500) made from `ichnode synth` studies, so that
the training tests read the folders users download without downloading them."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pydicom

SUBTYPES = ["epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural", "any"]


def _strip_synthetic_marks(ds: pydicom.Dataset) -> None:
    """Remove what says a file is an `ichnode synth` phantom, as another source's file would lack it."""
    ds.Manufacturer, ds.ImageComments = "ACME", ""
    ds.file_meta.ImplementationVersionName = "OTHER_1"


def rsna_layout(root: Path, studies: Path, *, strip_marks: bool = False, rsna_identity: bool = False,
                absent: int = 0) -> Path:
    """Every HEAD slice of `studies` as RSNA 2019's stage_2_train/ and stage_2_train.csv;
    optionally without the synthetic marks, named by SOPInstanceUID as RSNA's de-identified
    files are (`rsna_identity`), and with `absent` more images listed but not downloaded."""
    images = root / "stage_2_train"
    images.mkdir(parents=True)
    rows = []
    for n, labels_path in enumerate(sorted(studies.glob("study_*/labels.json"))):
        for entry in json.loads(labels_path.read_text())["slices"]:
            image_id = f"ID_{n:02d}{entry['instance_number']:03d}aa"
            ds = pydicom.dcmread(labels_path.parent / entry["file"])
            if strip_marks:
                _strip_synthetic_marks(ds)
            if rsna_identity:
                with warnings.catch_warnings():  # RSNA's "ID_…" is not a valid UID
                    warnings.simplefilter("ignore", UserWarning)
                    ds.SOPInstanceUID = image_id
            ds.save_as(images / f"{image_id}.dcm")
            rows += [(f"{image_id}_{s}", entry["label"] if s == "any" else int(s in entry["subtypes"]))
                     for s in SUBTYPES]
    rows += [(f"ID_gone{n:05d}_any", 0) for n in range(absent)]
    with open(root / "stage_2_train.csv", "w", newline="") as handle:
        csv.writer(handle).writerows([("ID", "Label"), *rows])
    return root


def cq500_layout(root: Path, studies: Path, *, patients: int, strip_marks: bool = False,
                 third_reader_disagrees: bool = False) -> Path:
    """The HEAD series of the first `patients` studies in the CQ500 layout (reads.csv with
    three readers' ICH calls, one folder per patient)."""
    rows = []
    for n, labels_path in enumerate(sorted(studies.glob("study_*/labels.json"))[:patients]):
        name = f"CQ500-CT-{n}"
        folder = root / f"CQ500CT{n} CQ500CT{n}" / "Unknown Study" / "CT 5mm"
        folder.mkdir(parents=True)
        for path in sorted((labels_path.parent / "HEAD").glob("*.dcm")):
            ds = pydicom.dcmread(path)
            ds.PatientID = name
            if strip_marks:
                _strip_synthetic_marks(ds)
            ds.save_as(folder / path.name)
        positive = int(json.loads(labels_path.read_text())["positive"])
        third = 1 - positive if third_reader_disagrees else positive
        rows.append({"name": name, "Category": "", "R1:ICH": positive, "R2:ICH": positive, "R3:ICH": third})
    with open(root / "reads.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root
