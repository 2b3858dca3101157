"""The analyser leaves out slices it cannot use instead of failing the whole study."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest

from node.config import parse_config
from node.errors import InvalidInstance
from node.worker import Analyzer
from storage.store import InstanceStore
from training.checkpoint import default_model_config
from training.model import create_model
from training.predictor import Predictor


@pytest.fixture
def analyzer(tmp_path: Path) -> Analyzer:
    config = parse_config({"worker": {"min_slices": 10}, "explain": {"key_slices": 2}}, tmp_path)
    predictor = Predictor(create_model("resnet18"), default_model_config("resnet18"), device="cpu")
    return Analyzer(predictor, config, InstanceStore(tmp_path / "store"))


def _damaged_copy(study: Path, out: Path, damaged: int) -> tuple[list[Path], list[str]]:
    """The HEAD series with `damaged` slices whose pixel data no longer fits Rows × Columns."""
    shutil.copytree(study / "HEAD", out)
    files = sorted(out.glob("*.dcm"))
    broken = []
    for path in files[3:3 + damaged]:
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 3]
        ds.save_as(path)
        broken.append(ds.SOPInstanceUID)
    return files, broken


def test_unusable_slices_are_left_out_and_reported(analyzer: Analyzer, negative_study: Path, tmp_path: Path) -> None:
    files, broken = _damaged_copy(negative_study, tmp_path / "series", damaged=2)
    analysis = analyzer.analyse("1.2.3", files, series_number=9900)
    assert set(analysis.skipped_slices) == set(broken)
    assert all("cannot be decoded" in why or "PixelData" in why for why in analysis.skipped_slices.values())
    assert analysis.verdict.total_slices == len(files) - 2
    assert analysis.objects == 2 + 1
    assert set(analysis.timings) == {"load", "preprocess", "inference", "gradcam", "encode"}


def test_too_few_usable_slices_fail_with_the_reason(analyzer: Analyzer, negative_study: Path, tmp_path: Path) -> None:
    files, _ = _damaged_copy(negative_study, tmp_path / "series", damaged=len(list((negative_study / "HEAD").glob("*.dcm"))) - 5)
    with pytest.raises(InvalidInstance, match="fewer than worker.min_slices = 10"):
        analyzer.analyse("1.2.3", files, series_number=9900)
