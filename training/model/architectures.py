"""Model architectures: EffClass (Cortés-Ferre et al., J. Imaging 2023, 9, 37) and the
paper's ResNet baselines, built through one registry.

Every network here starts from random weights or from a local file; nothing is fetched.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torchvision import models as tv_models

from training.errors import ConfigError
from training.model.layers import GradcamLayer

__all__ = [
    "ArchitectureSpec",
    "EffClass",
    "available_models",
    "architecture_spec",
    "resolve_gradcam_layer",
    "GradcamSplit",
    "gradcam_split",
    "gradcam_module",
    "descriptor_modules",
    "create_model",
    "count_parameters",
]

# (out_channels, kernel, stride, padding, dilation) of the five ConvTranspose2d layers of
# the paper's reference code; each maps one BiFPN level (64², 32², 16², 8², 4²) to 224².
EFFCLASS_DECONVS: tuple[tuple[int, int, int, int, int], ...] = (
    (16, 19, 3, 1, 2),
    (12, 9, 7, 1, 1),
    (8, 24, 9, 2, 4),
    (4, 28, 9, 1, 6),
    (2, 30, 8, 2, 7),
)
BIFPN_CHANNELS = 64


# Blocks of a ResNet (EffClass's head or a baseline) Grad-CAM can explain at.
RESNET_LAYERS = (GradcamLayer.LAYER4, GradcamLayer.LAYER3)


@dataclass(frozen=True)
class ArchitectureSpec:
    """What the registry knows about one architecture: how to build it, its input, and the
    layers Grad-CAM can explain at (the first is the default)."""

    name: str
    input_size: int
    build: Callable[[], nn.Module]
    description: str
    gradcam_layers: tuple[GradcamLayer, ...]
    # Layers whose channel means describe an input for the out-of-distribution check
    # (training/model/inputs.py), in the order the inference pass returns them.
    descriptor_layers: tuple[str, ...] = ("logits", "layer3", "avgpool")


def _resnet_classifier(depth: int) -> nn.Module:
    builder = {18: tv_models.resnet18, 34: tv_models.resnet34, 50: tv_models.resnet50}[depth]
    net = builder(weights=None)
    net.fc = nn.Linear(net.fc.in_features, 2)
    return net


class EffClass(nn.Module):
    """EfficientDet-D0 backbone + BiFPN → five transposed convolutions → two convolutions
    → ResNet18, as in the paper's reference code.

    The deconvolutions leave pixels that no input reaches (they hold only the bias); that
    is the published architecture and is kept as it is.
    """

    input_size = 512

    def __init__(self) -> None:
        super().__init__()
        # Imported here so that listing the registry does not pay for effdet's import.
        from effdet import create_model as create_effdet

        self.effdet = create_effdet(
            "efficientdet_d0", pretrained=False, pretrained_backbone=False
        )
        self.effdet.box_net = nn.Identity()
        self.effdet.class_net = nn.Identity()
        self.deconvs = nn.ModuleList(
            nn.ConvTranspose2d(
                BIFPN_CHANNELS, out_ch, kernel, stride=stride, padding=padding, dilation=dil
            )
            for out_ch, kernel, stride, padding, dil in EFFCLASS_DECONVS
        )
        merged_channels = sum(spec[0] for spec in EFFCLASS_DECONVS)
        self.conv0 = nn.Conv2d(merged_channels, 16, 5, padding=2)
        self.conv1 = nn.Conv2d(16, 3, 3, padding=1)
        self.resnet = _resnet_classifier(18)

    def _bifpn_node(self, level: int) -> int:
        """Index, in the last BiFPN cell, of the node whose output is pyramid level `level`."""
        from effdet.efficientdet import get_fpn_config

        # The node list BiFpn itself was built from; the last node of a level is its output.
        config = self.effdet.config
        fpn = config.fpn_config or get_fpn_config(config.fpn_name, min_level=config.min_level,
                                                  max_level=config.max_level)
        return max(i for i, node in enumerate(fpn["nodes"]) if node["feat_level"] == level)

    def bifpn_output(self, level: int) -> nn.Module:
        """The BiFPN node whose output is pyramid level `level` (3 = 64², 8 input pixels a value).

        The five deconvolutions draw the levels onto the ResNet's 224² input at different
        scales: only P4 lands in proportion; P3 is squeezed 14 % towards the centre and P7
        86 %. A Grad-CAM map of a ResNet block is therefore pulled towards the centre of
        the head, while a BiFPN level still lies on the input's own grid.
        """
        return self.effdet.fpn.cell[-1].fnode[self._bifpn_node(level)]

    def bifpn_until(self, x: torch.Tensor, level: int) -> list[torch.Tensor]:
        """The last BiFPN cell's node list up to, and ending with, the output of `level`:
        everything the rest of the network needs from below that node."""
        fpn = self.effdet.fpn
        features = self.effdet.backbone(x)
        for resample in fpn.resample.values():
            features.append(resample(features[-1]))
        *cells, last = fpn.cell
        for cell in cells:
            features = cell(features)
        nodes = list(features)
        for fnode in last.fnode[: self._bifpn_node(level) + 1]:
            nodes.append(fnode(nodes))
        return nodes

    def bifpn_after(self, nodes: list[torch.Tensor], level: int) -> torch.Tensor:
        """Logits from what `bifpn_until` returned: the last cell's remaining nodes, then the head."""
        last = self.effdet.fpn.cell[-1]
        nodes = list(nodes)
        for fnode in last.fnode[self._bifpn_node(level) + 1:]:
            nodes.append(fnode(nodes))
        return self.resnet(self.merge(nodes[-last.num_levels:]))

    def merge(self, levels: list[torch.Tensor]) -> torch.Tensor:
        """The five pyramid levels drawn onto one 3 × 224² image for the ResNet."""
        upsampled = [deconv(level) for deconv, level in zip(self.deconvs, levels)]
        return self.conv1(self.conv0(torch.cat(upsampled, dim=1)))

    def resnet_input(self, x: torch.Tensor) -> torch.Tensor:
        self._check(x)
        return self.merge(self.effdet.fpn(self.effdet.backbone(x)))

    def _check(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, self.input_size, self.input_size):
            raise ValueError(
                f"EffClass needs input of shape [batch, 3, {self.input_size}, "
                f"{self.input_size}], got {list(x.shape)}"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(self.resnet_input(x))


class ResNetBaseline(nn.Module):
    """The paper's ResNet baselines: a torchvision ResNet with a two-class head at 224²."""

    input_size = 224

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.resnet = _resnet_classifier(depth)

    def resnet_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.resnet(x)


_REGISTRY: dict[str, ArchitectureSpec] = {}


def _register(name: str, input_size: int, description: str,
              gradcam_layers: tuple[GradcamLayer, ...] = RESNET_LAYERS,
              descriptor_layers: tuple[str, ...] = ("logits", "layer3", "avgpool")):
    def decorator(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
        _REGISTRY[name] = ArchitectureSpec(name, input_size, build, description, gradcam_layers, descriptor_layers)
        return build

    return decorator


# EffClass explains best at its BiFPN's P3 output: see EffClass.bifpn_output.
@_register("effclass", 512, "EffClass: EfficientDet-D0 + BiFPN + deconvolutions + ResNet18",
           (GradcamLayer.BIFPN_P3, *RESNET_LAYERS), ("logits", "bifpn", "layer3", "avgpool"))
def _effclass() -> nn.Module:
    return EffClass()


@_register("resnet18", 224, "ResNet18 baseline, 2 classes")
def _resnet18() -> nn.Module:
    return ResNetBaseline(18)


@_register("resnet34", 224, "ResNet34 baseline, 2 classes")
def _resnet34() -> nn.Module:
    return ResNetBaseline(34)


@_register("resnet50", 224, "ResNet50 baseline, 2 classes")
def _resnet50() -> nn.Module:
    return ResNetBaseline(50)


def available_models() -> list[str]:
    """Names accepted by `create_model`."""
    return sorted(_REGISTRY)


def architecture_spec(name: str) -> ArchitectureSpec:
    """The registry entry for `name`, or a ValueError listing the known names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown model architecture {name!r}; known: {', '.join(available_models())}"
        ) from None


def resolve_gradcam_layer(architecture: str, layer: GradcamLayer) -> GradcamLayer:
    """`auto` → the architecture's best layer; a layer it lacks is a ConfigError naming
    the ones it has."""
    layers = architecture_spec(architecture).gradcam_layers
    if layer == GradcamLayer.AUTO:
        return layers[0]
    if layer not in layers:
        raise ConfigError(f"Grad-CAM layer {str(layer)!r} (explain.gradcam_layer) does not exist in "
                          f"{architecture!r}; it has {', '.join(layers)}")
    return layer


@dataclass(frozen=True)
class GradcamSplit:
    """A network cut at a Grad-CAM layer. `below(x)` gives what the rest of the network
    needs, its last tensor being the layer's output (the activation Grad-CAM weighs);
    `above(features)` gives the logits from it. Grad-CAM then needs gradients only above
    the cut, and `below` can run once, without them, in the inference pass."""

    below: Callable[[torch.Tensor], list[torch.Tensor]]
    above: Callable[[list[torch.Tensor]], torch.Tensor]


def _resnet_stages(resnet: nn.Module) -> list[nn.Module]:
    stem = nn.Sequential(resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
    return [stem, resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4]


def gradcam_split(model: nn.Module, layer: GradcamLayer) -> GradcamSplit:
    """`model` cut at the output of a resolved `layer` (see GradcamSplit)."""
    if layer == GradcamLayer.BIFPN_P3:
        return GradcamSplit(lambda x: model.bifpn_until(x, 3), lambda nodes: model.bifpn_after(nodes, 3))
    stages = _resnet_stages(model.resnet)
    cut = [GradcamLayer.LAYER3, GradcamLayer.LAYER4].index(layer) + 4  # stages[3] is layer3

    def below(x: torch.Tensor) -> list[torch.Tensor]:
        h = model.resnet_input(x)
        for stage in stages[:cut]:
            h = stage(h)
        return [h]

    def above(features: list[torch.Tensor]) -> torch.Tensor:
        h = features[-1]
        for stage in stages[cut:]:
            h = stage(h)
        return model.resnet.fc(torch.flatten(model.resnet.avgpool(h), 1))

    return GradcamSplit(below, above)


def gradcam_module(model: nn.Module, layer: GradcamLayer) -> nn.Module:
    """The module whose output is a resolved `layer` of `model`: where pytorch-grad-cam's
    hooks would weigh it (the reference the split path is tested against)."""
    if layer == GradcamLayer.BIFPN_P3:
        return model.bifpn_output(3)
    return getattr(model.resnet, str(layer))[-1]


def descriptor_modules(model: nn.Module, layer: str) -> list[nn.Module]:
    """The modules whose outputs, averaged over space and joined, make descriptor `layer`:
    `bifpn` the five BiFPN outputs of EffClass (P3-P7), `layer3` the ResNet's third block,
    `avgpool` its pooled last features (the classifier's input). `logits` has no module:
    the inference pass returns the logits anyway."""
    if layer == "bifpn":
        return [model.bifpn_output(level) for level in range(3, 8)]
    if layer in ("layer3", "avgpool"):
        return [getattr(model.resnet, layer)]
    raise ValueError(f"unknown descriptor layer {layer!r}; known: logits, bifpn, layer3, avgpool")


def create_model(name: str) -> nn.Module:
    """Build architecture `name` with random weights (initial weights from a file:
    training.model.checkpoint.initial_model)."""
    return architecture_spec(name).build()


def count_parameters(model: nn.Module) -> int:
    """All parameters, trainable or not."""
    return sum(p.numel() for p in model.parameters())
