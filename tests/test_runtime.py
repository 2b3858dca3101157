"""The fast inference path gives the same answers as eager PyTorch fp32."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from training.model.checkpoint import default_model_config
from training.model.architectures import create_model
from training.inference.predictor import Predictor
from training.inference.settings import Backend, Device
from tests.conftest import load_labels


@pytest.fixture(scope="module")
def spread_model(positive_study: Path) -> tuple[torch.nn.Module, np.ndarray]:
    """Random EffClass made to answer like a trained one: batch-norm statistics calibrated
    on the slices (so features vary at their natural scale) and the classifier aimed along
    the slices' feature differences, so P(ICH) spreads over (0, 1). Equal answers near 0.5
    alone would prove little."""
    torch.manual_seed(4)
    model = create_model("effclass")
    entries = load_labels(positive_study)["slices"]
    slices = [pydicom.dcmread(positive_study / e["file"]) for e in entries[::3][:8]]
    inputs = Predictor(model, default_model_config("effclass"), device="cpu").prepare(slices)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the calibration passes
    model.train()
    with torch.no_grad():
        model(torch.from_numpy(inputs))
    model.eval()
    features = []
    hook = model.resnet.avgpool.register_forward_hook(lambda _m, _i, out: features.append(out.flatten(1)))
    with torch.no_grad():
        model(torch.from_numpy(inputs))
        hook.remove()
        centred = features[0] - features[0].mean(0)
        direction = centred[centred.norm(dim=1).argmax()]
        scale = 8.0 / float((centred @ direction).abs().max())
        model.resnet.fc.weight.zero_()
        model.resnet.fc.bias.zero_()
        model.resnet.fc.weight[1] = direction * scale
        model.resnet.fc.bias[1] = -float(features[0].mean(0) @ direction) * scale
    return model, inputs


def test_onnxruntime_matches_eager_fp32(spread_model: tuple[torch.nn.Module, np.ndarray]) -> None:
    model, inputs = spread_model
    config = default_model_config("effclass")
    eager = Predictor(model, config, device="cpu", backend="torch", batch_size=4)
    fast = Predictor(model, config, device="cpu", backend="onnxruntime", batch_size=3)
    assert fast.forward.name == "onnxruntime-cpu" and eager.forward.name == "torch-fp32"
    expected, got = eager.predict(inputs), fast.predict(inputs)
    assert expected.std() > 0.05, "the test model should give varied probabilities"
    assert np.abs(expected - got).max() <= 1e-3
    # Grad-CAM still runs on the PyTorch model of the fast predictor.
    assert fast.gradcam(inputs[:1]).shape == (1, 512, 512)


def test_auto_backend_is_onnxruntime_on_a_cpu(spread_model: tuple[torch.nn.Module, np.ndarray]) -> None:
    spread_model, _ = spread_model
    auto = Predictor(spread_model, default_model_config("effclass"), device=Device("cpu"), backend=Backend.AUTO)
    assert auto.forward.name == "onnxruntime-cpu"
