"""`ichnode export`: the ONNX model agrees with PyTorch, the model card is rendered from the
checkpoint's config, and the plain-PyTorch loading in docs/training.md works as written."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from node.cli import main
from training.export import model_card, sample_inputs
from training.model.checkpoint import ModelConfig, load_checkpoint

DOCS = Path(__file__).resolve().parent.parent / "docs" / "training.md"


def _probability(logits: np.ndarray) -> np.ndarray:
    return torch.softmax(torch.from_numpy(logits), 1)[:, 1].numpy()


def test_export_round_trips_through_onnx(reference_run: Path, tmp_path: Path, capsys) -> None:
    checkpoint = reference_run / "model.pt"
    assert main(["export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "out")]) == 0
    assert "checked against PyTorch on 4 synthetic phantom slices" in capsys.readouterr().out
    path = tmp_path / "out" / "model.onnx"
    model_file = onnx.load(str(path))
    onnx.checker.check_model(model_file)
    assert model_file.opset_import[0].version == 17
    # Other slices than the export checked, and another batch size: the axis is dynamic.
    model, config = load_checkpoint(checkpoint)
    inputs = sample_inputs(config, count=3, seed=9)
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(["logits"], {"input": inputs})
    with torch.inference_mode():
        expected = _probability(model(torch.from_numpy(inputs)).numpy())
    np.testing.assert_allclose(_probability(logits), expected, atol=1e-5)

    card = (tmp_path / "out" / "MODEL_CARD.md").read_text()
    assert "DEMO MODEL - SYNTHETIC DATA - NOT FOR CLINICAL USE" in card
    for heading in ("Intended use", "ONNX export", "Architecture", "Input and preprocessing",
                    "Recommended triage rule", "Provenance"):
        assert f"## {heading}" in card
    assert "`provenance.metrics.measured_on`" not in card and "| `metrics.measured_on` |" in card
    assert "| `training.splits_sha256.train` |" in card and "| `training.config.optimizer.lr` | 0.001 |" in card


def test_the_model_card_shows_config_parts_added_later() -> None:
    from training.model.checkpoint import default_model_config

    Extended = dataclasses.make_dataclass(
        "Extended", [("supported_inputs", dict, dataclasses.field(default_factory=lambda: {"body_part": "HEAD"}))],
        bases=(ModelConfig,), frozen=True)
    base = default_model_config("resnet18")
    card = model_card(Extended(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}),
                      checkpoint=Path("m.pt"), sha256="0" * 64)
    assert "## Supported inputs" in card and "| `body_part` | HEAD |" in card
    assert "UNTRAINED MODEL" in card


def test_the_plain_pytorch_recipe_in_the_docs_runs(reference_run: Path) -> None:
    """docs/training.md shows how to load a checkpoint without ichnode; run that code."""
    blocks = re.findall(r"<!-- plain-pytorch -->\n```python\n(.*?)```", DOCS.read_text(), flags=re.S)
    assert len(blocks) == 1
    namespace: dict = {"CHECKPOINT": str(reference_run / "model.pt")}
    exec(compile(blocks[0], "docs/training.md", "exec"), namespace)
    model, config = load_checkpoint(reference_run / "model.pt")
    x = torch.from_numpy(sample_inputs(config, count=2))
    with torch.inference_mode():
        torch.testing.assert_close(namespace["net"](x), model(x))
    assert namespace["config"]["provenance"]["training_data"] == "synthetic"
