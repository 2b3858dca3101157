"""`ichnode prepare-rsna`: an RSNA-layout (or synthetic) DICOM set → split lists and a cache.

Input layouts:

- RSNA 2019: `stage_2_train.csv` (`ID_<id>_<subtype>,Label`) and `stage_2_train/ID_<id>.dcm`.
  Labels are the `_any` rows; duplicated rows are dropped; `ID_6431af929` (corrupt pixel
  data) is skipped, and any other unreadable file is reported, not fatal.
- Synthetic: the study folders of `ichnode synth` (`study_*/labels.json`).

Output folder::

    prepare.json         what was read, skipped, split and cached (and the windows used)
    headers.jsonl        journal of the headers read, each with its file's path, size and
                         modification time (an interrupted run resumes from it; a file that
                         changed is read again)
    slices.csv           every usable slice
    splits/{train,val,test}.csv   balanced lists (negatives under-sampled, as the paper)
    splits/{val,test}_full.csv    every slice of the validation and test patients (unbalanced)
    cache/<image_id>.png          windowed 3-channel uint8 image at 512² (brain, subdural,
                                  soft tissue) of every slice a list uses, made in
                                  parallel. Each PNG names the source it was made
                                  from (path, size, modification time, SOPInstanceUID,
                                  windows); one that matches is reused, any other is made
                                  again, and images no list uses are removed, so a folder
                                  prepared again from other data never mixes the two

Every `source` (in the lists, the journal and the cache images) is the DICOM file's path
relative to the data folder (`--data`), whose absolute path prepare.json records for
information only: a folder prepared from any working directory, or from the same data
mounted elsewhere, has the same lists and reuses its cache, and the readers of the lists
look for the files under the data folder they are given (`source_root`).

Patients come from PatientID; the split is the paper's: `random.seed(42)` shuffle of the
sorted patients, 90/5/5. Slices are ordered per series along the slice normal.

What the data is (`training_data`, which every checkpoint trained on it carries) is read
from the files, not guessed from the layout: ichnode's synthetic phantoms say so in their
headers and make the data "synthetic", whatever the layout; RSNA 2019's de-identified files
carry their file id as SOPInstanceUID and make it "rsna"; anything else is "other". The
user may state it (`--training-data`), but data holding synthetic phantoms is never called
anything but "synthetic".
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import warnings
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath

import numpy as np
import pydicom
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm import tqdm

from training.errors import DataError
from training.model import attributes as attr
from training.model.preprocess import (
    PAPER_WINDOWS,
    hu_from_dataset,
    pad_to_square,
    resize_bilinear,
    window_channels,
)
from training.synthetic import is_synthetic_dataset

__all__ = [
    "CACHE_SIZE",
    "DATA_KINDS",
    "SOURCE_PATHS",
    "KNOWN_CORRUPT",
    "RsnaLabels",
    "SliceRecord",
    "check_data_folder",
    "read_rsna_labels",
    "split_patients",
    "prepare",
    "read_split",
    "SourceRoot",
    "source_root",
    "load_cached_image",
]

CACHE_SIZE = 512
KNOWN_CORRUPT = frozenset({"ID_6431af929"})
SPLIT_SEED = 42
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
FIELDS = ["image_id", "patient_id", "study_uid", "series_uid", "position", "label", "cache", "source", "subtypes"]
RSNA_SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
# What prepared data can be called (a checkpoint's Provenance.training_data, less "none").
DATA_KINDS = ("synthetic", "rsna", "other")
# Above this share of the images the CSV lists missing, prepare warns (a complete RSNA
# download misses none; a few are reported under `skipped` only).
MISSING_WARNING_SHARE = 0.01
CACHE_TAG = "ichnode-source"  # the PNG text chunk naming what a cache image was made from
# prepare.json's `source_paths`: how the lists write `source`. Folders without it were
# prepared by an earlier ichnode, whose sources were the paths as given on its command line.
SOURCE_PATHS = "relative to data"


@dataclass(frozen=True)
class SliceRecord:
    """One usable slice: identity, order key, label and where its cached image is."""

    image_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    position: float
    label: int
    cache: str  # relative to the prepared folder
    source: str  # the DICOM file it came from, relative to the data folder (POSIX separators)
    subtypes: str = ""  # the RSNA subtypes present, ';'-separated (empty: none, or not known)


@dataclass(frozen=True)
class RsnaLabels:
    """The labels of stage_2_train.csv: `any` per image, the subtypes present, duplicates dropped."""

    any: dict[str, int]
    subtypes: dict[str, tuple[str, ...]]
    duplicate_rows: int


def _label_value(text: str, csv_path: Path, line: int, row_id: str) -> int:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if value not in (0.0, 1.0):
        raise DataError(f"{csv_path} line {line}: the label of {row_id} is {text!r}, not 0 or 1")
    return int(value)


def read_rsna_labels(csv_path: Path) -> RsnaLabels:
    """Labels from the `_any` rows and the subtypes from the others. A repeated row is
    dropped (counted once per repeated `_any` row); DataError names the line of a label
    that is not 0 or 1, of a row repeated with another label, and of a subtype present
    in an image whose `any` is 0; and says so when the file has no `_any` rows."""
    labels: dict[str, tuple[int, int]] = {}  # image → (label, line)
    subtypes: dict[str, dict[str, tuple[int, int]]] = {}
    duplicates = 0
    with open(csv_path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ID", "Label"]:
            raise DataError(f"{csv_path} does not start with the RSNA header 'ID,Label'")
        for line, row in enumerate(reader, start=2):
            if len(row) < 2 or "_" not in row[0]:
                continue
            image_id, subtype = row[0].rsplit("_", 1)
            if subtype == "any":
                seen = labels.get(image_id)
                labels[image_id] = _same_label(seen, _label_value(row[1], csv_path, line, row[0]), csv_path, line,
                                               row[0])
                duplicates += seen is not None
            elif subtype in RSNA_SUBTYPES:
                named = subtypes.setdefault(image_id, {})
                named[subtype] = _same_label(named.get(subtype), _label_value(row[1], csv_path, line, row[0]),
                                             csv_path, line, row[0])
    if not labels:
        raise DataError(f"{csv_path} has no '<image>_any' rows: each image's label comes from its ID_…_any row "
                        "(the RSNA 2019 format), so there is nothing to train on")
    for image_id, values in subtypes.items():
        present = [(name, line) for name, (value, line) in values.items() if value]
        if present and image_id in labels and labels[image_id][0] == 0:
            (name, line), any_line = present[0], labels[image_id][1]
            raise DataError(f"{csv_path} line {line}: {image_id}_{name} is 1 but {image_id}_any is 0 (line "
                            f"{any_line}); a subtype present means a bleed, so the labels contradict each other")
    present_subtypes = {image_id: tuple(name for name in RSNA_SUBTYPES if values.get(name, (0, 0))[0])
                        for image_id, values in subtypes.items()}
    return RsnaLabels({image_id: label for image_id, (label, _) in labels.items()}, present_subtypes, duplicates)


def _same_label(seen: tuple[int, int] | None, value: int, csv_path: Path, line: int, row_id: str) -> tuple[int, int]:
    """(label, line) of a row; a repeat must repeat the label (and keeps the first line)."""
    if seen is None:
        return value, line
    if seen[0] != value:
        raise DataError(f"{csv_path} line {line}: {row_id} is {value}, but line {seen[1]} gave it {seen[0]}; "
                        "remove the row that is wrong")
    return seen


def _slice_normal(ds: pydicom.Dataset) -> np.ndarray | None:
    orientation = attr.numbers(ds, "ImageOrientationPatient", 6)
    return None if orientation is None else np.cross(orientation[:3], orientation[3:])


def cache_image(ds: pydicom.Dataset) -> np.ndarray:
    """The cached form of a slice: paper windows, square, 512², uint8 (H, W, 3)."""
    channels = window_channels(hu_from_dataset(ds), PAPER_WINDOWS)
    channels = resize_bilinear(pad_to_square(channels), CACHE_SIZE)
    return np.round(np.clip(channels, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def fingerprint(path: str | Path, source: str) -> dict:
    """What identifies a source file's content without reading it: its path relative to
    the data folder (`source`), size and modification time (as make and rsync judge it).
    `path` is where the file is now."""
    stat = os.stat(path)
    return {"source": source, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _read_header(image_id: str, path: str, source: str) -> dict:
    """Identity, order key, origin marks and the file's fingerprint; an error entry when
    it cannot be read."""
    try:
        entry = {"image_id": image_id, **fingerprint(path, source)}
        return {**entry, **_header_fields(image_id, pydicom.dcmread(path, stop_before_pixels=True))}
    except Exception as exc:  # a bad file is reported, never fatal
        return {"image_id": image_id, "source": source, "error": f"{type(exc).__name__}: {exc}"}


def _header_fields(image_id: str, ds: pydicom.Dataset) -> dict:
    # RSNA 2019's UIDs ("ID_…") are not valid UIDs; pydicom would warn once per file.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        missing = [k for k in ("PatientID", "SeriesInstanceUID") if not attr.text(ds, k)]
        if missing:  # patients and series order need both
            return {"error": f"no {' or '.join(missing)} (truncated or incomplete file)"}
        normal = _slice_normal(ds)
        position = attr.numbers(ds, "ImagePositionPatient", 3)
        if normal is not None and position is not None:
            order = float(np.dot(normal, position))
        else:
            order = float(attr.integer(ds, "InstanceNumber") or 0)
        sop_uid = attr.text(ds, "SOPInstanceUID")
        return {
            "patient_id": attr.text(ds, "PatientID"),
            "study_uid": attr.text(ds, "StudyInstanceUID"),
            "series_uid": attr.text(ds, "SeriesInstanceUID"),
            "sop_instance_uid": sop_uid,
            "position": order,
            "synthetic": is_synthetic_dataset(ds),
            # RSNA 2019's de-identification names each file after its SOPInstanceUID.
            "rsna_identity": sop_uid == image_id and image_id.startswith("ID_"),
        }


def _cache_tag(header: dict) -> str:
    """The text a cache image carries: the source it was made from and how."""
    return json.dumps({"source": header["source"], "size": header["size"], "mtime_ns": header["mtime_ns"],
                       "sop_instance_uid": header["sop_instance_uid"], "cache_size": CACHE_SIZE,
                       "windows": [asdict(w) for w in PAPER_WINDOWS]}, sort_keys=True)


def _cached_tag(path: str) -> str | None:
    try:
        with Image.open(path) as image:
            return image.text.get(CACHE_TAG)
    except Exception:  # unreadable or cut short: made again
        return None


def _write_cache(image_id: str, path: str, cache_path: str, tag: str) -> dict:
    """Write one cache image unless one made from this very source exists; an error entry
    when the pixels are bad."""
    if os.path.exists(cache_path) and _cached_tag(cache_path) == tag:
        return {"image_id": image_id, "reused": True}
    try:
        tmp = f"{cache_path}.tmp.png"
        info = PngInfo()
        info.add_text(CACHE_TAG, tag)
        Image.fromarray(cache_image(pydicom.dcmread(path))).save(tmp, pnginfo=info)
        os.replace(tmp, cache_path)
        return {"image_id": image_id, "reused": False}
    except Exception as exc:  # corrupt pixel data: reported, not fatal
        return {"image_id": image_id, "error": f"{type(exc).__name__}: {exc}"}


def _parallel(function, jobs: list[tuple], workers: int, description: str, progress: bool):
    """Run `function(*job)` for every job in worker processes; yields results as they come."""
    if not jobs:
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(function, *job) for job in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc=description,
                           unit="slice", disable=None if progress else True):
            yield future.result()


@dataclass(frozen=True)
class _Item:
    image_id: str
    path: Path  # where the file is read from now
    source: str  # the file relative to the data folder, as the lists write it
    label: int
    subtypes: tuple[str, ...]


def _rsna_items(data: Path) -> tuple[list[_Item], dict]:
    csv_path = data / "stage_2_train.csv"
    labels = read_rsna_labels(csv_path)
    folder = data / "stage_2_train"
    items, skipped = [], {}
    for image_id, label in sorted(labels.any.items()):
        if image_id in KNOWN_CORRUPT:
            skipped[image_id] = "known corrupt pixel data (RSNA 2019)"
            continue
        path = folder / f"{image_id}.dcm"
        if not path.is_file():
            skipped[image_id] = f"file {path} missing"
            continue
        items.append(_Item(image_id, path, path.relative_to(data).as_posix(), label,
                           labels.subtypes.get(image_id, ())))
    missing = sum(reason.startswith("file ") for reason in skipped.values())
    notes = [f"{missing} of the {len(labels.any)} images {csv_path.name} lists ({missing / len(labels.any):.0%}) "
                f"are missing from {folder}: the lists are made from the rest (a partial download, or the wrong "
                "folder?)"] if missing > MISSING_WARNING_SHARE * len(labels.any) else []
    return items, {"layout": "rsna", "labels": len(labels.any), "duplicate_rows_dropped": labels.duplicate_rows,
                   "skipped": skipped, "warnings": notes}


def _synthetic_items(data: Path) -> tuple[list[_Item], dict]:
    items = []
    for labels_path in sorted(data.glob("study_*/labels.json")):
        labels = json.loads(labels_path.read_text())
        for entry in labels["slices"]:
            image_id = f"{labels_path.parent.name}_{entry['instance_number']:04d}"
            path = labels_path.parent / entry["file"]
            items.append(_Item(image_id, path, path.relative_to(data).as_posix(), int(entry["label"]),
                               tuple(entry.get("subtypes", ()))))
    return items, {"layout": "synthetic", "labels": len(items), "duplicate_rows_dropped": 0, "skipped": {},
                   "warnings": []}


def check_data_folder(data: Path) -> None:
    """DataError when the data folder given is not there, before any layout is looked for."""
    if not data.is_dir():
        raise DataError(f"data folder {data} {'is not a folder' if data.exists() else 'does not exist'}"
                        + ("" if data.is_absolute() else f" (relative to the working directory {Path.cwd()})"))


def detect_layout(data: Path) -> str:
    check_data_folder(data)
    if (data / "stage_2_train.csv").is_file():
        return "rsna"
    if any(data.glob("study_*/labels.json")):
        return "synthetic"
    raise DataError(
        f"{data} holds neither stage_2_train.csv (RSNA layout) nor study_*/labels.json "
        "(synthetic studies from `ichnode synth`)"
    )


def split_patients(patients: list[str], fractions: tuple[float, float, float] = SPLIT_FRACTIONS,
                   seed: int = SPLIT_SEED) -> dict[str, list[str]]:
    """The paper's patient split: sort, `random.seed(seed)` shuffle, cut 90/5/5.

    With few patients, validation and test each keep at least one (when there are three)."""
    shuffled = sorted(patients)
    random.seed(seed)
    random.shuffle(shuffled)
    n = len(shuffled)
    n_val = max(1 if n >= 3 else 0, int(round(fractions[1] * n)))
    n_test = max(1 if n >= 3 else 0, int(round(fractions[2] * n)))
    n_train = n - n_val - n_test
    return {"train": shuffled[:n_train], "val": shuffled[n_train:n_train + n_val],
            "test": shuffled[n_train + n_val:]}


def _balanced(records: list[SliceRecord], rng: random.Random) -> list[SliceRecord]:
    """All positives and as many randomly chosen negatives (fewer if there are fewer)."""
    positives = [r for r in records if r.label == 1]
    negatives = [r for r in records if r.label == 0]
    chosen = rng.sample(negatives, min(len(positives), len(negatives)))
    return _ordered(positives + chosen)


def _ordered(records: list[SliceRecord]) -> list[SliceRecord]:
    return sorted(records, key=lambda r: (r.patient_id, r.study_uid, r.series_uid, r.position, r.image_id))


def _write_csv(path: Path, records: list[SliceRecord]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for record in records:
            writer.writerow(asdict(record))


def read_split(path: Path) -> list[SliceRecord]:
    """A split list written by `prepare`."""
    with open(path, newline="") as handle:
        return [
            SliceRecord(r["image_id"], r["patient_id"], r["study_uid"], r["series_uid"],
                        float(r["position"]), int(r["label"]), r["cache"], r["source"], r.get("subtypes") or "")
            for r in csv.DictReader(handle)
        ]


@dataclass(frozen=True)
class SourceRoot:
    """Where the DICOM files of a prepared folder's lists are looked for now: the data
    folder given now, or else the one prepare-rsna recorded."""

    folder: Path  # absolute
    given: bool  # named now (--data-root); False: the folder recorded in prepare.json
    layout: str  # "rsna" or "synthetic"
    legacy: bool  # the lists are an earlier ichnode's, whose sources were paths as given to it

    def path(self, record: SliceRecord) -> Path:
        """The file `record` came from, under this folder."""
        return self.folder / (_legacy_source(record, self.layout) if self.legacy else record.source)

    def describe(self) -> str:
        return f"{self.folder} ({'given' if self.given else 'the data folder recorded by prepare-rsna'})"


def _legacy_source(record: SliceRecord, layout: str) -> str:
    """An earlier ichnode's source (the path as given to prepare-rsna, absolute or relative
    to its working directory) made relative to the data folder: its layout fixes the tail
    (stage_2_train/<image_id>.dcm; study_*/… of the study the image_id names)."""
    parts = PurePath(record.source).parts
    study = record.image_id.rsplit("_", 1)[0]
    if layout == "rsna" and len(parts) >= 2 and parts[-2] == "stage_2_train":
        return PurePath(*parts[-2:]).as_posix()
    if layout == "synthetic" and study in parts:
        return PurePath(*parts[len(parts) - 1 - parts[::-1].index(study):]).as_posix()
    raise DataError(f"the source {record.source!r} of {record.image_id}, written by an earlier ichnode, cannot be "
                    "placed under the data folder: run `ichnode prepare-rsna` again on this folder")


def source_root(prepared: Path, given: Path | None = None) -> SourceRoot:
    """Where to look for the sources of `prepared`'s lists: `given`, or the data folder
    recorded when it was prepared (which need not exist any more: each missing file is
    then reported by whoever reads it)."""
    summary = json.loads((Path(prepared) / "prepare.json").read_text())
    if given is not None and not Path(given).is_dir():
        raise DataError(f"the data folder {given} given for the sources of {prepared} "
                        f"{'is not a folder' if Path(given).exists() else 'does not exist'}")
    folder = Path(given if given is not None else summary["data"]).resolve()
    return SourceRoot(folder, given is not None, summary["layout"], summary.get("source_paths") != SOURCE_PATHS)


def load_cached_image(path: Path) -> np.ndarray:
    """A cached uint8 image as float32 (3, 512, 512) in [0, 1]."""
    with Image.open(path) as image:
        return (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1)


def _headers(items: list[_Item], out: Path, workers: int, progress: bool) -> tuple[dict[str, dict], dict[str, str]]:
    """Headers of every file, journalled in headers.jsonl so an interrupted run resumes.
    A journalled header is used only while its file is unchanged (same path, size and
    modification time); otherwise the file is read again."""
    journal = out / "headers.jsonl"
    known: dict[str, dict] = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            known[entry["image_id"]] = entry
    current: dict[str, dict] = {}
    todo = []
    for item in items:
        entry = known.get(item.image_id)
        try:
            same = entry is not None and "error" not in entry and all(
                entry.get(k) == v for k, v in fingerprint(item.path, item.source).items())
        except OSError:
            same = False
        if same:
            current[item.image_id] = entry
        else:
            todo.append((item.image_id, str(item.path), item.source))
    with open(journal, "a") as handle:
        for entry in _parallel(_read_header, todo, workers, "headers", progress):
            current[entry["image_id"]] = entry
            handle.write(json.dumps(entry) + "\n")
    errors = {k: v["error"] for k, v in current.items() if "error" in v}
    return {k: v for k, v in current.items() if "error" not in v}, errors


def _provenance(layout: str, headers: list[dict], stated: str | None, data: Path) -> dict:
    """What the data is, from the files' own marks; a statement that contradicts them is refused."""
    synthetic = sum(1 for h in headers if h["synthetic"])
    rsna = sum(1 for h in headers if h["rsna_identity"])
    if synthetic:
        derived = "synthetic"
    elif layout == "rsna" and rsna == len(headers):
        derived = "rsna"
    else:
        derived = "other"
    if stated is not None and stated not in DATA_KINDS:
        raise DataError(f"training data must be one of {', '.join(DATA_KINDS)}, got {stated!r}")
    if synthetic and stated not in (None, "synthetic"):
        raise DataError(
            f"{data} holds {synthetic} of {len(headers)} slices that are ichnode synthetic phantoms (their "
            f"headers say so: Manufacturer, ImageComments); data with synthetic slices is 'synthetic', never "
            f"{stated!r}. Leave them out or prepare without --training-data")
    return {"training_data": stated or derived, "stated_by": "user" if stated else "the data",
            "derived_from_data": derived, "synthetic_slices": synthetic, "rsna_identity_slices": rsna,
            "slices_read": len(headers)}


def _remove_stale_cache(cache: Path, needed: set[str]) -> int:
    """Cache images no list of this preparation uses (an earlier data set's, half-written ones)."""
    removed = 0
    for path in cache.glob("*.png"):
        if path.name not in needed:
            path.unlink()
            removed += 1
    return removed


def _list_warnings(lists: dict[str, list[SliceRecord]]) -> list[str]:
    warnings = []
    for name in ("train", "val", "test"):
        split = lists[name]
        positives = sum(r.label for r in split)
        if not split:
            warnings.append(f"the {name} list is empty (too few patients, or no slice with ICH among them)")
        elif positives in (0, len(split)):
            warnings.append(f"the {name} list holds one class only ({len(split)} slices)")
    return warnings


def prepare(data: Path, out: Path, *, workers: int | None = None,
            fractions: tuple[float, float, float] = SPLIT_FRACTIONS, progress: bool = True,
            training_data: str | None = None) -> dict:
    """Read `data`, split by patient, cache the slices the lists use, write the lists.

    Safe to interrupt and to run again, on the same data or on other data: headers and
    cache images are reused only where their source file is unchanged. `training_data`
    states what the data is; by default it is read from the files (see the module).
    """
    data, out = Path(data), Path(out)
    layout = detect_layout(data)
    items, summary = (_rsna_items if layout == "rsna" else _synthetic_items)(data)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, os.cpu_count() or 2)
    by_id = {item.image_id: item for item in items}
    headers, skipped = _headers(items, out, workers, progress)
    skipped = {**summary["skipped"], **skipped}
    records = _ordered([
        SliceRecord(image_id, h["patient_id"], h["study_uid"], h["series_uid"], h["position"],
                    by_id[image_id].label, f"cache/{image_id}.png", by_id[image_id].source,
                    ";".join(by_id[image_id].subtypes))
        for image_id, h in headers.items() if image_id in by_id
    ])
    if not records:
        raise DataError(f"no usable slice in {data} ({len(skipped)} skipped)")
    provenance = _provenance(layout, [headers[r.image_id] for r in records], training_data, data)
    groups = split_patients(sorted({r.patient_id for r in records}), fractions)
    rng = random.Random(SPLIT_SEED)
    lists: dict[str, list[SliceRecord]] = {}
    for name, patients in groups.items():
        members = set(patients)
        split = [r for r in records if r.patient_id in members]
        lists[name] = _balanced(split, rng)
        if name in ("val", "test"):  # whole patients, to choose on (val) and to report on (test)
            lists[f"{name}_full"] = split
    # Only slices some list uses are cached: the balanced lists leave most negatives out.
    needed = {r.image_id: r for split in lists.values() for r in split}
    jobs = [(r.image_id, str(by_id[r.image_id].path), str(out / r.cache), _cache_tag(headers[r.image_id]))
            for r in needed.values()]
    reused = 0
    for result in _parallel(_write_cache, jobs, workers, "cache", progress):
        if "error" in result:
            skipped[result["image_id"]] = result["error"]
        reused += bool(result.get("reused"))
    removed = _remove_stale_cache(out / "cache", {Path(r.cache).name for r in needed.values()})
    lists = {name: [r for r in split if r.image_id not in skipped] for name, split in lists.items()}
    records = [r for r in records if r.image_id not in skipped]
    _write_csv(out / "slices.csv", records)
    for name, split in lists.items():
        _write_csv(out / "splits" / f"{name}.csv", split)
    cached = len(needed) - len(set(needed) & set(skipped))
    summary.update({
        "data": str(data.resolve()),  # for information: the lists' sources are relative to it
        "source_paths": SOURCE_PATHS,
        "training_data": provenance["training_data"],
        "provenance": provenance,
        "skipped": skipped,
        "usable_slices": len(records),
        "positive_slices": sum(r.label for r in records),
        "cached_slices": cached,
        "cache_reused": reused,
        "cache_made": cached - reused,
        "cache_removed": removed,
        "patients": {name: len(p) for name, p in groups.items()},
        "split_seed": SPLIT_SEED,
        "split_fractions": list(fractions),
        "lists": {name: {"positive": sum(r.label for r in split), "negative": sum(1 - r.label for r in split)}
                  for name, split in lists.items()},
        "warnings": summary["warnings"] + _list_warnings(lists),
        "list_fields": FIELDS,
        "cache": {"size": CACHE_SIZE, "dtype": "uint8",
                  "windows": [asdict(w) for w in PAPER_WINDOWS]},
    })
    (out / "prepare.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary
