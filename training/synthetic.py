"""Synthetic head-CT studies as DICOM files, with labels and lesion masks.

Each study is a folder::

    study_0003/
      HEAD/0001.dcm …       axial CT series (soft-tissue kernel) — the one the labels describe
      BONE/0001.dcm …       optional: the same slices in a bone kernel
      SCOUT/0001.dcm        optional: a lateral localizer
      labels.json           per-slice label, subtypes, file and SOPInstanceUID
      mask.npz              "mask": uint8 [slices, rows, cols]; bit k = SUBTYPES[k]

Files are valid CT Image Storage objects. The same seed gives the same bytes. Everything
is marked as synthetic (Manufacturer, ImageComments, PatientName).

`shift` writes the same studies as inputs a head-CT triage model was not trained on
(`Shift`), for testing that the node abstains: their headers claim an ordinary
non-contrast head CT (or, for another body part, say nothing of it), so only the
checks that look at the images can tell. labels.json names the shift.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import io
import json
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from training.errors import SyntheticDataError
from training.phantom import (
    SUBTYPE_BITS,
    SUBTYPES,
    HeadGeometry,
    add_metal_streaks,
    lateral_projection,
    random_bleed,
    random_body,
    random_head,
    render_body_slice,
    render_slice,
)

__all__ = ["SYNTHETIC_MANUFACTURER", "Shift", "SyntheticOptions", "StudyLabels", "is_synthetic_dataset",
           "write_studies", "write_study", "read_mask"]

GENERATOR_VERSION = 1
MATRIX = 512
RESCALE_INTERCEPT = -1024.0
SYNTHETIC_COMMENT = "SYNTHETIC PHANTOM - NOT PATIENT DATA"
SYNTHETIC_MANUFACTURER = "ICHNODE SYNTHETIC"
_EPOCH = dt.date(2024, 1, 1)
BODY_PIXEL_SPACING = 0.74  # mm: a 380 mm field of view


class Shift(enum.StrEnum):
    """Inputs outside what a head-CT model trained on ordinary scans has seen."""

    CONTRAST = "contrast"  # after IV contrast: vessels and sinuses at 180-320 HU
    NOISE = "noise"  # a low-dose or degraded scan: 20-40 HU of noise instead of 3
    METAL = "metal"  # clips or coils: metal with streaks over the slices near it
    BODY = "body"  # an abdomen, with no body part in its header


@dataclass(frozen=True)
class SyntheticOptions:
    """What `ichnode synth` makes; validated so a bad option fails before any file is written."""

    studies: int
    seed: int = 0
    positive_fraction: float = 0.5
    localizer: bool = False
    bone_series: bool = False
    min_slices: int = 20
    max_slices: int = 40
    shift: Shift | None = None

    def __post_init__(self) -> None:
        if self.studies < 1:
            raise SyntheticDataError(f"--studies must be ≥ 1, got {self.studies}")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise SyntheticDataError(
                f"--positive-fraction must be in [0, 1], got {self.positive_fraction}"
            )
        if not 8 <= self.min_slices <= self.max_slices:
            raise SyntheticDataError(
                f"slice counts need 8 ≤ min ≤ max, got {self.min_slices}..{self.max_slices}"
            )
        if self.shift is not None and not isinstance(self.shift, Shift):
            raise SyntheticDataError(f"--shift must be one of {', '.join(Shift)}, got {self.shift!r}")


@dataclass(frozen=True)
class StudyLabels:
    """The labels file of one study, as written."""

    folder: Path
    positive: bool
    slice_labels: tuple[int, ...]
    subtypes: tuple[str, ...]


def _uid(*parts: object) -> str:
    return generate_uid(entropy_srcs=["ichnode-synthetic", *map(str, parts)])


def _positive_flags(options: SyntheticOptions) -> list[bool]:
    """Exactly round(fraction × N) positive studies, in a seeded order."""
    count = int(round(options.positive_fraction * options.studies))
    flags = [i < count for i in range(options.studies)]
    np.random.default_rng([options.seed, 0xF1A6]).shuffle(flags)
    return flags


def write_studies(out: str | Path, options: SyntheticOptions) -> list[StudyLabels]:
    """Write `options.studies` studies under `out`; returns their labels."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return [
        write_study(out / f"study_{index:04d}", options, index, positive)
        for index, positive in enumerate(_positive_flags(options))
    ]


@dataclass(frozen=True)
class _StudyContext:
    """Identifiers and acquisition settings shared by every file of one study."""

    options: SyntheticOptions
    index: int
    head: HeadGeometry
    pixel_spacing: float
    thickness: float
    z_positions: np.ndarray

    def uid(self, *parts: object) -> str:
        shift = (f"shift-{self.options.shift}",) if self.options.shift else ()
        return _uid(self.options.seed, self.index, *shift, *parts)


def _study_context(options: SyntheticOptions, index: int, rng: np.random.Generator) -> _StudyContext:
    head = random_head(rng)
    thickness = float(rng.choice([4.0, 5.0]))
    c = head.semi_axes[2]
    # From the skull base (below the head's centre) to just under the vertex.
    bottom, top = -0.42 * c + rng.uniform(-4, 4), 0.93 * c
    count = int(np.clip(round((top - bottom) / thickness), options.min_slices, options.max_slices))
    z_positions = bottom + thickness * np.arange(count)
    return _StudyContext(
        options, index, head, float(rng.uniform(0.43, 0.49)), thickness, z_positions
    )


def write_study(folder: Path, options: SyntheticOptions, index: int, positive: bool) -> StudyLabels:
    """One study (HEAD series, optional BONE and SCOUT series, labels.json, mask.npz)."""
    rng = np.random.default_rng([options.seed, index])
    ctx = _study_context(options, index, rng)
    if options.shift == Shift.BODY:  # an abdomen is reconstructed on a larger field of view
        ctx = dataclasses.replace(ctx, pixel_spacing=BODY_PIXEL_SPACING)
    bleeds = []
    if positive and options.shift != Shift.BODY:
        span = (float(ctx.z_positions[0]), float(ctx.z_positions[-1]))
        for subtype in rng.choice(SUBTYPES, size=int(rng.integers(1, 3)), replace=False):
            bleeds.append(random_bleed(rng, ctx.head, str(subtype), span))
    coords = (np.arange(MATRIX) - (MATRIX - 1) / 2) * ctx.pixel_spacing
    x, y = np.meshgrid(coords, coords)  # columns run along x, rows along y
    origin = (float(coords[0]), float(coords[0]))

    slices, masks = [], []
    head_dir, bone_dir = folder / "HEAD", folder / "BONE"
    head_dir.mkdir(parents=True, exist_ok=True)
    render = _renderer(ctx, bleeds, x, y, rng)
    for number, z in enumerate(ctx.z_positions, start=1):
        hu, mask = render(float(z), 3.0, False)
        masks.append(mask)
        name = f"{number:04d}.dcm"
        ds = _axial_dataset(ctx, "HEAD", number, float(z), origin, hu)
        ds.save_as(head_dir / name, enforce_file_format=True)
        slices.append(_slice_label(number, f"HEAD/{name}", ds, mask))
        if options.bone_series:
            bone_dir.mkdir(exist_ok=True)
            bone_hu, _ = render(float(z), 18.0, True)
            bone = _axial_dataset(ctx, "BONE", number, float(z), origin, bone_hu)
            bone.save_as(bone_dir / name, enforce_file_format=True)
    if options.localizer:
        (folder / "SCOUT").mkdir(exist_ok=True)
        _scout_dataset(ctx).save_as(folder / "SCOUT" / "0001.dcm", enforce_file_format=True)

    mask_volume = np.stack(masks)
    _write_mask(folder / "mask.npz", mask_volume)
    study_subtypes = tuple(name for name in SUBTYPES if np.any(mask_volume & SUBTYPE_BITS[name]))
    labels = {
        "generator": {"name": "ichnode synth", "version": GENERATOR_VERSION,
                      "seed": options.seed, "study_index": index},
        "synthetic": True,
        **({"shift": str(options.shift)} if options.shift else {}),
        "study_instance_uid": ctx.uid("study"),
        "accession_number": _accession(ctx),
        "patient_id": _patient_id(ctx),
        "head_series_instance_uid": ctx.uid("series", "HEAD"),
        "positive": bool(mask_volume.any()),
        "subtypes": list(study_subtypes),
        "bleeds": [{"subtype": b.subtype, "hu": round(b.hu, 1)} for b in bleeds],
        "mask_file": "mask.npz",
        "mask_bits": {name: SUBTYPE_BITS[name] for name in SUBTYPES},
        "slices": slices,
    }
    (folder / "labels.json").write_text(json.dumps(labels, indent=1) + "\n")
    return StudyLabels(
        folder, labels["positive"], tuple(s["label"] for s in slices), study_subtypes
    )


Render = Callable[[float, float, bool], tuple[np.ndarray, np.ndarray]]  # (z, noise HU, sharp) → HU, mask


def _renderer(ctx: _StudyContext, bleeds: list, x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> Render:
    """How the axial slices of this study are drawn: the ordinary head, or its shift. A
    shift draws its own parameters from a generator of its own, so the anatomy, the bleeds
    and the noise of each slice are those of the unshifted study with the same seed."""
    head, shift = ctx.head, ctx.options.shift
    if shift is None:
        return lambda z, noise, sharp: render_slice(head, bleeds, x, y, z, rng, noise_hu=noise, sharp=sharp)
    own = np.random.default_rng([ctx.options.seed, ctx.index, 0x5417])
    if shift == Shift.CONTRAST:
        vessel_hu = float(own.uniform(180, 320))
        return lambda z, noise, sharp: render_slice(head, bleeds, x, y, z, rng, noise_hu=noise, sharp=sharp,
                                                    contrast_hu=vessel_hu)
    if shift == Shift.NOISE:
        level = float(own.uniform(20, 40))
        return lambda z, noise, sharp: render_slice(head, bleeds, x, y, z, rng, noise_hu=max(noise, level),
                                                    sharp=sharp)
    if shift == Shift.METAL:
        return _metal_renderer(ctx, bleeds, x, y, rng, own)
    body = random_body(own)
    empty = np.zeros(x.shape, dtype=np.uint8)
    return lambda z, noise, sharp: (render_body_slice(body, x, y, z, rng, noise_hu=noise + 5.0), empty)


def _metal_renderer(ctx: _StudyContext, bleeds: list, x: np.ndarray, y: np.ndarray, rng: np.random.Generator,
                    own: np.random.Generator) -> Render:
    """Aneurysm clips near the circle of Willis: metal and streaks on the slices within
    15 mm of them, the other slices as they were."""
    head = ctx.head
    c = head.inner_semi_axes[2]
    level = -0.18 * c + float(own.uniform(-5, 15))
    clips = [(head.centre[1] + float(own.uniform(-25, 15)), head.centre[0] + float(own.uniform(-30, 30)))
             for _ in range(int(own.integers(1, 4)))]
    pixels = [((cy - y[0, 0]) / ctx.pixel_spacing, (cx - x[0, 0]) / ctx.pixel_spacing) for cy, cx in clips]
    amplitude = float(own.uniform(300, 700))

    def render(z: float, noise: float, sharp: bool) -> tuple[np.ndarray, np.ndarray]:
        hu, mask = render_slice(head, bleeds, x, y, z, rng, noise_hu=noise, sharp=sharp)
        if abs(z - level) <= 15.0:
            hu = add_metal_streaks(hu, pixels, own, amplitude_hu=amplitude * (1 - abs(z - level) / 30.0))
        return hu, mask

    return render


def _slice_label(number: int, file: str, ds: Dataset, mask: np.ndarray) -> dict:
    return {
        "instance_number": number,
        "file": file,
        "sop_instance_uid": ds.SOPInstanceUID,
        "z": round(float(ds.ImagePositionPatient[2]), 3),
        "label": int(mask.any()),
        "subtypes": [name for name in SUBTYPES if np.any(mask & SUBTYPE_BITS[name])],
        "bleed_pixels": int(np.count_nonzero(mask)),
    }


def _write_mask(path: Path, mask: np.ndarray) -> None:
    """An .npz that np.load reads, with fixed zip timestamps so bytes repeat."""
    buffer = io.BytesIO()
    np.save(buffer, mask, allow_pickle=False)
    info = zipfile.ZipInfo("mask.npy", date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(info, buffer.getvalue())


def is_synthetic_dataset(ds: Dataset) -> bool:
    """Whether `ds` is one of the phantoms written here: each carries the marks below, so
    data that holds them can be recognised wherever it travels (copied into another layout,
    renamed), and a model trained on it keeps its demonstration warnings."""
    meta = getattr(ds, "file_meta", None)
    version = str(meta.get("ImplementationVersionName", "")) if meta is not None else ""
    return (str(ds.get("Manufacturer", "")) == SYNTHETIC_MANUFACTURER
            or SYNTHETIC_COMMENT in str(ds.get("ImageComments", ""))
            or version.startswith("ICHNODE_SYN_"))


def read_mask(folder: str | Path) -> np.ndarray:
    """The lesion mask volume of a synthetic study folder."""
    with np.load(Path(folder) / "mask.npz") as data:
        return data["mask"]


def _accession(ctx: _StudyContext) -> str:
    return f"SYN{ctx.options.seed % 10000:04d}{ctx.index:05d}"


def _patient_id(ctx: _StudyContext) -> str:
    return f"SYNTH-{ctx.options.seed}-{ctx.index:04d}"


def _base_dataset(ctx: _StudyContext, series: str, number: int) -> Dataset:
    """Patient, study, series, equipment and SOP common attributes for one file."""
    rng = np.random.default_rng([ctx.options.seed, ctx.index, 7])
    study_date = _EPOCH + dt.timedelta(days=int(rng.integers(0, 700)))
    birth = study_date - dt.timedelta(days=int(rng.integers(20 * 365, 90 * 365)))
    study_time = f"{int(rng.integers(0, 24)):02d}{int(rng.integers(0, 60)):02d}00"
    series_number = {"SCOUT": 1, "HEAD": 2, "BONE": 3}[series]

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ctx.uid("instance", series, number)
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = _uid("ichnode-synthetic-implementation")
    ds.file_meta.ImplementationVersionName = f"ICHNODE_SYN_{GENERATOR_VERSION}"
    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.InstanceCreationDate = study_date.strftime("%Y%m%d")
    ds.InstanceCreationTime = study_time
    # Patient
    ds.PatientName = f"SYNTHETIC^PHANTOM{ctx.index:04d}"
    ds.PatientID = _patient_id(ctx)
    ds.PatientBirthDate = birth.strftime("%Y%m%d")
    ds.PatientSex = str(rng.choice(["F", "M"]))
    # General Study
    ds.StudyInstanceUID = ctx.uid("study")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = ds.InstanceCreationDate
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study_time
    ds.ReferringPhysicianName = ""
    ds.StudyID = f"{ctx.index + 1}"
    ds.AccessionNumber = _accession(ctx)
    ds.StudyDescription = "CT HEAD WO CONTRAST"
    # General Series
    ds.Modality = "CT"
    ds.SeriesInstanceUID = ctx.uid("series", series)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = {"SCOUT": "Topogram 0.6", "HEAD": f"HEAD {ctx.thickness:g}mm H30s",
                            "BONE": f"HEAD BONE {ctx.thickness:g}mm H70s"}[series]
    ds.BodyPartExamined = "HEAD"
    if ctx.options.shift is not None:  # nothing in the header gives the shift away
        ds.StudyDescription = "CT HEAD"
    if ctx.options.shift == Shift.BODY:
        ds.StudyDescription = "CT"
        ds.SeriesDescription = f"AXIAL {ctx.thickness:g}mm B30f" if series != "SCOUT" else "Topogram 0.6"
        del ds.BodyPartExamined
    ds.PatientPosition = "HFS"
    # Frame of Reference
    ds.FrameOfReferenceUID = ctx.uid("frame")
    ds.PositionReferenceIndicator = ""
    # General Equipment
    ds.Manufacturer = SYNTHETIC_MANUFACTURER
    ds.ManufacturerModelName = "Head phantom generator"
    ds.InstitutionName = "Synthetic data"
    ds.StationName = "SYNTH01"
    ds.SoftwareVersions = f"ichnode-synth {GENERATOR_VERSION}"
    ds.DeviceSerialNumber = "0000"
    # General Image
    ds.InstanceNumber = number
    ds.AcquisitionNumber = 1
    ds.ImageComments = SYNTHETIC_COMMENT
    ds.BurnedInAnnotation = "NO"
    return ds


def _set_pixels(ds: Dataset, hu: np.ndarray) -> None:
    """Image Pixel and CT Image modules: int16 storage with slope 1, intercept −1024."""
    stored = np.clip(np.rint(hu - RESCALE_INTERCEPT), -2048, 4095).astype(np.int16)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1
    ds.RescaleIntercept = f"{RESCALE_INTERCEPT:g}"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = stored.tobytes()


def _axial_dataset(
    ctx: _StudyContext, series: str, number: int, z: float,
    origin: tuple[float, float], hu: np.ndarray,
) -> Dataset:
    ds = _base_dataset(ctx, series, number)
    bone = series == "BONE"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    # Image Plane
    ds.PixelSpacing = [f"{ctx.pixel_spacing:.6f}", f"{ctx.pixel_spacing:.6f}"]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.ImagePositionPatient = [f"{origin[0]:.4f}", f"{origin[1]:.4f}", f"{z:.4f}"]
    ds.SliceThickness = f"{ctx.thickness:g}"
    ds.SpacingBetweenSlices = f"{ctx.thickness:g}"
    ds.SliceLocation = f"{z:.4f}"
    # CT Image
    ds.KVP = "120"
    ds.DataCollectionDiameter = "500"
    ds.ReconstructionDiameter = f"{ctx.pixel_spacing * MATRIX:.3f}"
    ds.GantryDetectorTilt = "0"
    ds.TableHeight = "160"
    ds.RotationDirection = "CW"
    ds.ExposureTime = "1000"
    ds.XRayTubeCurrent = 280
    ds.Exposure = 280
    ds.FilterType = "HEAD"
    ds.ConvolutionKernel = "H70s" if bone else "H30s"
    ds.FocalSpots = "1.2"
    ds.CTDIvol = 52.0
    phantom = Dataset()
    phantom.CodeValue, phantom.CodingSchemeDesignator = "113691", "DCM"
    phantom.CodeMeaning = "IEC Head Dosimetry Phantom"
    ds.CTDIPhantomTypeCodeSequence = [phantom]
    # The first window is the one a viewer shows; the second is offered (RSNA files
    # often carry several, which readers must accept).
    ds.WindowCenter = ["700", "40"] if bone else ["40", "700"]
    ds.WindowWidth = ["3000", "80"] if bone else ["80", "3000"]
    ds.WindowCenterWidthExplanation = ["BONE", "BRAIN"] if bone else ["BRAIN", "BONE"]
    _set_pixels(ds, hu)
    return ds


def _scout_dataset(ctx: _StudyContext) -> Dataset:
    """A lateral localizer: ImageType LOCALIZER, rows along −z, columns along +y."""
    ds = _base_dataset(ctx, "SCOUT", 1)
    spacing = 0.6
    grid = (np.arange(MATRIX) - (MATRIX - 1) / 2) * spacing
    y, z = np.meshgrid(grid, -grid + 20.0)
    projection = lateral_projection(ctx.head, y, z)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.PixelSpacing = [f"{spacing}", f"{spacing}"]
    ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    ds.ImagePositionPatient = [f"{0.0:.4f}", f"{grid[0]:.4f}", f"{-grid[0] + 20.0:.4f}"]
    ds.SliceThickness = "0.6"
    ds.KVP = "120"
    ds.ConvolutionKernel = "T20s"
    # Attenuation line integrals scaled into a HU-like range for display.
    _set_pixels(ds, projection * 8.0 - 1000.0)
    del ds.RescaleType  # a localizer's values are not HU
    ds.WindowCenter, ds.WindowWidth = "0", "1400"
    return ds
