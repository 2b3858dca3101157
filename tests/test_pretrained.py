"""The paper's starting point from local files: effdet's EfficientDet-D0 checkpoint (or a
timm EfficientNet-B0) and torchvision's ResNet weights, each checked by SHA-256. The
files here are made by the tests in the publishers' formats (random weights, the same
keys and shapes); nothing is downloaded."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchvision import models as tv_models

from node.errors import CheckpointError, ConfigError
from tests.trainrun import write_train_config
from training.model.architectures import create_model
from training.model.checkpoint import load_checkpoint
from training.pretrained import PUBLISHED_FILES, file_sha256, load_pretrained_parts
from training.train import load_train_config, train

DOCS = Path(__file__).resolve().parent.parent / "docs" / "training.md"


def _same(module: torch.nn.Module, weights: dict[str, torch.Tensor], prefix: str = "") -> bool:
    own = module.state_dict()
    return all(torch.equal(own[k], weights[prefix + k]) for k in own)


@pytest.fixture(scope="module")
def effdet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file as effdet publishes efficientdet_d0: the whole EfficientDet's state dict."""
    from effdet import create_model as create_effdet

    torch.manual_seed(1)
    detector = create_effdet("efficientdet_d0", pretrained=False, pretrained_backbone=False)
    path = tmp_path_factory.mktemp("weights") / "efficientdet_d0-f3276ba8.pth"
    torch.save(detector.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def resnet18_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A file as torchvision publishes resnet18 IMAGENET1K_V1: a 1000-class state dict."""
    torch.manual_seed(2)
    path = tmp_path_factory.mktemp("weights") / "resnet18-f37072fd.pth"
    torch.save(tv_models.resnet18(weights=None).state_dict(), path)
    return path


def test_effclass_starts_from_the_pretrained_effdet_and_resnet(effdet_file: Path, resnet18_file: Path) -> None:
    model = create_model("effclass")
    head_before = model.resnet.fc.weight.clone()
    loaded = load_pretrained_parts(model, "effclass", effdet=effdet_file, effdet_sha256=file_sha256(effdet_file),
                                   resnet=resnet18_file, resnet_sha256=file_sha256(resnet18_file))
    detector = torch.load(effdet_file, weights_only=True)
    assert _same(model.effdet.backbone, detector, "backbone.") and _same(model.effdet.fpn, detector, "fpn.")
    resnet = torch.load(resnet18_file, weights_only=True)
    assert all(torch.equal(v, resnet[k]) for k, v in model.resnet.state_dict().items() if not k.startswith("fc."))
    assert torch.equal(model.resnet.fc.weight, head_before)  # the 2-class head is not ImageNet's
    assert loaded["effdet"]["sha256"] == file_sha256(effdet_file)
    assert "backbone and BiFPN" in loaded["effdet"]["loaded"]
    assert loaded["resnet"]["checked_against"] == "the SHA-256 stated in the training config"


def test_a_timm_backbone_file_loads_the_backbone_only(tmp_path: Path) -> None:
    import timm

    torch.manual_seed(3)
    classifier = timm.create_model("efficientnet_b0", pretrained=False)
    path = tmp_path / "efficientnet_b0.pth"
    torch.save(classifier.state_dict(), path)
    model = create_model("effclass")
    fpn_before = {k: v.clone() for k, v in model.effdet.fpn.state_dict().items()}
    loaded = load_pretrained_parts(model, "effclass", effdet=path, effdet_sha256=file_sha256(path))
    assert _same(model.effdet.backbone, classifier.state_dict())
    assert all(torch.equal(v, fpn_before[k]) for k, v in model.effdet.fpn.state_dict().items())
    assert "BiFPN from random weights" in loaded["effdet"]["loaded"]


def test_files_are_checked_by_sha256_before_use(effdet_file: Path, resnet18_file: Path, tmp_path: Path) -> None:
    model = create_model("resnet18")
    # No digest stated: the documented file's published prefix decides, and these test
    # files (random weights under the published names) are not the published ones.
    with pytest.raises(CheckpointError, match=r"does not begin with f37072fd as the published file does"):
        load_pretrained_parts(model, "resnet18", resnet=resnet18_file)
    with pytest.raises(CheckpointError, match=r"but model.pretrained_resnet_sha256 says 0{64}"):
        load_pretrained_parts(model, "resnet18", resnet=resnet18_file, resnet_sha256="0" * 64)
    renamed = tmp_path / "my-resnet.pth"
    renamed.write_bytes(resnet18_file.read_bytes())
    with pytest.raises(CheckpointError, match="not a file docs/training.md documents .* state its SHA-256"):
        load_pretrained_parts(model, "resnet18", resnet=renamed)
    deeper = tmp_path / "resnet34.pth"
    torch.save(tv_models.resnet34(weights=None).state_dict(), deeper)
    with pytest.raises(CheckpointError, match="not torchvision ResNet weights of this depth"):
        load_pretrained_parts(model, "resnet18", resnet=deeper, resnet_sha256=file_sha256(deeper))
    with pytest.raises(ConfigError, match="has no EfficientDet part"):
        load_pretrained_parts(model, "resnet18", effdet=effdet_file, effdet_sha256=file_sha256(effdet_file))


def test_a_training_run_records_its_pretrained_parts(resnet18_file: Path, training_prepared: Path,
                                                     tmp_path: Path) -> None:
    digest = file_sha256(resnet18_file)
    bad = write_train_config(tmp_path / "bad.toml", training_prepared, tmp_path / "experiments", "bad",
                             model={"pretrained_resnet": str(resnet18_file), "pretrained_resnet_sha256": "F00"})
    with pytest.raises(ConfigError, match="model.pretrained_resnet_sha256 must be a SHA-256 of 64"):
        load_train_config(bad)
    config = load_train_config(write_train_config(
        tmp_path / "t.toml", training_prepared, tmp_path / "experiments", "pretrained",
        model={"pretrained_resnet": str(resnet18_file), "pretrained_resnet_sha256": digest},
        training={"epochs": 1, "max_steps_per_epoch": 1, "workers": 0}))
    result = train(config, progress=False)
    initial = load_checkpoint(result.checkpoint)[1].provenance.training["initial_weights"]
    assert initial["pretrained"]["resnet"]["sha256"] == digest
    assert initial["pretrained"]["resnet"]["file"] == str(resnet18_file)
    assert json.loads((config.folder / "run.json").read_text())["warnings"] == []  # nothing starts at random


def test_the_documented_files_are_the_ones_the_code_checks() -> None:
    docs = DOCS.read_text()
    for published in PUBLISHED_FILES.values():
        assert published.url in docs, published.url
        assert f"`{published.sha256}`" in docs, published.sha256
    # The URLs are the libraries' own.
    from effdet.config.model_config import get_efficientdet_config
    from torchvision.models import ResNet18_Weights

    assert get_efficientdet_config("efficientdet_d0").url in {f.url for f in PUBLISHED_FILES.values()}
    assert ResNet18_Weights.IMAGENET1K_V1.url in {f.url for f in PUBLISHED_FILES.values()}
