"""The paper's patient-level rule: slice probabilities → study verdict, in one place.

A slice is positive when P(ICH) > slice_threshold; a study is positive when positive
slices number at least max(min_positive_slices, ceil(positive_fraction × N)). The study
score (maximum and top-k mean of the slice probabilities) is reported too, for ROC
analysis. The node, evaluation and the metrics all apply this rule; `[triage]` in the
node's config parses straight into a `TriageRule`, and a checkpoint stores the one it
recommends.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["TOP_K", "POSITIVE_LABEL", "NEGATIVE_LABEL", "TriageRule", "Verdict", "required_positive_slices",
           "key_slice_indices"]

TOP_K = 3  # the top-k study score: mean of the three highest slice probabilities
# A study's verdict as the database, the triage log and the node's pages name it.
POSITIVE_LABEL = "SUSPECTED - PRIORITY"
NEGATIVE_LABEL = "not detected"


def required_positive_slices(total: int, fraction: float, min_positive_slices: int) -> int:
    """max(min_positive_slices, ceil(fraction × total))."""
    # round() first: 0.07 × 100 is 7.000000000000001 in floating point, whose ceil is 8, not 7.
    return max(min_positive_slices, math.ceil(round(fraction * total, 9)))


@dataclass(frozen=True)
class Verdict:
    """What the rule says about one study."""

    positive: bool
    positive_slices: int
    total_slices: int
    required_slices: int
    study_score: float  # max slice probability
    top_k_score: float  # mean of the TOP_K highest slice probabilities
    rule: "TriageRule"

    @property
    def label(self) -> str:
        return POSITIVE_LABEL if self.positive else NEGATIVE_LABEL


@dataclass(frozen=True)
class TriageRule:
    """The rule's parameters, validated; the paper's values are the defaults.

    A bad value raises ValueError whose message starts with the field's name, so the
    config file can name the key (`triage.slice_threshold must be …`).
    """

    slice_threshold: float = 0.8
    positive_fraction: float = 0.05
    min_positive_slices: int = 1

    def __post_init__(self) -> None:
        if not 0.0 <= self.slice_threshold < 1.0:
            raise ValueError(f"slice_threshold must be in [0, 1), got {self.slice_threshold}")
        if not 0.0 <= self.positive_fraction <= 1.0:  # 0: min_positive_slices alone decides
            raise ValueError(f"positive_fraction must be in [0, 1], got {self.positive_fraction}")
        if self.min_positive_slices < 1:
            raise ValueError(f"min_positive_slices must be ≥ 1, got {self.min_positive_slices}")

    def apply(self, probabilities: np.ndarray) -> Verdict:
        """The verdict for the slice probabilities of one study (at least one slice)."""
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 1 or probabilities.size == 0:
            raise ValueError(f"need a non-empty 1-D array of slice probabilities, got shape {probabilities.shape}")
        total = int(probabilities.size)
        positive_slices = int(np.count_nonzero(probabilities > self.slice_threshold))
        required = required_positive_slices(total, self.positive_fraction, self.min_positive_slices)
        top = np.sort(probabilities)[::-1][:TOP_K]
        return Verdict(
            positive=positive_slices >= required,
            positive_slices=positive_slices,
            total_slices=total,
            required_slices=required,
            study_score=float(top[0]),
            top_k_score=float(top.mean()),
            rule=self,
        )


def key_slice_indices(probabilities: np.ndarray, count: int) -> list[int]:
    """The `count` most suspicious slices, most probable first (ties: lower index)."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")
    return [int(i) for i in order[:count]]
