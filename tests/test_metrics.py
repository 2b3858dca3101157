"""Metrics against hand-computed values, known interval values and scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn import metrics as skm

from training.metrics import (
    ConfusionMatrix,
    average_precision,
    bootstrap_interval,
    clopper_pearson_interval,
    patient_level_metrics,
    patient_rule,
    pr_auc_trapezoid,
    precision_recall_curve,
    roc_auc,
    roc_curve,
    slice_level_metrics,
    wilson_interval,
)
from training.report import format_interval, write_report
from training.rule import required_positive_slices


def test_confusion_matrix_by_hand() -> None:
    cm = ConfusionMatrix(tp=8, fp=2, tn=85, fn=5)
    assert cm.n == 100
    assert cm.accuracy().estimate == pytest.approx(0.93)
    assert cm.sensitivity().estimate == pytest.approx(8 / 13)
    assert cm.specificity().estimate == pytest.approx(85 / 87)
    assert cm.ppv().estimate == pytest.approx(0.8)
    assert cm.npv().estimate == pytest.approx(85 / 90)
    labels = np.array([1] * 13 + [0] * 87)
    predicted = np.array([1] * 8 + [0] * 5 + [1] * 2 + [0] * 85)
    assert ConfusionMatrix.from_predictions(labels, predicted) == cm


def test_known_interval_values() -> None:
    wilson = wilson_interval(8, 10)
    assert (wilson.low, wilson.high) == pytest.approx((0.4902, 0.9433), abs=1e-3)
    exact = clopper_pearson_interval(8, 10)
    assert (exact.low, exact.high) == pytest.approx((0.4439, 0.9748), abs=1e-3)
    for interval in (wilson_interval(0, 10), clopper_pearson_interval(0, 10)):
        assert interval.low == 0.0 and 0 < interval.high < 0.35
    for interval in (wilson_interval(10, 10), clopper_pearson_interval(10, 10)):
        assert interval.high == 1.0 and 0.65 < interval.low < 1
    empty = wilson_interval(0, 0)
    assert math.isnan(empty.estimate) and (empty.low, empty.high) == (0.0, 1.0)
    with pytest.raises(ValueError, match="successes ≤ total"):
        wilson_interval(11, 10)


def test_curves_and_areas_match_scikit_learn() -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 300)
    scores = np.round(rng.random(300) * 0.7 + labels * 0.3, 2)  # many ties
    assert roc_auc(labels, scores) == pytest.approx(skm.roc_auc_score(labels, scores))
    assert average_precision(labels, scores) == pytest.approx(skm.average_precision_score(labels, scores))
    precision, recall, _ = skm.precision_recall_curve(labels, scores)
    assert pr_auc_trapezoid(labels, scores) == pytest.approx(skm.auc(recall, precision))
    ours = precision_recall_curve(labels, scores)
    np.testing.assert_allclose(ours[0], precision)
    np.testing.assert_allclose(ours[1], recall)
    fpr, tpr, _ = roc_curve(labels, scores)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(labels, scores))


def test_auc_hand_cases() -> None:
    labels = np.array([0, 0, 1, 1])
    assert roc_auc(labels, np.array([0.1, 0.2, 0.8, 0.9])) == 1.0
    assert roc_auc(labels, np.array([0.9, 0.8, 0.2, 0.1])) == 0.0
    assert roc_auc(labels, np.full(4, 0.5)) == 0.5
    with pytest.raises(ValueError, match="both classes"):
        roc_auc(np.ones(4), np.arange(4))


def test_bootstrap_interval() -> None:
    rng = np.random.default_rng(0)
    def sample(n: int):
        labels = rng.integers(0, 2, n)
        return labels, rng.random(n) * 0.8 + labels * 0.4
    small, large = sample(80), sample(2000)
    a = bootstrap_interval(*small, roc_auc, resamples=300, seed=1)
    assert a.low <= a.estimate <= a.high
    assert bootstrap_interval(*small, roc_auc, resamples=300, seed=1) == a
    wide = a.high - a.low
    narrow = bootstrap_interval(*large, roc_auc, resamples=300, seed=1)
    assert narrow.high - narrow.low < wide


def test_grouped_bootstrap_resamples_whole_groups() -> None:
    labels = np.array([0, 1] * 10)
    scores = np.linspace(0, 1, 20)
    groups = np.repeat(np.arange(5), 4)  # five patients of four slices
    seen = []

    def distinct_fraction(y: np.ndarray, s: np.ndarray) -> float:
        seen.append(len(y))
        return 0.0

    bootstrap_interval(labels, scores, distinct_fraction, resamples=50, groups=groups)
    assert all(n % 4 == 0 for n in seen)  # only whole patients
    assert "patients" in bootstrap_interval(labels, scores, roc_auc, resamples=20, groups=groups).method


def test_patient_rule_by_hand() -> None:
    assert required_positive_slices(20, 0.05, 1) == 1
    assert required_positive_slices(30, 0.10, 1) == 3  # not 4: 0.1 × 30 = 3.0000000000000004
    assert required_positive_slices(100, 0.025, 1) == 3
    assert required_positive_slices(10, 0.025, 2) == 2
    studies = [np.array([0.81, 0.1, 0.1]), np.array([0.8, 0.79, 0.1]), np.array([0.9] * 3 + [0.1] * 27)]
    np.testing.assert_array_equal(patient_rule(studies, fraction=0.10), [True, False, True])
    np.testing.assert_array_equal(
        patient_rule([np.array([0.9] * 2 + [0.1] * 28)], fraction=0.10), [False])


def test_tables_and_report(tmp_path) -> None:
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 200)
    probabilities = np.clip(rng.random(200) * 0.6 + labels * 0.35, 0, 1)
    slice_metrics = slice_level_metrics(labels, probabilities, groups=np.repeat(np.arange(20), 10), resamples=100)
    assert set(slice_metrics["thresholds"]) == {"0.5", "0.7", "0.9"}
    cells = slice_metrics["thresholds"]["0.5"]
    assert cells["tp"] + cells["fp"] + cells["tn"] + cells["fn"] == 200
    studies = [probabilities[i * 10:(i + 1) * 10] for i in range(20)]
    study_labels = np.array([int(labels[i * 10:(i + 1) * 10].any()) for i in range(20)])
    patient_metrics = patient_level_metrics(study_labels, studies, resamples=100)
    assert set(patient_metrics["rules"]) == {"2.5%", "5%", "10%"}
    files = write_report(tmp_path, slice_metrics=slice_metrics, patient_metrics=patient_metrics,
                         data_description="DATA-X", model_description="MODEL-Y")
    report = files["report"].read_text()
    assert report.count("measured on: DATA-X") == 2
    assert "Table 1" in report and "Table 2" in report and "| p > 0.5 |" in report and "| 10 % |" in report
    assert format_interval({"estimate": 0.5, "low": 0.25, "high": 0.75, "method": ""}) == "0.500 (0.250–0.750)"
    assert format_interval(None) == "n/a"
