"""The paper's patient-level rule: slice probabilities → study verdict.

A slice is positive when P(ICH) > slice_threshold. The study is positive when positive
slices number at least max(min_positive_slices, ceil(positive_fraction × N)). The study
score (max and top-k mean of slice probabilities) is reported too, for ROC analysis.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.rule import required_positive_slices

__all__ = ["Verdict", "patient_verdict", "key_slice_indices"]

TOP_K_SCORE = 3


@dataclass(frozen=True)
class Verdict:
    positive: bool
    positive_slices: int
    total_slices: int
    required_slices: int
    study_score: float  # max slice probability
    top_k_score: float  # mean of the TOP_K_SCORE highest slice probabilities
    slice_threshold: float
    positive_fraction: float

    @property
    def label(self) -> str:
        return "SUSPECTED - PRIORITY" if self.positive else "not detected"


def patient_verdict(
    probabilities: np.ndarray,
    *,
    slice_threshold: float,
    positive_fraction: float,
    min_positive_slices: int,
) -> Verdict:
    """Apply the rule to the slice probabilities of one study (at least one slice)."""
    probabilities = np.asarray(probabilities, dtype=np.float64)
    if probabilities.ndim != 1 or probabilities.size == 0:
        raise ValueError(f"need a non-empty 1-D array of slice probabilities, got shape {probabilities.shape}")
    total = int(probabilities.size)
    positive_slices = int(np.count_nonzero(probabilities > slice_threshold))
    required = required_positive_slices(total, positive_fraction, min_positive_slices)
    top = np.sort(probabilities)[::-1][:TOP_K_SCORE]
    return Verdict(
        positive=positive_slices >= required,
        positive_slices=positive_slices,
        total_slices=total,
        required_slices=required,
        study_score=float(top[0]),
        top_k_score=float(top.mean()),
        slice_threshold=slice_threshold,
        positive_fraction=positive_fraction,
    )


def key_slice_indices(probabilities: np.ndarray, count: int) -> list[int]:
    """The `count` most suspicious slices, most probable first (ties: lower index)."""
    order = np.argsort(-np.asarray(probabilities), kind="stable")
    return [int(i) for i in order[:count]]
