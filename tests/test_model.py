"""EffClass and the baselines: shapes and parameter counts of the paper's architecture."""

from __future__ import annotations

import pytest
import torch

from training.model.architectures import (
    EFFCLASS_DECONVS,
    available_models,
    count_parameters,
    create_model,
)


@pytest.fixture(scope="module")
def effclass() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("effclass").eval()


def test_registry_lists_effclass_and_baselines() -> None:
    assert available_models() == ["effclass", "resnet18", "resnet34", "resnet50"]
    with pytest.raises(ValueError, match="unknown model architecture 'effnet'.*effclass"):
        create_model("effnet")


def test_effclass_parameter_count_matches_the_paper(effclass: torch.nn.Module) -> None:
    assert count_parameters(effclass) == 16_027_268
    assert count_parameters(effclass.effdet.backbone) == 3_595_388
    assert count_parameters(effclass.effdet.fpn) == 194_361
    assert [count_parameters(d) for d in effclass.deconvs] == [
        369_680, 62_220, 294_920, 200_708, 115_202
    ]
    assert count_parameters(effclass.conv0) == 16_816
    assert count_parameters(effclass.conv1) == 435
    assert count_parameters(effclass.resnet) == 11_177_538


def test_effclass_intermediate_shapes(effclass: torch.nn.Module) -> None:
    x = torch.randn(2, 3, 512, 512)
    with torch.inference_mode():
        levels = effclass.effdet.fpn(effclass.effdet.backbone(x))
        assert [tuple(t.shape) for t in levels] == [
            (2, 64, side, side) for side in (64, 32, 16, 8, 4)
        ]
        upsampled = [deconv(level) for deconv, level in zip(effclass.deconvs, levels)]
        assert [tuple(t.shape) for t in upsampled] == [
            (2, spec[0], 224, 224) for spec in EFFCLASS_DECONVS
        ]
        assert sum(t.shape[1] for t in upsampled) == 42
        logits = effclass(x)
    assert logits.shape == (2, 2)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("shape", [(1, 3, 224, 224), (1, 1, 512, 512), (3, 512, 512)])
def test_effclass_refuses_other_inputs(effclass: torch.nn.Module, shape: tuple) -> None:
    with pytest.raises(ValueError, match=r"shape \[batch, 3, 512, 512\]"):
        effclass(torch.zeros(shape))


@pytest.mark.parametrize("name, fc_in", [("resnet18", 512), ("resnet34", 512), ("resnet50", 2048)])
def test_baselines_have_two_logits_at_224(name: str, fc_in: int) -> None:
    model = create_model(name).eval()
    assert model.resnet.fc.in_features == fc_in and model.resnet.fc.out_features == 2
    with torch.inference_mode():
        assert model(torch.zeros(1, 3, 224, 224)).shape == (1, 2)


def test_random_initialisations_differ() -> None:
    a, b = create_model("resnet18"), create_model("resnet18")
    assert not torch.equal(a.resnet.conv1.weight, b.resnet.conv1.weight)
