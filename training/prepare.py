"""`ichnode prepare-rsna`: an RSNA-layout (or synthetic) DICOM set → split lists and a cache.

Input layouts:

- RSNA 2019: `stage_2_train.csv` (`ID_<id>_<subtype>,Label`) and `stage_2_train/ID_<id>.dcm`.
  Labels are the `_any` rows; duplicated rows are dropped; `ID_6431af929` (corrupt pixel
  data) is skipped, and any other unreadable file is reported, not fatal.
- Synthetic: the study folders of `ichnode synth` (`study_*/labels.json`).

Output folder::

    prepare.json         what was read, skipped, split and cached (and the windows used)
    headers.jsonl        journal of the headers read (an interrupted run resumes from it)
    slices.csv           every usable slice
    splits/{train,val,test}.csv   balanced lists (negatives under-sampled, as the paper)
    splits/test_full.csv          every slice of the test patients (unbalanced)
    cache/<image_id>.png          windowed 3-channel uint8 image at 512² (brain, subdural,
                                  soft tissue) of every slice a list uses, made in
                                  parallel; existing images are not made again

Patients come from PatientID; the split is the paper's: `random.seed(42)` shuffle of the
sorted patients, 90/5/5. Slices are ordered per series along the slice normal.
"""

from __future__ import annotations

import csv
import json
import os
import random
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from tqdm import tqdm

from training.errors import DataError
from training.model.preprocess import PAPER_WINDOWS, hu_from_dataset, pad_to_square, resize_bilinear, window_channels

__all__ = [
    "CACHE_SIZE",
    "KNOWN_CORRUPT",
    "SliceRecord",
    "read_rsna_labels",
    "split_patients",
    "prepare",
    "read_split",
    "load_cached_image",
]

CACHE_SIZE = 512
KNOWN_CORRUPT = frozenset({"ID_6431af929"})
SPLIT_SEED = 42
SPLIT_FRACTIONS = (0.90, 0.05, 0.05)
FIELDS = ["image_id", "patient_id", "study_uid", "series_uid", "position", "label", "cache", "source"]



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
    source: str  # the DICOM file it came from


def read_rsna_labels(csv_path: Path) -> tuple[dict[str, int], int]:
    """image id → label from the `_any` rows; returns (labels, duplicate rows dropped)."""
    labels: dict[str, int] = {}
    duplicates = 0
    with open(csv_path, newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ID", "Label"]:
            raise DataError(f"{csv_path} does not start with the RSNA header 'ID,Label'")
        for row in reader:
            if len(row) < 2 or not row[0].endswith("_any"):
                continue
            image_id = row[0][: -len("_any")]
            if image_id in labels:
                duplicates += 1
                continue
            labels[image_id] = int(float(row[1]))
    return labels, duplicates


def _slice_normal(ds: pydicom.Dataset) -> np.ndarray | None:
    try:
        orientation = [float(v) for v in ds.ImageOrientationPatient]
    except (AttributeError, TypeError, ValueError):
        return None
    return np.cross(orientation[:3], orientation[3:])


def cache_image(ds: pydicom.Dataset) -> np.ndarray:
    """The cached form of a slice: paper windows, square, 512², uint8 (H, W, 3)."""
    channels = window_channels(hu_from_dataset(ds), PAPER_WINDOWS)
    channels = resize_bilinear(pad_to_square(channels), CACHE_SIZE)
    return np.round(np.clip(channels, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)


def _read_header(image_id: str, source: str) -> dict:
    """Identity and order key of one file; an error entry when it cannot be read."""
    try:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        missing = [k for k in ("PatientID", "SeriesInstanceUID") if not ds.get(k)]
        if missing:  # patients and series order need both
            return {"image_id": image_id, "error": f"no {' or '.join(missing)} (truncated or incomplete file)"}
        normal = _slice_normal(ds)
        position = ds.get("ImagePositionPatient")
        if normal is not None and position:
            order = float(np.dot(normal, [float(v) for v in position]))
        else:
            order = float(ds.get("InstanceNumber", 0) or 0)
        return {
            "image_id": image_id,
            "patient_id": str(ds.PatientID),
            "study_uid": str(ds.get("StudyInstanceUID", "")),
            "series_uid": str(ds.get("SeriesInstanceUID", "")),
            "position": order,
        }
    except Exception as exc:  # a bad file is reported, never fatal
        return {"image_id": image_id, "error": f"{type(exc).__name__}: {exc}"}


def _write_cache(image_id: str, source: str, cache_path: str) -> dict:
    """Write one cache image unless it exists; an error entry when the pixels are bad."""
    if os.path.exists(cache_path):
        return {"image_id": image_id}
    try:
        tmp = f"{cache_path}.tmp.png"
        Image.fromarray(cache_image(pydicom.dcmread(source))).save(tmp)
        os.replace(tmp, cache_path)
        return {"image_id": image_id}
    except Exception as exc:  # corrupt pixel data: reported, not fatal
        return {"image_id": image_id, "error": f"{type(exc).__name__}: {exc}"}


def _parallel(function, jobs: list[tuple], workers: int, description: str, progress: bool):
    """Run `function(*job)` for every job in worker processes; yields results as they come."""
    if not jobs:
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(function, *job) for job in jobs]
        for future in tqdm(as_completed(futures), total=len(futures), desc=description,
                           unit="slice", disable=not progress):
            yield future.result()


def _rsna_items(data: Path) -> tuple[list[tuple[str, Path, int]], dict]:
    csv_path = data / "stage_2_train.csv"
    labels, duplicates = read_rsna_labels(csv_path)
    folder = data / "stage_2_train"
    items, skipped = [], {}
    for image_id, label in sorted(labels.items()):
        if image_id in KNOWN_CORRUPT:
            skipped[image_id] = "known corrupt pixel data (RSNA 2019)"
            continue
        path = folder / f"{image_id}.dcm"
        if not path.is_file():
            skipped[image_id] = f"file {path} missing"
            continue
        items.append((image_id, path, label))
    return items, {"layout": "rsna", "training_data": "rsna", "labels": len(labels),
                   "duplicate_rows_dropped": duplicates, "skipped": skipped}


def _synthetic_items(data: Path) -> tuple[list[tuple[str, Path, int]], dict]:
    items = []
    for labels_path in sorted(data.glob("study_*/labels.json")):
        labels = json.loads(labels_path.read_text())
        for entry in labels["slices"]:
            image_id = f"{labels_path.parent.name}_{entry['instance_number']:04d}"
            items.append((image_id, labels_path.parent / entry["file"], int(entry["label"])))
    return items, {"layout": "synthetic", "training_data": "synthetic", "labels": len(items),
                   "duplicate_rows_dropped": 0, "skipped": {}}


def detect_layout(data: Path) -> str:
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
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        for record in records:
            writer.writerow(asdict(record))


def read_split(path: Path) -> list[SliceRecord]:
    """A split list written by `prepare`."""
    with open(path, newline="") as handle:
        return [
            SliceRecord(r["image_id"], r["patient_id"], r["study_uid"], r["series_uid"],
                        float(r["position"]), int(r["label"]), r["cache"], r["source"])
            for r in csv.DictReader(handle)
        ]


def load_cached_image(path: Path) -> np.ndarray:
    """A cached uint8 image as float32 (3, 512, 512) in [0, 1]."""
    with Image.open(path) as image:
        return (np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).transpose(2, 0, 1)


def _headers(items, out: Path, workers: int, progress: bool) -> tuple[dict[str, dict], dict[str, str]]:
    """Headers of every file, journalled in headers.jsonl so an interrupted run resumes."""
    journal = out / "headers.jsonl"
    known: dict[str, dict] = {}
    if journal.is_file():
        for line in journal.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by the interruption
            known[entry["image_id"]] = entry
    todo = [(image_id, str(path)) for image_id, path, _ in items if image_id not in known]
    with open(journal, "a") as handle:
        for entry in _parallel(_read_header, todo, workers, "headers", progress):
            known[entry["image_id"]] = entry
            handle.write(json.dumps(entry) + "\n")
    errors = {k: v["error"] for k, v in known.items() if "error" in v}
    return {k: v for k, v in known.items() if "error" not in v}, errors


def prepare(data: Path, out: Path, *, workers: int | None = None,
            fractions: tuple[float, float, float] = SPLIT_FRACTIONS, progress: bool = True) -> dict:
    """Read `data`, split by patient, cache the slices the lists use, write the lists.

    Safe to interrupt and run again: headers read and images cached are kept.
    """
    data, out = Path(data), Path(out)
    layout = detect_layout(data)
    items, summary = (_rsna_items if layout == "rsna" else _synthetic_items)(data)
    (out / "cache").mkdir(parents=True, exist_ok=True)
    workers = workers or max(1, os.cpu_count() or 2)
    labels = {image_id: label for image_id, _, label in items}
    sources = {image_id: str(path) for image_id, path, _ in items}
    headers, skipped = _headers(items, out, workers, progress)
    skipped = {**summary["skipped"], **skipped}
    records = _ordered([
        SliceRecord(image_id, h["patient_id"], h["study_uid"], h["series_uid"], h["position"],
                    labels[image_id], f"cache/{image_id}.png", sources[image_id])
        for image_id, h in headers.items() if image_id in labels
    ])
    if not records:
        raise DataError(f"no usable slice in {data} ({len(skipped)} skipped)")
    groups = split_patients(sorted({r.patient_id for r in records}), fractions)
    rng = random.Random(SPLIT_SEED)
    lists: dict[str, list[SliceRecord]] = {}
    for name, patients in groups.items():
        members = set(patients)
        split = [r for r in records if r.patient_id in members]
        lists[name] = _balanced(split, rng)
        if name == "test":
            lists["test_full"] = split
    # Only slices some list uses are cached: the balanced lists leave most negatives out.
    needed = {r.image_id: r for split in lists.values() for r in split}
    jobs = [(r.image_id, r.source, str(out / r.cache)) for r in needed.values()]
    for result in _parallel(_write_cache, jobs, workers, "cache", progress):
        if "error" in result:
            skipped[result["image_id"]] = result["error"]
    lists = {name: [r for r in split if r.image_id not in skipped] for name, split in lists.items()}
    records = [r for r in records if r.image_id not in skipped]
    _write_csv(out / "slices.csv", records)
    for name, split in lists.items():
        _write_csv(out / "splits" / f"{name}.csv", split)
    summary.update({
        "data": str(data.resolve()),
        "skipped": skipped,
        "usable_slices": len(records),
        "positive_slices": sum(r.label for r in records),
        "cached_slices": len(needed) - len(set(needed) & set(skipped)),
        "patients": {name: len(p) for name, p in groups.items()},
        "split_seed": SPLIT_SEED,
        "split_fractions": list(fractions),
        "lists": {name: {"positive": sum(r.label for r in split), "negative": sum(1 - r.label for r in split)}
                  for name, split in lists.items()},
        "cache": {"size": CACHE_SIZE, "dtype": "uint8",
                  "windows": [asdict(w) for w in PAPER_WINDOWS]},
    })
    (out / "prepare.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    return summary
