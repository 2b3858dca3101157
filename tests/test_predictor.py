"""The Predictor on synthetic slices: probabilities and Grad-CAM maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from node.errors import ConfigError, InferenceError
from training.model.checkpoint import default_model_config, save_checkpoint
from training.model.architectures import create_model
from training.inference.device import resolve_device
from training.inference.predictor import Predictor
from training.inference.settings import Device
from tests.conftest import load_labels


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    torch.manual_seed(1)
    path = tmp_path_factory.mktemp("model") / "effclass.pt"
    save_checkpoint(path, create_model("effclass"), default_model_config("effclass"))
    return Predictor.from_checkpoint(path, device="cpu", batch_size=2)


@pytest.fixture(scope="module")
def slices(positive_study: Path) -> list[pydicom.Dataset]:
    entries = load_labels(positive_study)["slices"]
    return [pydicom.dcmread(positive_study / e["file"]) for e in entries[8:11]]


def test_probabilities_per_slice(predictor: Predictor, slices: list) -> None:
    inputs = predictor.prepare(slices)
    assert inputs.shape == (3, 3, 512, 512) and inputs.dtype == np.float32
    probabilities = predictor.predict(inputs)
    assert probabilities.shape == (3,) and probabilities.dtype == np.float32
    assert np.all((probabilities >= 0) & (probabilities <= 1))
    # Batching does not change the answer.
    one_by_one = np.concatenate([predictor.predict(inputs[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(probabilities, one_by_one, atol=1e-5)
    np.testing.assert_allclose(predictor.predict_slices(slices), probabilities, atol=1e-6)


def test_no_slices_no_probabilities(predictor: Predictor) -> None:
    assert predictor.predict(predictor.prepare([])).shape == (0,)


def test_wrong_input_shape_is_refused(predictor: Predictor) -> None:
    with pytest.raises(InferenceError, match=r"shape \[N, 3, 512, 512\]"):
        predictor.predict(np.zeros((1, 3, 224, 224), dtype=np.float32))


def test_gradcam_maps_are_finite_and_of_input_size(predictor: Predictor, slices: list) -> None:
    inputs = predictor.prepare(slices[:2])
    before = predictor.predict(inputs)
    maps = predictor.gradcam(inputs)
    assert maps.shape == (2, 512, 512) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    # The hooks are gone afterwards and prediction is unchanged.
    np.testing.assert_allclose(predictor.predict(inputs), before, atol=1e-6)
    assert all(p.grad is None for p in predictor.model.parameters())


def test_baseline_predictor_at_224(slices: list) -> None:
    predictor = Predictor(create_model("resnet18"), default_model_config("resnet18"), device="cpu")
    inputs = predictor.prepare(slices[:1])
    assert inputs.shape == (1, 3, 224, 224)
    assert predictor.gradcam(inputs).shape == (1, 224, 224)


def test_device_names() -> None:
    assert resolve_device(Device("cpu")) == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device(Device("auto")).type == expected
    assert Device("cuda:1") == "cuda:1"
    for bad in ("tpu", "cuda:", "CPU", "cuda:x"):
        with pytest.raises(ValueError, match=f"must be auto, cpu, cuda or cuda:N, got '{bad}'"):
            Device(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_cuda_without_gpu_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA GPU is available"):
        resolve_device(Device("cuda"))
