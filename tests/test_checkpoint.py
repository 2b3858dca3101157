"""Checkpoints: weights and the model's own config in one file; clear errors otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from node.errors import CheckpointError
from training.model.checkpoint import (
    ModelConfig,
    Provenance,
    default_model_config,
    initial_model,
    load_checkpoint,
    save_checkpoint,
)
from training.model.architectures import create_model


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_round_trip_keeps_weights_and_config(tmp_path: Path) -> None:
    model = create_model("effclass")
    provenance = Provenance(
        training_data="synthetic",
        description="unit test",
        metrics={"slice_roc_auc": 0.5, "data": "synthetic seed 1"},
    )
    config = default_model_config("effclass", provenance)
    path = save_checkpoint(tmp_path / "m.pt", model, config)
    loaded, loaded_config = load_checkpoint(path, architecture="effclass")
    assert _same_weights(model, loaded)
    assert not loaded.training
    assert loaded_config == config
    assert loaded_config.preprocess.input_size == 512
    assert loaded_config.triage.slice_threshold == 0.8
    assert loaded_config.provenance.synthetic and not loaded_config.provenance.untrained
    assert loaded_config.provenance.code_version.startswith("ichnode")
    assert not list(tmp_path.glob(".m.pt.*")), "the temporary file was left behind"


def test_half_precision_file_is_smaller_and_loads_as_float32(tmp_path: Path) -> None:
    model = create_model("resnet18")
    config = default_model_config("resnet18")
    full = save_checkpoint(tmp_path / "full.pt", model, config)
    half = save_checkpoint(tmp_path / "half.pt", model, config, half=True)
    assert half.stat().st_size < 0.6 * full.stat().st_size
    loaded, _ = load_checkpoint(half)
    original = model.state_dict()
    for name, value in loaded.state_dict().items():
        assert value.dtype == original[name].dtype  # float32 again; integer counters untouched
        if value.is_floating_point():
            torch.testing.assert_close(value, original[name].half().float(), rtol=0, atol=0)


def test_default_provenance_says_untrained() -> None:
    config = default_model_config("resnet18")
    assert config.provenance.untrained and not config.provenance.synthetic
    assert config.preprocess.input_size == 224


def test_config_refuses_wrong_input_size() -> None:
    from training.model.preprocess import PreprocessSpec

    with pytest.raises(ValueError, match="takes 512² input, config says 224"):
        ModelConfig(architecture="effclass", preprocess=PreprocessSpec(input_size=224))


def test_provenance_refuses_unknown_data_kind() -> None:
    with pytest.raises(ValueError, match="training_data must be one of"):
        Provenance(training_data="imagenet")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


@pytest.mark.parametrize(
    "content",
    [b"not a checkpoint at all", b"\x89PNG\r\n\x1a\n" + bytes(100), b""],
)
def test_foreign_files_are_not_checkpoints(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "foreign.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=r"foreign\.pt is not a model checkpoint"):
        load_checkpoint(path)


def test_torch_file_without_header_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bare.pt"
    torch.save(create_model("resnet18").state_dict(), path)
    with pytest.raises(CheckpointError, match="not an ichnode checkpoint"):
        load_checkpoint(path)


def test_other_architecture_is_refused(tmp_path: Path) -> None:
    path = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18"), default_model_config("resnet18"))
    with pytest.raises(CheckpointError, match="holds a 'resnet18' model, not 'effclass'"):
        load_checkpoint(path, architecture="effclass")


def test_weights_that_do_not_fit_are_refused(tmp_path: Path) -> None:
    # resnet34 weights under a resnet18 config
    path = save_checkpoint(tmp_path / "mixed.pt", create_model("resnet34"), default_model_config("resnet18"))
    with pytest.raises(CheckpointError, match="weights do not fit architecture 'resnet18'"):
        load_checkpoint(path)


def test_init_from_checkpoint_or_state_dict(tmp_path: Path) -> None:
    source = create_model("resnet18")
    checkpoint = save_checkpoint(tmp_path / "c.pt", source, default_model_config("resnet18"))
    bare = tmp_path / "bare.pt"
    torch.save(source.state_dict(), bare)
    assert _same_weights(initial_model("resnet18", init_from=checkpoint), source)
    assert _same_weights(initial_model("resnet18", init_from=bare), source)
    with pytest.raises(CheckpointError, match="do not fit architecture 'resnet50'"):
        initial_model("resnet50", init_from=bare)
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="neither a checkpoint nor a state dict"):
        initial_model("resnet18", init_from=tmp_path / "other.pt")
