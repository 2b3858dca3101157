"""Metrics against hand-computed values, published interval values, scipy and scikit-learn."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from training.metrics import (
    ConfusionMatrix,
    Interval,
    average_precision,
    bootstrap_interval,
    clopper_pearson_interval,
    patient_level_metrics,
    pr_auc_trapezoid,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    slice_level_metrics,
    wilson_interval,
)
from training.model.rule import TriageRule

PAPER_RULE = TriageRule()


def _tied_scores(seed: int, n: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """Informative but imperfect scores, rounded to two decimals so many are tied."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return labels, np.round(rng.random(n) * 0.7 + labels * 0.3, 2)


# --- intervals -------------------------------------------------------------------------------


def test_known_interval_values() -> None:
    wilson = wilson_interval(8, 10)
    assert wilson.estimate == 0.8 and wilson.method == "Wilson"
    assert (wilson.low, wilson.high) == pytest.approx((0.4902, 0.9433), abs=1e-3)
    exact = clopper_pearson_interval(8, 10)
    assert exact.estimate == 0.8 and exact.method == "Clopper-Pearson"
    assert (exact.low, exact.high) == pytest.approx((0.4439, 0.9748), abs=1e-3)


def test_clopper_pearson_is_the_exact_binomial_interval() -> None:
    # R's binom.test(7, 20) prints the 95 % interval 0.1539092 0.5921885.
    interval = clopper_pearson_interval(7, 20)
    assert (interval.low, interval.high) == pytest.approx((0.1539092, 0.5921885), abs=5e-8)
    # By definition each bound leaves 2.5 % in its binomial tail (computed from the
    # binomial distribution itself, not the beta quantiles the code uses).
    for successes, total in ((7, 20), (3, 41), (120, 128)):
        bounds = clopper_pearson_interval(successes, total)
        assert stats.binom.sf(successes - 1, total, bounds.low) == pytest.approx(0.025, abs=1e-9)
        assert stats.binom.cdf(successes, total, bounds.high) == pytest.approx(0.025, abs=1e-9)
    # 0 of n: the upper bound has the closed form 1 − 0.025^(1/n).
    assert clopper_pearson_interval(0, 10).high == pytest.approx(1 - 0.025 ** (1 / 10), abs=1e-12)


def test_calibration_measures() -> None:
    from training.metrics import brier_score, calibration_metrics, expected_calibration_error, reliability_bins

    labels = np.array([0, 0, 1, 1, 1, 0, 1, 0])
    p = np.array([0.05, 0.15, 0.95, 0.85, 0.55, 0.45, 0.999, 1.0])
    assert brier_score(labels, p) == pytest.approx(np.mean((p - labels) ** 2))
    bins = reliability_bins(labels, p, bins=10)
    assert [b["n"] for b in bins] == [1, 1, 0, 0, 1, 1, 0, 0, 1, 3]  # 1.0 falls in the last bin
    assert bins[9]["fraction_positive"] == pytest.approx(2 / 3)
    expected = sum(b["n"] / 8 * abs(b["fraction_positive"] - b["mean_probability"]) for b in bins if b["n"])
    assert expected_calibration_error(labels, p) == pytest.approx(expected)
    perfect = calibration_metrics(np.array([0, 1] * 50), np.array([0.0, 1.0] * 50), resamples=50)
    assert perfect["brier"]["estimate"] == 0 and perfect["ece"]["estimate"] == 0


def test_subtype_sensitivity_counts_each_subtype() -> None:
    from training.metrics import subtype_sensitivity

    subtypes = [("subdural",), ("subdural", "epidural"), (), ("epidural",)]
    table = subtype_sensitivity(subtypes, np.array([1, 1, 0, 1]), np.array([0.9, 0.6, 0.2, 0.4]),
                                thresholds=(0.5,), interval="clopper-pearson")
    assert table["subdural"]["slices"] == 2 and table["subdural"]["thresholds"]["0.5"]["estimate"] == 1.0
    assert table["epidural"]["thresholds"]["0.5"]["estimate"] == 0.5
    assert table["epidural"]["thresholds"]["0.5"]["method"] == "Clopper-Pearson"


@pytest.mark.parametrize("successes,total", [(0, 1), (1, 3), (8, 10), (13, 13), (37, 250), (999, 1000)])
def test_intervals_match_scipy(successes: int, total: int) -> None:
    result = stats.binomtest(successes, total)
    wilson = result.proportion_ci(confidence_level=0.9, method="wilson")
    assert (wilson_interval(successes, total, 0.9).low, wilson_interval(successes, total, 0.9).high) == \
        pytest.approx((wilson.low, wilson.high), abs=1e-9)
    exact = result.proportion_ci(confidence_level=0.95, method="exact")
    interval = clopper_pearson_interval(successes, total)
    assert (interval.low, interval.high) == pytest.approx((exact.low, exact.high), abs=1e-9)


@pytest.mark.parametrize("interval_of", [wilson_interval, clopper_pearson_interval])
def test_interval_edges(interval_of) -> None:
    none = interval_of(0, 10)
    assert none.estimate == 0.0 and none.low == 0.0 and 0.0 < none.high < 0.35
    every = interval_of(10, 10)
    assert every.estimate == 1.0 and every.high == 1.0 and 0.65 < every.low < 1.0
    for successes in range(11):
        interval = interval_of(successes, 10)
        assert 0.0 <= interval.low <= interval.estimate <= interval.high <= 1.0
    empty = interval_of(0, 0)
    assert math.isnan(empty.estimate) and (empty.low, empty.high) == (0.0, 1.0)
    narrow, wide = interval_of(8, 10, 0.9), interval_of(8, 10, 0.99)
    assert wide.low < narrow.low and narrow.high < wide.high


@pytest.mark.parametrize("interval_of", [wilson_interval, clopper_pearson_interval])
def test_interval_rejects_bad_counts(interval_of) -> None:
    with pytest.raises(ValueError, match="got 11 successes of 10"):
        interval_of(11, 10)
    with pytest.raises(ValueError, match="non-negative, got -1 successes of 10"):
        interval_of(-1, 10)
    with pytest.raises(ValueError, match="non-negative, got 0 successes of -2"):
        interval_of(0, -2)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 95"):
        interval_of(8, 10, 95)


def test_interval_as_dict_has_no_nan() -> None:
    assert Interval(math.nan, 0.0, 1.0, "Wilson").as_dict() == \
        {"estimate": None, "low": 0.0, "high": 1.0, "method": "Wilson"}
    json.dumps(wilson_interval(0, 0).as_dict(), allow_nan=False)


# --- confusion matrix ------------------------------------------------------------------------


def test_confusion_matrix_by_hand() -> None:
    cm = ConfusionMatrix(tp=8, fp=2, tn=85, fn=5)
    assert (cm.n, cm.positives, cm.negatives) == (100, 13, 87)
    assert cm.accuracy().estimate == pytest.approx(0.93)
    assert cm.sensitivity().estimate == pytest.approx(8 / 13)
    assert cm.specificity().estimate == pytest.approx(85 / 87)
    assert cm.ppv().estimate == pytest.approx(0.8)
    assert cm.npv().estimate == pytest.approx(85 / 90)
    assert cm.sensitivity() == wilson_interval(8, 13)
    assert cm.ppv() == wilson_interval(8, 10)
    assert cm.ppv(method="clopper-pearson") == clopper_pearson_interval(8, 10)
    assert cm.accuracy(method="clopper-pearson") == clopper_pearson_interval(93, 100)
    labels = np.array([1] * 13 + [0] * 87)
    predicted = np.array([1] * 8 + [0] * 5 + [1] * 2 + [0] * 85)
    assert ConfusionMatrix.from_predictions(labels, predicted) == cm
    assert ConfusionMatrix.from_predictions(labels.astype(bool), predicted.astype(bool)) == cm


def test_confusion_matrix_undefined_rates_and_bad_input() -> None:
    nothing_called_positive = ConfusionMatrix(tp=0, fp=0, tn=5, fn=3)
    assert math.isnan(nothing_called_positive.ppv().estimate)
    assert nothing_called_positive.as_dict()["ppv"]["estimate"] is None
    assert nothing_called_positive.as_dict()["npv"]["estimate"] == pytest.approx(5 / 8)
    with pytest.raises(ValueError, match="fn must be non-negative, got -1"):
        ConfusionMatrix(tp=1, fp=0, tn=0, fn=-1)
    with pytest.raises(ValueError, match="method must be 'wilson' or 'clopper-pearson', got 'wald'"):
        nothing_called_positive.accuracy(method="wald")
    with pytest.raises(ValueError, match="differ in shape"):
        ConfusionMatrix.from_predictions(np.array([0, 1]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match=r"predictions must be 0/1 or bool, got values \[0.7\]"):
        ConfusionMatrix.from_predictions(np.array([0, 1]), np.array([0.7, 1]))
    with pytest.raises(ValueError, match=r"labels must be 0/1 or bool, got values \[2\]"):
        ConfusionMatrix.from_predictions(np.array([0, 2]), np.array([0, 1]))


# --- curves and areas ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 3, 7])
def test_curves_and_areas_match_scikit_learn(seed: int) -> None:
    labels, scores = _tied_scores(seed)
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores), abs=1e-12)
    assert average_precision(labels, scores) == pytest.approx(skm.average_precision_score(labels, scores), abs=1e-12)
    precision, recall, thresholds = skm.precision_recall_curve(labels, scores)
    assert pr_auc_trapezoid(labels, scores) == pytest.approx(skm.auc(recall, precision), abs=1e-12)
    ours = precision_recall_curve(labels, scores)
    for mine, theirs in zip(ours, (precision, recall, thresholds), strict=True):
        np.testing.assert_allclose(mine, theirs)
    fpr, tpr, roc_thresholds = roc_curve(labels, scores)
    sk_fpr, sk_tpr, sk_thresholds = skm.roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(roc_thresholds[1:], sk_thresholds[1:])
    assert roc_thresholds[0] == np.inf


def test_roc_curve_shape() -> None:
    labels, scores = _tied_scores(1)
    fpr, tpr, thresholds = roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0.0, 0.0, 1.0, 1.0)
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0) and np.all(np.diff(thresholds) < 0)
    assert len(thresholds) == len(np.unique(scores)) + 1
    area = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    assert area == pytest.approx(roc_auc(labels, scores))


def test_auc_hand_cases() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, np.full(4, 0.5)) == 0.5
    # positives 0.5 and 0.9 against negatives 0.1 and 0.5: 1 + ½ + 1 + 1 of 4 pairs
    assert roc_auc(labels, np.array([0.1, 0.5, 0.5, 0.9])) == 0.875
    # ranked 1 (P = 1/1), 0, 1 (P = 2/3): AP = ½·1 + ½·⅔
    assert average_precision(np.array([1, 0, 1]), np.array([0.9, 0.8, 0.7])) == pytest.approx(5 / 6)
    assert average_precision(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert pr_auc_trapezoid(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0


def test_curves_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="both classes must be present, got 4 positives of 4 labels"):
        roc_auc(np.ones(4), np.arange(4))
    with pytest.raises(ValueError, match="got 0 positives"):
        average_precision(np.zeros(3), np.arange(3))
    with pytest.raises(ValueError, match=r"labels must be 0/1 or bool, got values \[2\]"):
        roc_curve(np.array([0, 2, 1]), np.arange(3))
    with pytest.raises(ValueError, match="scores must be finite, got 1 non-finite"):
        precision_recall_curve(np.array([0, 1, 1]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(ValueError, match=r"scores of shape \(2,\) do not match 3 labels"):
        pr_auc_trapezoid(np.array([0, 1, 1]), np.array([0.1, 0.3]))


# --- bootstrap -------------------------------------------------------------------------------


def _informative(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    return labels, rng.random(n) * 0.8 + labels * 0.4


def test_bootstrap_interval_contains_estimate_and_is_reproducible() -> None:
    small = _informative(80, 0)
    interval = bootstrap_interval(*small, roc_auc, resamples=300, seed=1)
    assert interval.estimate == roc_auc(*small)
    assert interval.low < interval.estimate < interval.high
    assert interval.method == "bootstrap percentile, 300 resamples"
    assert bootstrap_interval(*small, roc_auc, resamples=300, seed=1) == interval
    assert bootstrap_interval(*small, roc_auc, resamples=300, seed=2) != interval
    wider = bootstrap_interval(*small, roc_auc, resamples=300, seed=1, confidence=0.99)
    assert wider.low < interval.low and interval.high < wider.high


def test_bootstrap_interval_narrows_with_more_data() -> None:
    small = bootstrap_interval(*_informative(80, 0), roc_auc, resamples=300, seed=1)
    large = bootstrap_interval(*_informative(2000, 0), roc_auc, resamples=300, seed=1)
    assert (large.high - large.low) < (small.high - small.low) / 2


def test_bootstrap_skips_and_counts_one_class_resamples() -> None:
    labels = np.array([1, 0, 0, 0, 0, 0])  # a resample misses the one positive a third of the time
    scores = np.linspace(1, 0, 6)
    calls: list[np.ndarray] = []

    def statistic(y: np.ndarray, s: np.ndarray) -> float:
        calls.append(y)
        return roc_auc(y, s)

    interval = bootstrap_interval(labels, scores, statistic, resamples=200, seed=0)
    skipped = int(re.fullmatch(r"bootstrap percentile, 200 resamples \((\d+) with one class skipped\)",
                               interval.method).group(1))
    assert 30 < skipped < 110
    assert len(calls) == 1 + 200 - skipped  # the estimate, then each kept resample
    assert all(0 < y.sum() < len(y) for y in calls)


def test_bootstrap_rejects_bad_arguments() -> None:
    labels, scores = _informative(20, 0)
    with pytest.raises(ValueError, match=r"groups of shape \(19,\) do not match 20 labels"):
        bootstrap_interval(labels, scores, roc_auc, groups=np.arange(19))
    with pytest.raises(ValueError, match="resamples must be ≥ 1, got 0"):
        bootstrap_interval(labels, scores, roc_auc, resamples=0)
    with pytest.raises(ValueError, match=r"confidence must be in \(0, 1\), got 1.5"):
        bootstrap_interval(labels, scores, roc_auc, confidence=1.5)
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_interval(np.zeros(20), scores, roc_auc)


def _patients(count: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Patients of 2–7 slices; the score is the slice's own index, so a statistic can
    tell which slices it was given. Labels alternate by patient, constant within one."""
    sizes = np.random.default_rng(seed).integers(2, 8, count)
    groups = np.repeat([f"patient-{i:03d}" for i in range(count)], sizes)
    labels = np.repeat(np.arange(count) % 2, sizes)
    return labels, np.arange(len(labels), dtype=np.float64), groups


def test_grouped_bootstrap_resamples_whole_patients() -> None:
    labels, index, groups = _patients(30, 0)
    size_of = dict(zip(*np.unique(groups, return_counts=True), strict=True))

    def whole_patients(y: np.ndarray, s: np.ndarray) -> float:
        items, copies = np.unique(s.astype(int), return_counts=True)
        for patient in np.unique(groups[items]):
            members = groups[items] == patient
            assert members.sum() == size_of[patient]  # every slice of the patient came along …
            assert len(set(copies[members].tolist())) == 1  # … as often as the others
        return 0.0

    interval = bootstrap_interval(labels, index, whole_patients, resamples=100, seed=3, groups=groups)
    assert interval.method == "bootstrap percentile, 100 resamples of whole patients"


def test_grouped_bootstrap_differs_from_slice_bootstrap() -> None:
    labels, index, groups = _patients(40, 1)

    def distinct_patients(y: np.ndarray, s: np.ndarray) -> float:
        return float(len(np.unique(groups[s.astype(int)])))

    by_patient = bootstrap_interval(labels, index, distinct_patients, resamples=200, groups=groups)
    by_slice = bootstrap_interval(labels, index, distinct_patients, resamples=200)
    # Drawing 40 of 40 patients leaves out about a third; drawing ~180 slices misses few patients.
    assert by_patient.estimate == by_slice.estimate == 40
    assert 20 < by_patient.low <= by_patient.high < 32
    assert by_slice.low >= 36


def test_grouped_bootstrap_is_wider_for_correlated_slices() -> None:
    rng = np.random.default_rng(5)
    labels, _, groups = _patients(40, 2)
    patient_effect = dict(zip(np.unique(groups), rng.normal(0, 1, 40), strict=True))
    scores = labels * 0.8 + np.array([patient_effect[g] for g in groups]) + rng.normal(0, 0.1, len(labels))
    by_patient = bootstrap_interval(labels, scores, roc_auc, resamples=400, groups=groups)
    by_slice = bootstrap_interval(labels, scores, roc_auc, resamples=400)
    assert (by_patient.high - by_patient.low) > 1.5 * (by_slice.high - by_slice.low)


# --- tables ----------------------------------------------------------------------------------


def test_slice_level_metrics() -> None:
    labels, scores = _tied_scores(2, n=200)
    groups = np.repeat(np.arange(20), 10)
    metrics = slice_level_metrics(labels, scores, groups=groups, resamples=100)
    assert (metrics["n"], metrics["positives"], metrics["negatives"], metrics["patients"]) == \
        (200, int(labels.sum()), 200 - int(labels.sum()), 20)
    assert list(metrics["thresholds"]) == ["0.5", "0.7", "0.9"]
    for key, threshold in (("0.5", 0.5), ("0.7", 0.7), ("0.9", 0.9)):
        expected = ConfusionMatrix.from_predictions(labels, scores > threshold)
        assert metrics["thresholds"][key] == expected.as_dict()
    assert metrics["roc_auc"]["estimate"] == pytest.approx(skm.roc_auc_score(labels, scores))
    assert metrics["average_precision"]["estimate"] == pytest.approx(skm.average_precision_score(labels, scores))
    assert metrics["pr_auc_trapezoid"]["estimate"] == pytest.approx(pr_auc_trapezoid(labels, scores))
    assert metrics["roc_auc"]["method"] == "bootstrap percentile, 100 resamples of whole patients"
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


def test_slice_level_metrics_with_one_class_and_nothing_called_positive() -> None:
    metrics = slice_level_metrics(np.zeros(10, dtype=int), np.linspace(0, 0.6, 10), resamples=10)
    assert metrics["roc_auc"] is None and metrics["average_precision"] is None
    assert metrics["patients"] is None
    at_09 = metrics["thresholds"]["0.9"]
    assert (at_09["tp"], at_09["fp"], at_09["tn"], at_09["fn"]) == (0, 0, 10, 0)
    assert at_09["ppv"]["estimate"] is None and at_09["sensitivity"]["estimate"] is None
    json.dumps(metrics, allow_nan=False)
    with pytest.raises(ValueError, match=r"groups of shape \(3,\) do not match 10 labels"):
        slice_level_metrics(np.zeros(10), np.zeros(10), groups=np.arange(3))


def test_patient_level_metrics_by_hand() -> None:
    studies = [
        np.array([0.9, 0.85] + [0.1] * 38),  # ICH: 2 of 40 above 0.8 → positive at 2.5 % and 5 %, not 10 %
        np.array([0.7] + [0.2] * 19),  # ICH, missed by every rule
        np.array([0.85] + [0.1] * 19),  # no ICH: 1 of 20 → positive at 2.5 % and 5 %, not 10 %
        np.full(10, 0.1),  # no ICH
    ]
    metrics = patient_level_metrics(np.array([1, 1, 0, 0]), studies, rule=PAPER_RULE, resamples=100)
    assert (metrics["n"], metrics["positives"], metrics["negatives"]) == (4, 2, 2)
    assert list(metrics["rules"]) == ["2.5%", "5%", "10%"]
    counts = {name: tuple(rule[k] for k in ("tp", "fp", "tn", "fn")) for name, rule in metrics["rules"].items()}
    assert counts == {"2.5%": (1, 1, 1, 1), "5%": (1, 1, 1, 1), "10%": (0, 0, 2, 2)}
    assert metrics["rules"]["10%"]["specificity"]["estimate"] == 1.0
    # max scores 0.9, 0.7 (ICH) against 0.85, 0.1: three of four pairs ordered right
    assert metrics["study_score_roc_auc"]["estimate"] == 0.75
    top3 = [np.mean(np.sort(s)[-3:]) for s in studies]
    assert metrics["top3_mean_roc_auc"]["estimate"] == roc_auc(np.array([1, 1, 0, 0]), np.array(top3))
    assert (metrics["slice_threshold"], metrics["min_positive_slices"], metrics["positive_fraction"]) == (0.8, 1, 0.05)
    assert json.loads(json.dumps(metrics, allow_nan=False)) == metrics


def test_patient_level_metrics_options_and_errors() -> None:
    studies = [np.array([0.95, 0.9, 0.1, 0.1]), np.array([0.95, 0.1, 0.1, 0.1])]
    metrics = patient_level_metrics(np.array([1, 0]), studies, rule=TriageRule(min_positive_slices=2),
                                    fractions=(0.5,), resamples=20)
    # The rule's own fraction is always a row, and the paper's rule sits beside another rule.
    assert list(metrics["rules"]) == ["5%", "50%", "the paper's rule (P > 0.8 on ≥ 5 %)"]
    assert metrics["rules"]["the paper's rule (P > 0.8 on ≥ 5 %)"]["tp"] == 1
    assert metrics["rules"]["50%"]["tp"] == 1 and metrics["rules"]["50%"]["tn"] == 1
    assert patient_level_metrics(np.array([1, 1]), studies, rule=PAPER_RULE, resamples=20)["study_score_roc_auc"] is None
    with pytest.raises(ValueError, match="3 study labels but 2 studies"):
        patient_level_metrics(np.array([1, 0, 1]), studies, rule=PAPER_RULE)
    with pytest.raises(ValueError, match=r"study 1: need a non-empty 1-D array .* got shape \(0,\)"):
        patient_level_metrics(np.array([1, 0]), [np.array([0.9]), np.array([])], rule=PAPER_RULE)
