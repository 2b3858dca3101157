"""training.model.rule: the patient-level rule on hand-computed slice probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from training.model.rule import TriageRule, key_slice_indices

PAPER = TriageRule()


def probabilities(total: int, positive: int, *, high: float = 0.95, low: float = 0.1) -> np.ndarray:
    return np.array([high] * positive + [low] * (total - positive))


@pytest.mark.parametrize(
    ("total", "fraction", "minimum", "required"),
    [
        (20, 0.05, 1, 1),     # ceil(1.0) = 1
        (30, 0.1, 1, 3),      # ceil(3.0) = 3
        (100, 0.07, 1, 7),    # 0.07 × 100 = 7.000000000000001 in floating point: still 7
        (100, 0.025, 1, 3),   # ceil(2.5) = 3
        (10, 0.05, 1, 1),     # ceil(0.5) = 1
        (10, 0.05, 2, 2),     # the minimum wins
        (40, 0.05, 1, 2),     # ceil(2.0) = 2
        (41, 0.05, 1, 3),     # ceil(2.05) = 3
        (7, 1.0, 1, 7),       # every slice
    ],
)
def test_required_slices(total: int, fraction: float, minimum: int, required: int) -> None:
    verdict = TriageRule(0.8, fraction, minimum).apply(np.zeros(total))
    assert verdict.required_slices == required
    assert verdict.total_slices == total


def test_floating_point_trap_decides_the_verdict() -> None:
    """With exactly 3 of 30 positive slices and fraction 0.1 the study is positive."""
    rule = TriageRule(0.8, 0.1, 1)
    assert rule.apply(probabilities(30, 3)).positive
    assert not rule.apply(probabilities(30, 2)).positive


def test_slice_exactly_at_threshold_is_not_positive() -> None:
    verdict = PAPER.apply(np.full(20, 0.8))
    assert verdict.positive_slices == 0
    assert not verdict.positive
    just_above = PAPER.apply(np.array([np.nextafter(0.8, 1.0)] + [0.0] * 19))
    assert just_above.positive_slices == 1
    assert just_above.positive


def test_positive_verdict() -> None:
    verdict = PAPER.apply(probabilities(40, 2))  # needs ceil(2.0) = 2
    assert verdict.positive
    assert verdict.positive_slices == 2
    assert verdict.required_slices == 2
    assert verdict.label == "SUSPECTED - PRIORITY"
    assert verdict.rule == PAPER


def test_negative_verdict_below_required_count() -> None:
    verdict = PAPER.apply(probabilities(41, 2))  # needs ceil(2.05) = 3
    assert not verdict.positive
    assert verdict.positive_slices == 2
    assert verdict.required_slices == 3
    assert verdict.label == "not detected"


def test_scores_are_max_and_top3_mean() -> None:
    p = np.array([0.1, 0.9, 0.5, 0.7, 0.2, 0.3])
    verdict = PAPER.apply(p)
    assert verdict.study_score == pytest.approx(0.9)
    assert verdict.top_k_score == pytest.approx((0.9 + 0.7 + 0.5) / 3)
    assert isinstance(verdict.study_score, float)
    assert isinstance(verdict.top_k_score, float)


def test_top_k_score_with_fewer_than_three_slices() -> None:
    verdict = PAPER.apply(np.array([0.2, 0.6]))
    assert verdict.study_score == pytest.approx(0.6)
    assert verdict.top_k_score == pytest.approx(0.4)


def test_accepts_lists_and_float32() -> None:
    assert PAPER.apply([0.1, 0.95]).positive
    assert PAPER.apply(np.array([0.1, 0.95], dtype=np.float32)).positive_slices == 1


@pytest.mark.parametrize("bad", [np.array([]), np.zeros((4, 5)), np.float64(0.9)])
def test_empty_or_not_1d_raises(bad: np.ndarray) -> None:
    with pytest.raises(ValueError, match="1-D"):
        PAPER.apply(bad)


def test_key_slices_most_probable_first_ties_by_lower_index() -> None:
    p = np.array([0.5, 0.9, 0.2, 0.9, 0.5, 0.95])
    assert key_slice_indices(p, 3) == [5, 1, 3]
    assert key_slice_indices(p, 5) == [5, 1, 3, 0, 4]
    assert key_slice_indices(np.full(4, 0.3), 4) == [0, 1, 2, 3]


def test_key_slices_count_larger_than_series() -> None:
    result = key_slice_indices(np.array([0.1, 0.7]), 3)
    assert result == [1, 0]
    assert all(type(i) is int for i in result)


def test_a_higher_threshold_or_minimum_makes_the_study_negative() -> None:
    ten = np.array([0.9] + [0.1] * 9)  # ceil(0.025 × 10) = 1
    assert TriageRule(0.8, 0.025, 1).apply(ten).positive
    assert not TriageRule(0.8, 0.025, 2).apply(ten).positive
    assert not TriageRule(0.95, 0.025, 1).apply(ten).positive


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"positive_fraction": -0.1}, r"positive_fraction must be in \[0, 1\], got -0.1"),
        ({"slice_threshold": 1.2}, r"slice_threshold must be in \[0, 1\), got 1.2"),
        ({"min_positive_slices": 0}, r"min_positive_slices must be ≥ 1, got 0"),
    ],
)
def test_bad_parameters_name_the_field_first(values: dict, message: str) -> None:
    with pytest.raises(ValueError, match="^" + message):
        TriageRule(**values)
