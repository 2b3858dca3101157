"""The split Grad-CAM path gives pytorch-grad-cam's maps (the whole network differentiated)
at every registered layer of every architecture, from the inputs and from the features a
PyTorch inference pass returned: same arithmetic, maps equal within 1e-4, same peak cell.
Synthetic slices; random models whose batch-norm statistics are set on those slices, so
the maps have structure to compare.

The node takes the features from ONNX Runtime, whose arithmetic differs from PyTorch's in
the last digits (as P(ICH) does, tests/test_runtime.py). A random model's map is a sum
of large terms of both signs that those digits can move by a few hundredths, so that path
is checked with the shipped demonstration model, as the node runs it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

from tests.conftest import load_labels
from training.inference.predictor import Predictor
from training.inference.settings import Backend, Device
from training.model.architectures import architecture_spec, available_models, create_model, gradcam_module
from training.model.checkpoint import default_model_config, load_checkpoint

DEMO_MODEL = Path(__file__).resolve().parent.parent / "models" / "effclass-synthetic-demo.pt"
CASES = [(name, layer) for name in available_models() for layer in architecture_spec(name).gradcam_layers]


def _calibrated(name: str, inputs: np.ndarray) -> torch.nn.Module:
    """A random model whose batch-norm statistics come from `inputs`, so activations and
    gradients vary at their natural scale instead of collapsing."""
    torch.manual_seed(3)
    model = create_model(name)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(inputs))
    return model.eval()


@pytest.fixture(scope="module")
def slices(positive_study: Path) -> list[pydicom.Dataset]:
    entries = load_labels(positive_study)["slices"]
    return [pydicom.dcmread(positive_study / e["file"]) for e in entries[len(entries) // 2 - 1:][:3]]


def _reference(model: torch.nn.Module, layer, inputs: np.ndarray) -> np.ndarray:
    """pytorch-grad-cam at the same layer, differentiating the whole network."""
    with GradCAM(model=model, target_layers=[gradcam_module(model, layer)]) as cam:
        maps = cam(input_tensor=torch.from_numpy(inputs), targets=[ClassifierOutputTarget(1)] * len(inputs))
    model.zero_grad(set_to_none=True)
    return maps


def _peak_cells(maps: np.ndarray, cell: float) -> list[tuple[int, int]]:
    return [tuple(int(v // cell) for v in np.unravel_index(m.argmax(), m.shape)) for m in maps]


@pytest.mark.parametrize(("name", "layer"), CASES, ids=[f"{n}-{layer}" for n, layer in CASES])
def test_split_maps_equal_the_full_network_maps(name: str, layer, slices: list[pydicom.Dataset]) -> None:
    config = default_model_config(name)
    probe = Predictor(create_model(name), config, device=Device("cpu"))
    inputs = probe.prepare(slices)
    model = _calibrated(name, inputs)
    predictor = Predictor(model, config, device=Device("cpu"), backend=Backend.TORCH, gradcam_layer=layer)
    expected = _reference(model, predictor.gradcam_layer, inputs)
    assert expected.std() > 0.05, "the reference maps should have structure to compare"
    from_inputs = predictor.gradcam(inputs)
    _, features = predictor.predict_with_features(inputs)
    from_inference = predictor.gradcam_from_features(features)
    cell = predictor.gradcam_cell_pixels()
    for maps in (from_inputs, from_inference):
        assert maps.shape == expected.shape and maps.dtype == np.float32
        assert np.abs(maps - expected).max() <= 1e-4
        assert _peak_cells(maps, cell) == _peak_cells(expected, cell)
    assert all(p.grad is None for p in model.parameters())  # no weight gradients were made


@pytest.mark.parametrize("layer", architecture_spec("effclass").gradcam_layers)
def test_maps_from_onnx_runtime_features_match_with_the_shipped_model(layer, slices: list[pydicom.Dataset]) -> None:
    model, config = load_checkpoint(DEMO_MODEL)
    predictor = Predictor(model, config, device=Device("cpu"), backend=Backend.ONNXRUNTIME, gradcam_layer=layer)
    assert not any(m.training for m in model.modules())  # exporting to ONNX left it in eval mode
    inputs = predictor.prepare(slices)
    expected = _reference(model, predictor.gradcam_layer, inputs)
    _, features = predictor.predict_with_features(inputs)
    maps = predictor.gradcam_from_features(features)
    assert np.abs(maps - expected).max() <= 1e-3
    assert _peak_cells(maps, predictor.gradcam_cell_pixels()) == _peak_cells(expected, predictor.gradcam_cell_pixels())


def test_smoothed_maps_equal_the_full_network_smoothed_maps(slices: list[pydicom.Dataset]) -> None:
    config = default_model_config("resnet18")
    inputs = Predictor(create_model("resnet18"), config, device=Device("cpu")).prepare(slices[:2])
    model = _calibrated("resnet18", inputs)
    predictor = Predictor(model, config, device=Device("cpu"))
    with GradCAM(model=model, target_layers=[gradcam_module(model, predictor.gradcam_layer)]) as cam:
        expected = cam(input_tensor=torch.from_numpy(inputs), targets=[ClassifierOutputTarget(1)] * 2,
                       aug_smooth=True)
    assert np.abs(predictor.gradcam(inputs, aug_smooth=True) - expected).max() <= 1e-4
