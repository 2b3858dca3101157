"""The layers Grad-CAM can explain at (`explain.gradcam_layer`). Each architecture in the
registry lists the ones it has, best first. No torch import: a config names them."""

from __future__ import annotations

import enum

__all__ = ["GradcamLayer"]


class GradcamLayer(enum.StrEnum):
    """Where Grad-CAM explains (explain.gradcam_layer); each architecture lists the ones it has."""

    AUTO = "auto"  # the architecture's best: the first it lists
    BIFPN_P3 = "bifpn_p3"  # EffClass's BiFPN P3 output, 64 × 64 values on the input's own grid
    LAYER4 = "layer4"  # the ResNet's last block, 7 × 7 values: the paper's choice
    LAYER3 = "layer3"  # the block before, 14 × 14 values
