"""The paper's patient-level rule: its parameters and the slice count it requires.

A slice is positive when P(ICH) > slice_threshold; a study is positive when positive
slices number at least max(min_positive_slices, ceil(positive_fraction × N)). Shared by
the node, evaluation and checkpoints, so the rule exists once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["TriageRule", "required_positive_slices"]


@dataclass(frozen=True)
class TriageRule:
    """The rule's parameters, validated; the paper's values are the defaults."""

    slice_threshold: float = 0.8
    positive_fraction: float = 0.05
    min_positive_slices: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.slice_threshold < 1.0:
            raise ValueError(f"slice_threshold must be in [0, 1), got {self.slice_threshold}")
        if not 0.0 < self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction must be in (0, 1], got {self.positive_fraction}")
        if self.min_positive_slices < 1:
            raise ValueError(f"min_positive_slices must be ≥ 1, got {self.min_positive_slices}")


def required_positive_slices(total: int, fraction: float, min_positive_slices: int) -> int:
    """max(min_positive_slices, ceil(fraction × total))."""
    # round() first: 0.07 × 100 is 7.000000000000001 in floating point, whose ceil is 8, not 7.
    return max(min_positive_slices, math.ceil(round(fraction * total, 9)))
