"""Pretrained parts from local files: the paper's starting point, never downloaded.

The paper starts EffClass from an EfficientDet-D0 trained on COCO (effdet's checkpoint;
its backbone and BiFPN are kept, its detection heads are not used) and a ResNet18
trained on ImageNet (torchvision's weights; its 1000-class `fc` is replaced by the
two-class one). A machine with internet downloads the files once (docs/training.md,
"Pretrained parts"); training reads them from disk and checks each file's SHA-256 before
using it: against the digest the user states, or else against what the publisher put in
the file name (the first hex digits of the SHA-256, which is all torchvision and effdet
publish, and what torch.hub checks).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from training.errors import CheckpointError, ConfigError
from training.model.checkpoint import read_torch_file

__all__ = ["PUBLISHED_FILES", "PublishedFile", "check_sha256_text", "file_sha256", "load_pretrained_parts"]


@dataclass(frozen=True)
class PublishedFile:
    """A pretrained file as its publisher names it; `sha256` is the digest or its prefix."""

    part: str  # "effdet" or "resnet"
    url: str
    sha256: str
    contents: str

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]


# The URLs are those of effdet's model config (efficientdet_d0) and of torchvision's
# ResNet*_Weights.IMAGENET1K_V1; the hex digits after the last '-' are the first digits of
# each file's SHA-256, the only part of it either project publishes.
PUBLISHED_FILES: dict[str, PublishedFile] = {f.name: f for f in (
    PublishedFile("effdet", "https://github.com/rwightman/efficientdet-pytorch/releases/download/v0.1/"
                            "efficientdet_d0-f3276ba8.pth", "f3276ba8",
                  "EfficientDet-D0 trained on COCO (effdet 0.4): backbone, BiFPN and detection heads"),
    PublishedFile("resnet", "https://download.pytorch.org/models/resnet18-f37072fd.pth", "f37072fd",
                  "torchvision ResNet18_Weights.IMAGENET1K_V1"),
    PublishedFile("resnet", "https://download.pytorch.org/models/resnet34-b627a593.pth", "b627a593",
                  "torchvision ResNet34_Weights.IMAGENET1K_V1"),
    PublishedFile("resnet", "https://download.pytorch.org/models/resnet50-0676ba61.pth", "0676ba61",
                  "torchvision ResNet50_Weights.IMAGENET1K_V1"),
)}

_HEX64 = re.compile(r"[0-9a-f]{64}")
# Keys of a timm EfficientNet classifier that effdet's feature backbone does not have.
_TIMM_HEAD = ("conv_head.", "bn2.", "classifier.")


def check_sha256_text(key: str, value: str) -> None:
    """A stated digest must be the whole SHA-256: 64 lower-case hex digits."""
    if value and not _HEX64.fullmatch(value):
        raise ConfigError(f"{key} must be a SHA-256 of 64 lower-case hex digits (sha256sum prints it), got {value!r}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _verified(path: Path, part: str, stated: str, key: str) -> dict[str, str]:
    """The file's SHA-256 checked against the stated digest, or the published one."""
    if not path.is_file():
        raise CheckpointError(f"pretrained {part} weights {path} (model.{key}) do not exist; docs/training.md "
                              "says where to download them")
    actual = file_sha256(path)
    if stated:
        if actual != stated:
            raise CheckpointError(f"{path} has SHA-256 {actual}, but model.{key}_sha256 says {stated}: the file is "
                                  "not the one you checked; download it again or state the digest of this one")
        return {"file": str(path), "sha256": actual, "checked_against": "the SHA-256 stated in the training config"}
    published = PUBLISHED_FILES.get(path.name)
    if published is None or published.part != part:
        known = ", ".join(f.name for f in PUBLISHED_FILES.values() if f.part == part)
        raise CheckpointError(f"{path} is not a file docs/training.md documents for the {part} part ({known}); "
                              f"state its SHA-256 with model.{key}_sha256 to use it")
    if not actual.startswith(published.sha256):
        raise CheckpointError(f"{path} has SHA-256 {actual}, which does not begin with {published.sha256} as the "
                              f"published file does ({published.url}, docs/training.md): it is damaged or another "
                              "file; download it again")
    return {"file": str(path), "sha256": actual,
            "checked_against": f"the published SHA-256 prefix {published.sha256} of {published.name}"}


def _state_dict(path: Path) -> dict[str, torch.Tensor]:
    payload: Any = read_torch_file(path, "a PyTorch weights file")
    for wrapper in ("state_dict", "model"):  # training checkpoints wrap the weights
        if isinstance(payload, dict) and isinstance(payload.get(wrapper), dict):
            payload = payload[wrapper]
    if not (isinstance(payload, dict) and payload and all(isinstance(v, torch.Tensor) for v in payload.values())):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    return payload


def _load_into(target: nn.Module, weights: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Every weight of `target` from `weights`, with the shapes it has; a file with weights
    missing, extra (a deeper network holds a shallower one's keys) or of other shapes is refused."""
    own = target.state_dict()
    missing = sorted(set(own) - set(weights))
    if missing:
        raise CheckpointError(f"{path} is not {what}: it lacks {len(missing)} of its {len(own)} weights "
                              f"(first: {missing[0]})")
    extra = sorted(set(weights) - set(own))
    if extra:
        raise CheckpointError(f"{path} is not {what}: it has {len(extra)} weights the model does not "
                              f"(first: {extra[0]})")
    wrong = [k for k in own if tuple(weights[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise CheckpointError(f"{path} is not {what}: {wrong[0]} has shape {tuple(weights[wrong[0]].shape)}, "
                              f"the model needs {tuple(own[wrong[0]].shape)}")
    target.load_state_dict({k: weights[k] for k in own})


def _load_effdet(model: nn.Module, path: Path) -> str:
    """effdet's EfficientDet checkpoint (backbone + BiFPN kept) or a timm EfficientNet (backbone only)."""
    weights = _state_dict(path)
    if any(k.startswith("backbone.") for k in weights):
        for name in ("backbone", "fpn"):
            prefix = f"{name}."
            part = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
            _load_into(getattr(model.effdet, name), part, path, f"an EfficientDet-D0 checkpoint ({name})")
        return "EfficientDet-D0 backbone and BiFPN (detection heads not used)"
    backbone = {k: v for k, v in weights.items() if not k.startswith(_TIMM_HEAD)}
    _load_into(model.effdet.backbone, backbone, path, "an EfficientDet-D0 or EfficientNet-B0 backbone checkpoint")
    return "EfficientNet-B0 backbone (BiFPN from random weights)"


def _load_resnet(model: nn.Module, path: Path) -> str:
    weights = {k: v for k, v in _state_dict(path).items() if not k.startswith("fc.")}
    resnet = model.resnet
    _load_into(nn.ModuleDict({name: child for name, child in resnet.named_children() if name != "fc"}),
               weights, path, "torchvision ResNet weights of this depth")
    return "ResNet (all but the two-class fc, which starts from random weights)"


def load_pretrained_parts(model: nn.Module, architecture: str, *, effdet: Path | None = None,
                          effdet_sha256: str = "", resnet: Path | None = None,
                          resnet_sha256: str = "") -> dict[str, dict[str, str]]:
    """Load the pretrained parts named into `model` (in place), each checked by SHA-256
    first; returns what was loaded from which file, for the checkpoint's provenance."""
    loaded: dict[str, dict[str, str]] = {}
    if effdet is not None:
        if not hasattr(model, "effdet"):
            raise ConfigError(f"model.pretrained_effdet: architecture {architecture!r} has no EfficientDet part")
        record = _verified(Path(effdet), "effdet", effdet_sha256, "pretrained_effdet")
        loaded["effdet"] = {**record, "loaded": _load_effdet(model, Path(effdet))}
    if resnet is not None:
        record = _verified(Path(resnet), "resnet", resnet_sha256, "pretrained_resnet")
        loaded["resnet"] = {**record, "loaded": _load_resnet(model, Path(resnet))}
    return loaded
