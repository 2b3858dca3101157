"""Slices for training and evaluation, from a prepared folder, synthetic studies or CQ500.

Training reads the cache of `prepare-rsna`; evaluation can also read DICOM directly (the
synthetic studies of `ichnode synth`, CQ500) with the checkpoint's own preprocessing.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from torch.utils.data import Dataset, Sampler

from training.errors import DataError, NoAnalysableSeries
from training.inference.predictor import Predictor
from training.model import attributes as attr
from training.model.preprocess import PreprocessSpec, windowed_to_input
from training.model.series import choose_head_series, read_header
from training.prepare import SliceRecord, SourceRoot, check_data_folder, load_cached_image, read_split, source_root
from training.synthetic import is_synthetic_dataset

__all__ = [
    "CachedSlices",
    "EpochOrder",
    "EvalSlice",
    "EvalStudy",
    "EvalSet",
    "check_cache_matches",
    "load_eval_set",
    "load_training_slices",
]


def check_cache_matches(prepared: Path, spec: PreprocessSpec) -> None:
    """The cache was windowed once; a model with other windows cannot use it."""
    summary_path = prepared / "prepare.json"
    if not summary_path.is_file():
        raise DataError(f"{prepared} is not a prepared folder (no prepare.json); run `ichnode prepare-rsna`")
    windows = json.loads(summary_path.read_text())["cache"]["windows"]
    wanted = [{"name": w.name, "low": w.low, "high": w.high} for w in spec.windows]
    if windows != wanted:
        raise DataError(f"{prepared} was cached with windows {windows}, the model needs {wanted}")


class CachedSlices(Dataset):
    """(input, label) pairs from one split list of a prepared folder.

    `flips` adds the paper's only augmentation: random horizontal and vertical flips. The
    draws of an item are keyed by (seed, epoch, index), not taken from a generator that
    DataLoader workers would copy: so every slice gets its own draws whatever the number
    of workers, and a resumed run draws exactly what the uninterrupted one would have.
    An item is asked for by index (epoch 0) or by (index, epoch), as `EpochOrder` yields.
    """

    def __init__(self, prepared: Path, split: str, spec: PreprocessSpec, *, flips: bool = False,
                 seed: int = 0) -> None:
        self.prepared = Path(prepared)
        path = self.prepared / "splits" / f"{split}.csv"
        if not path.is_file():
            raise DataError(f"{path} not found; run `ichnode prepare-rsna` first")
        check_cache_matches(self.prepared, spec)
        self.records = read_split(path)
        self.spec = spec
        self.flips = flips
        self.seed = seed

    def __len__(self) -> int:
        return len(self.records)

    def flip_draws(self, index: int, epoch: int = 0) -> tuple[bool, bool]:
        """(horizontal, vertical) flips of item `index` in `epoch`."""
        draws = np.random.default_rng([self.seed, epoch, index]).random(2)
        return bool(draws[0] < 0.5), bool(draws[1] < 0.5)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        index, epoch = key if isinstance(key, tuple) else (key, 0)
        record = self.records[index]
        x = windowed_to_input(load_cached_image(self.prepared / record.cache), self.spec)
        if self.flips:
            horizontal, vertical = self.flip_draws(index, epoch)
            if horizontal:
                x = x[:, :, ::-1]
            if vertical:
                x = x[:, ::-1, :]
        return torch.from_numpy(np.ascontiguousarray(x)), record.label

    @property
    def labels(self) -> np.ndarray:
        return np.array([r.label for r in self.records])


class EpochOrder(Sampler):
    """The training order: each epoch a permutation drawn from (seed, epoch), shared out
    among `world` processes as DistributedSampler does (padded by repeating its start),
    read from position `skip` on; every item comes with its epoch for the augmentation
    draws. Being a function of (seed, epoch, skip) alone, it needs no state to resume."""

    def __init__(self, size: int, *, seed: int, rank: int = 0, world: int = 1) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.skip = 0, 0

    @property
    def per_process(self) -> int:
        """Items each process sees in a whole epoch."""
        return math.ceil(self.size / self.world)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = self.per_process * self.world
        order = (order * math.ceil(total / max(len(order), 1)))[:total]
        mine = order[self.rank::self.world]
        return iter([(index, self.epoch) for index in mine[self.skip:]])

    def __len__(self) -> int:
        return max(0, self.per_process - self.skip)


@dataclass(frozen=True)
class EvalSlice:
    image_id: str
    group: str  # patient or study: bootstrap resamples whole groups
    label: int | None
    source: Path | None  # a DICOM file
    cache: Path | None  # a prepared cache image (preferred when present)
    subtypes: tuple[str, ...] | None = None  # the bleed subtypes present; None when not known


@dataclass(frozen=True)
class EvalStudy:
    study_id: str  # a patient (RSNA, CQ500) or a study (synthetic)
    label: int | None  # None: unknown (a real scan in the out-of-distribution set)
    slices: list[EvalSlice]  # ordered inferior → superior
    mask_folder: Path | None = None  # synthetic: its mask.npz has one lesion mask per slice, in this order
    kind: str = ""  # what it is, when a set mixes kinds: a synthetic shift, a real scan (`ichnode ood-set`)


@dataclass(frozen=True)
class EvalSet:
    """What `evaluate` measures: slices with labels and/or studies with labels."""

    description: str
    synthetic: bool
    slice_level: list[EvalSlice]  # empty when slice labels do not exist (CQ500)
    studies: list[EvalStudy]
    source_root: SourceRoot | None = None  # a prepared folder's: where its DICOM files were looked for

    def load(self, item: EvalSlice, predictor: Predictor) -> np.ndarray:
        """Network input for one slice, prepared by the predictor that will run it."""
        if item.cache is not None:
            return predictor.prepare_windowed(load_cached_image(item.cache))
        return predictor.prepare_slice(pydicom.dcmread(item.source))


def _prepared_kind(summary: dict) -> tuple[str, bool]:
    """What a prepared folder's data is, in words, and whether it is synthetic."""
    # Folders prepared before `provenance` existed guessed what the data is from the layout.
    data_kind = summary["training_data"] if "provenance" in summary else None
    synthetic = data_kind == "synthetic" or summary["layout"] == "synthetic"
    kind = {"synthetic": "synthetic phantoms (ichnode synth) - NOT clinical data", "rsna": "RSNA 2019 ICH"}.get(
        "synthetic" if synthetic else data_kind,
        f"{summary['layout']}-layout data" + ("" if data_kind else " (prepared by an earlier ichnode, which did not "
                                              "read what the data is: run prepare-rsna again)"))
    return kind, synthetic


SPLIT_NAMES = {"test": "held-out test split", "val": "validation split"}


def _from_prepared(prepared: Path, spec: PreprocessSpec, split: str, data_root: Path | None) -> EvalSet:
    """The balanced list and every slice of the patients of one split: `test` to report,
    `val` to choose on (an operating point, an input profile's limits). The DICOM files
    are looked for under `data_root`, or else the data folder prepare-rsna read."""
    check_cache_matches(prepared, spec)
    full = prepared / "splits" / f"{split}_full.csv"
    if not full.is_file():
        raise DataError(f"{prepared} has no {full.name} (every slice of the {SPLIT_NAMES[split]}'s patients): it "
                        "was prepared by an earlier ichnode; run `ichnode prepare-rsna` again")
    summary = json.loads((prepared / "prepare.json").read_text())
    root = source_root(prepared, data_root)

    def as_slice(r: SliceRecord) -> EvalSlice:
        subtypes = tuple(r.subtypes.split(";")) if r.subtypes else ()
        return EvalSlice(r.image_id, r.patient_id, r.label, root.path(r), prepared / r.cache,
                         subtypes if "subtypes" in summary.get("list_fields", ()) else None)
    balanced = [as_slice(r) for r in read_split(prepared / "splits" / f"{split}.csv")]
    by_patient: dict[str, list[SliceRecord]] = {}
    for record in read_split(full):
        by_patient.setdefault(record.patient_id, []).append(record)
    studies = [
        EvalStudy(patient, int(any(r.label for r in records)), [as_slice(r) for r in records])
        for patient, records in sorted(by_patient.items())
    ]
    kind, synthetic = _prepared_kind(summary)
    description = (
        f"{kind}, {SPLIT_NAMES[split]} of {prepared} (patients split 90/5/5, seed "
        f"{summary['split_seed']}): {len(balanced)} slices balanced for slice level, "
        f"{len(studies)} patients with all their slices for patient level"
    )
    return EvalSet(description, synthetic, balanced, studies, root)


def _optional_label(value: object) -> int | None:
    return None if value is None else int(value)  # type: ignore[call-overload]


def _from_synthetic(root: Path) -> EvalSet:
    """`ichnode synth` studies, shifted or not, and the real scans of `ichnode ood-set`
    (labels.json in the same layout; their ICH labels unknown)."""
    studies, slices, seeds, kinds = [], [], set(), set()
    for labels_path in sorted(root.glob("study_*/labels.json")):
        labels = json.loads(labels_path.read_text())
        study = labels_path.parent.name
        items = [EvalSlice(f"{study}_{e['instance_number']:04d}", study, _optional_label(e["label"]),
                           labels_path.parent / e["file"], None, tuple(e.get("subtypes", ())))
                 for e in labels["slices"]]
        kind = labels.get("shift") or labels.get("source", "")
        masks = labels_path.parent if labels.get("mask_file") else None
        studies.append(EvalStudy(study, _optional_label(labels["positive"]), items, masks, kind))
        slices.extend(item for item in items if item.label is not None)
        seeds.update([labels["generator"]["seed"]] if "generator" in labels else [])
        kinds.add(kind or "in distribution")
    real = any(not json.loads(p.read_text()).get("synthetic", True) for p in root.glob("study_*/labels.json"))
    what = f"synthetic phantoms (ichnode synth, seed {', '.join(map(str, sorted(seeds)))})"
    if real or kinds != {"in distribution"}:
        what = f"an out-of-distribution set ({', '.join(sorted(kinds))}) of {what}" + (
            " and real scans from pydicom's test files" if real else "")
    description = f"{what} in {root}: {len(studies)} studies, {len(slices)} slices - NOT clinical data"
    return EvalSet(description, True, slices, studies)


def _majority(row: dict[str, str]) -> int:
    votes = [int(float(row[k])) for k in ("R1:ICH", "R2:ICH", "R3:ICH")]
    return int(sum(votes) >= 2)


def _from_cq500(root: Path, min_slices: int) -> EvalSet:
    """CQ500 patients with the series the node would analyse (its own series choice)."""
    with open(root / "reads.csv", newline="") as handle:
        labels = {row["name"].strip(): _majority(row) for row in csv.DictReader(handle)}
    by_patient: dict[str, list] = {}
    synthetic_files: set[Path] = set()  # ichnode synth phantoms copied into the layout, by their marks
    for path in sorted(root.rglob("*.dcm")):
        try:
            header = read_header(path)
        except Exception:  # unreadable files are left out
            continue
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["PatientID", "Manufacturer", "ImageComments"])
        if is_synthetic_dataset(ds):
            synthetic_files.add(path)
        by_patient.setdefault(attr.text(ds, "PatientID"), []).append(header)
    studies, skipped = [], []
    for name, label in sorted(labels.items()):
        headers = by_patient.get(name)
        if not headers:
            skipped.append(name)
            continue
        try:
            choice = choose_head_series(headers, min_slices)
        except NoAnalysableSeries:
            skipped.append(name)
            continue
        studies.append(EvalStudy(name, label, [EvalSlice(h.sop_instance_uid, name, None, h.path, None)
                                                for h in choice.slices]))
    if not studies:
        raise DataError(f"no CQ500 patient of {root / 'reads.csv'} has a usable head CT series under {root}")
    synthetic = sum(any(s.source in synthetic_files for s in study.slices) for study in studies)
    kind = "CQ500" if not synthetic else (
        "synthetic phantoms (ichnode synth) - NOT clinical data - in the CQ500 layout" if synthetic == len(studies)
        else f"CQ500 layout mixing in synthetic phantoms (ichnode synth: {synthetic} of {len(studies)} patients)")
    description = (f"{kind} in {root}: {len(studies)} patients (label: majority of the three readers' ICH)"
                   + (f", {len(skipped)} without a usable series left out" if skipped else ""))
    return EvalSet(description, synthetic > 0, [], studies)


def load_eval_set(data: Path, spec: PreprocessSpec, *, min_slices: int = 10, split: str = "test",
                  data_root: Path | None = None) -> EvalSet:
    """A prepared folder (its `split`: test to report, val to choose on; its DICOM files
    under `data_root`, or else where they were prepared from), a folder of synthetic
    studies, or a CQ500 folder."""
    data = Path(data)
    if split not in SPLIT_NAMES:
        raise ValueError(f"split must be one of {', '.join(SPLIT_NAMES)}, got {split!r}")
    check_data_folder(data)
    if (data / "prepare.json").is_file():
        return _from_prepared(data, spec, split, data_root)
    if data_root is not None:
        raise DataError(f"a data folder for the sources ({data_root}) is for a folder made by `ichnode prepare-rsna`; "
                        f"{data} is not one (no prepare.json): its DICOM files are read where they are")
    if any(data.glob("study_*/labels.json")):
        return _from_synthetic(data)
    if (data / "reads.csv").is_file():
        return _from_cq500(data, min_slices)
    raise DataError(
        f"{data} is none of: a folder made by `ichnode prepare-rsna` (prepare.json), synthetic "
        "studies from `ichnode synth` (study_*/labels.json), a CQ500 folder (reads.csv)"
    )


def load_training_slices(data: Path, spec: PreprocessSpec) -> EvalSet:
    """The slices a model was trained on, as `slice_level`: the training list of a prepared
    folder (its cache, as training read it), or every slice of a folder of synthetic studies."""
    data = Path(data)
    check_data_folder(data)
    if (data / "prepare.json").is_file():
        check_cache_matches(data, spec)
        summary = json.loads((data / "prepare.json").read_text())
        root = source_root(data)
        slices = [EvalSlice(r.image_id, r.patient_id, r.label, root.path(r), data / r.cache)
                  for r in read_split(data / "splits" / "train.csv")]
        kind, synthetic = _prepared_kind(summary)
        return EvalSet(f"{kind}, training list of {data}: {len(slices)} slices", synthetic, slices, [], root)
    if any(data.glob("study_*/labels.json")):
        return load_eval_set(data, spec)
    raise DataError(f"{data} is neither a folder made by `ichnode prepare-rsna` nor a folder of `ichnode synth` "
                    "studies")
