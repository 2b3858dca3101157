"""node.analysis: the pure stage — headers and a reader in, verdict and result datasets out."""

from __future__ import annotations

import dataclasses
import tracemalloc
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from node.analysis import AnalysisSettings, analyse
from node.output import KosFor, ResultKind
from node.errors import InvalidInstance
from training.inference.predictor import Predictor
from training.inference.settings import Device
from training.model.architectures import create_model
from training.model.checkpoint import default_model_config
from training.model.rule import TriageRule, key_slice_indices
from training.model.series import SliceHeader, read_header

SETTINGS = AnalysisSettings(rule=TriageRule(), min_slices=10, max_unusable_fraction=0.1, key_slices=2,
                            aug_smooth=False, objects=tuple(ResultKind), manufacturer="ichnode",
                            institution_name="", device_uid="1.2.826.0.1.3680043.8.498.7", device_name="ICHNODE",
                            kos_for=KosFor.ALL)  # every set, whatever random weights say


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(create_model("resnet18"), default_model_config("resnet18"), device=Device("cpu"), batch_size=4)


class MemoryReader:
    """Slices from memory, counting reads: analysis must read each slice once, through it."""

    def __init__(self, datasets: dict[str, Dataset]) -> None:
        self.datasets = datasets
        self.reads: list[str] = []

    def __call__(self, header: SliceHeader) -> Dataset:
        self.reads.append(header.sop_instance_uid)
        return pydicom.dcmread(pydicom.filebase.DicomBytesIO(self.datasets[header.sop_instance_uid]))


def _study(study: Path, change=None) -> tuple[list[SliceHeader], MemoryReader]:
    """Headers of every series of a synthetic study and a reader over the HEAD series'
    bytes, each slice changed by `change(index, dataset)` first."""
    headers = [read_header(path) for path in sorted(study.rglob("*.dcm"))]
    datasets = {}
    for index, path in enumerate(sorted((study / "HEAD").glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        if change is not None:
            change(index, ds)
        buffer = pydicom.filebase.DicomBytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        datasets[ds.SOPInstanceUID] = buffer.getvalue()
    return headers, MemoryReader(datasets)


def _head_count(study: Path) -> int:
    return len(list((study / "HEAD").glob("*.dcm")))


def test_analysis_reads_each_slice_once_and_writes_nothing(predictor: Predictor, positive_study: Path,
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    headers, reader = _study(positive_study)
    monkeypatch.chdir(tmp_path)
    result = analyse(headers, reader, predictor, SETTINGS, series_number=9900)
    assert sorted(reader.reads) == sorted(reader.datasets)  # the HEAD series, each slice once
    assert list(tmp_path.iterdir()) == []
    assert result.choice.passed_over  # scout and bone series were passed over, with reasons
    assert len(result.probabilities) == _head_count(positive_study) == result.verdict.total_slices
    assert result.key_slices == key_slice_indices(result.probabilities, 2)
    counts = {kind: len(datasets) for kind, datasets in result.objects.items()}
    assert counts == {ResultKind.SC: 2 + 1, ResultKind.SR: 1, ResultKind.KOS: 1}  # SC: key slices and summary
    assert {ds.SeriesInstanceUID for ds in result.objects[ResultKind.SC]} == {result.series_instance_uid}
    assert len({datasets[0].SeriesInstanceUID for datasets in result.objects.values()}) == 3
    assert [datasets[0].SeriesNumber for datasets in result.objects.values()] == [9900, 9901, 9902]
    assert set(result.timings) == {"scope", "load", "preprocess", "inference", "gradcam", "encode"}


def test_without_pictures_no_grad_cam_runs(predictor: Predictor, positive_study: Path) -> None:
    headers, reader = _study(positive_study)
    result = analyse(headers, reader, predictor, dataclasses.replace(SETTINGS, objects=(ResultKind.SR,)),
                     series_number=9900)
    assert list(result.objects) == [ResultKind.SR] and "gradcam" not in result.timings
    assert result.series_instance_uid == result.objects[ResultKind.SR][0].SeriesInstanceUID


def test_key_slices_reference_the_original_slices(predictor: Predictor, positive_study: Path) -> None:
    headers, reader = _study(positive_study)
    result = analyse(headers, reader, predictor, SETTINGS, series_number=9900)
    ordered = [h.sop_instance_uid for h in result.choice.slices]
    pictures = result.objects[ResultKind.SC]
    referenced = [ds.SourceImageSequence[0].ReferencedSOPInstanceUID for ds in pictures[:-1]]
    assert referenced == [ordered[i] for i in result.key_slices]
    assert "SourceImageSequence" not in pictures[-1]


def test_unusable_slices_are_left_out_and_reported(predictor: Predictor, negative_study: Path) -> None:
    def damage(index: int, ds: Dataset) -> None:
        if index in (3, 4):
            ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]

    headers, reader = _study(negative_study, damage)
    result = analyse(headers, reader, predictor, SETTINGS, series_number=9900)
    assert len(result.skipped_slices) == 2
    assert all("PixelData holds" in why for why in result.skipped_slices.values())
    assert result.verdict.total_slices == _head_count(negative_study) - 2
    assert "2 unreadable slices of the series were left out" in result.objects[ResultKind.SC][0].ImageComments


def test_too_many_unusable_slices_fail_with_the_reason(predictor: Predictor, negative_study: Path) -> None:
    count = _head_count(negative_study)
    headers, reader = _study(negative_study, lambda i, ds: setattr(ds, "RescaleSlope", 0) if i < count // 5 else None)
    with pytest.raises(InvalidInstance, match=r"slices are unusable, more than worker.max_unusable_fraction = 0.1 "
                                              r"\(first problem: .*RescaleSlope 0 cannot map pixels to HU"):
        analyse(headers, reader, predictor, SETTINGS, series_number=9900)


def test_a_study_with_no_usable_slice_is_never_not_detected(predictor: Predictor, positive_study: Path) -> None:
    """A bleeding study whose slope is 0 used to come back "not detected"."""
    headers, reader = _study(positive_study, lambda _i, ds: setattr(ds, "RescaleSlope", 0))
    with pytest.raises(InvalidInstance, match="only 0 of .* slices are usable, fewer than worker.min_slices"):
        analyse(headers, reader, predictor, SETTINGS, series_number=9900)


def _long_series(study: Path, repeats: int) -> tuple[list[SliceHeader], MemoryReader]:
    """The HEAD series stacked `repeats` times along z, each copy with new UIDs."""
    files = sorted((study / "HEAD").glob("*.dcm"))
    datasets, headers = {}, []
    for copy in range(repeats):
        for number, path in enumerate(files):
            ds = pydicom.dcmread(path)
            ds.SOPInstanceUID = generate_uid()
            ds.ImagePositionPatient[2] += copy * 1000.0
            ds.InstanceNumber = copy * len(files) + number + 1
            buffer = pydicom.filebase.DicomBytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            datasets[ds.SOPInstanceUID] = buffer.getvalue()
            ds.PixelData = b""
            headers.append(SliceHeader(path, ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, ds.Modality,
                                       tuple(ds.ImageType), tuple(map(float, ds.ImageOrientationPatient)),
                                       tuple(map(float, ds.ImagePositionPatient)), float(ds.SliceThickness)))
    return headers, MemoryReader(datasets)


def _peak_bytes(predictor: Predictor, study: Path, repeats: int) -> tuple[int, int]:
    headers, reader = _long_series(study, repeats)
    tracemalloc.start()
    try:
        result = analyse(headers, reader, predictor, SETTINGS, series_number=9900)
        return tracemalloc.get_traced_memory()[1], len(result.probabilities)
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_length_of_the_series(predictor: Predictor, negative_study: Path) -> None:
    """Slices stream through in batches; only the key slices' inputs are kept. Tripling
    the series adds far less memory than holding the extra slices' inputs would."""
    _peak_bytes(predictor, negative_study, 1)  # the first run allocates once-only buffers
    short_peak, short = _peak_bytes(predictor, negative_study, 1)
    long_peak, long = _peak_bytes(predictor, negative_study, 3)
    per_slice_input = 3 * 224 * 224 * 4
    assert long == 3 * short
    assert long_peak - short_peak < 0.25 * (long - short) * per_slice_input
