"""Metrics of the paper's tables, each with a 95 % interval, as pure numpy/scipy.

Proportions (accuracy, sensitivity, …) get Wilson intervals (Clopper–Pearson on request);
areas under curves get percentile-bootstrap intervals, resampling whole patients when
groups are given, because slices of one patient are not independent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
from scipy import stats

from training.rule import required_positive_slices

__all__ = [
    "Interval",
    "wilson_interval",
    "clopper_pearson_interval",
    "ConfusionMatrix",
    "roc_auc",
    "roc_curve",
    "precision_recall_curve",
    "average_precision",
    "pr_auc_trapezoid",
    "bootstrap_interval",
    "patient_rule",
    "slice_level_metrics",
    "patient_level_metrics",
]


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    method: str

    def as_dict(self) -> dict:
        return {"estimate": self.estimate, "low": self.low, "high": self.high, "method": self.method}


def _check_counts(successes: int, total: int) -> None:
    if successes < 0 or total < 0 or successes > total:
        raise ValueError(f"need 0 ≤ successes ≤ total, got {successes} of {total}")


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval. With no trials the proportion is undefined: nan in [0, 1]."""
    _check_counts(successes, total)
    if total == 0:
        return Interval(math.nan, 0.0, 1.0, "Wilson")
    z = float(stats.norm.ppf(0.5 + confidence / 2))
    p = successes / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    # At 0/n and n/n the bounds are exactly 0 and 1; floating point misses by an ulp.
    low = 0.0 if successes == 0 else max(0.0, centre - half)
    high = 1.0 if successes == total else min(1.0, centre + half)
    return Interval(p, low, high, "Wilson")


def clopper_pearson_interval(successes: int, total: int, confidence: float = 0.95) -> Interval:
    """Exact (Clopper–Pearson) interval from beta quantiles."""
    _check_counts(successes, total)
    if total == 0:
        return Interval(math.nan, 0.0, 1.0, "Clopper-Pearson")
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, total - successes + 1))
    high = 1.0 if successes == total else float(stats.beta.ppf(1 - alpha / 2, successes + 1, total - successes))
    return Interval(successes / total, low, high, "Clopper-Pearson")


@dataclass(frozen=True)
class ConfusionMatrix:
    tp: int
    fp: int
    tn: int
    fn: int

    @classmethod
    def from_predictions(cls, labels: np.ndarray, predicted: np.ndarray) -> "ConfusionMatrix":
        labels, predicted = np.asarray(labels).astype(bool), np.asarray(predicted).astype(bool)
        if labels.shape != predicted.shape:
            raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
        return cls(int(np.sum(labels & predicted)), int(np.sum(~labels & predicted)),
                   int(np.sum(~labels & ~predicted)), int(np.sum(labels & ~predicted)))

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    def _interval(self, successes: int, total: int, method: str) -> Interval:
        if method == "wilson":
            return wilson_interval(successes, total)
        if method == "clopper-pearson":
            return clopper_pearson_interval(successes, total)
        raise ValueError(f"method must be 'wilson' or 'clopper-pearson', got {method!r}")

    def accuracy(self, method: str = "wilson") -> Interval:
        return self._interval(self.tp + self.tn, self.n, method)

    def sensitivity(self, method: str = "wilson") -> Interval:
        return self._interval(self.tp, self.tp + self.fn, method)

    def specificity(self, method: str = "wilson") -> Interval:
        return self._interval(self.tn, self.tn + self.fp, method)

    def ppv(self, method: str = "wilson") -> Interval:
        return self._interval(self.tp, self.tp + self.fp, method)

    def npv(self, method: str = "wilson") -> Interval:
        return self._interval(self.tn, self.tn + self.fn, method)

    def summary(self) -> dict:
        return {
            "accuracy": self.accuracy().as_dict(), "sensitivity": self.sensitivity().as_dict(),
            "specificity": self.specificity().as_dict(), "ppv": self.ppv().as_dict(),
            "npv": self.npv().as_dict(), "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
        }


def _binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels, scores = np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64)
    if labels.shape != scores.shape or labels.ndim != 1:
        raise ValueError(f"labels {labels.shape} and scores {scores.shape} must be equal 1-D shapes")
    if len(set(labels.tolist())) != 2:
        raise ValueError("both classes must be present to compute a curve or an AUC")
    return labels, scores


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC-AUC: the Mann–Whitney statistic, ties counted as one half."""
    labels, scores = _binary(labels, scores)
    ranks = stats.rankdata(scores)  # average ranks for ties
    positives = labels == 1
    n_pos, n_neg = int(positives.sum()), int((~positives).sum())
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray):
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    distinct = np.r_[np.where(np.diff(scores))[0], len(scores) - 1]
    tps = np.cumsum(labels)[distinct]
    fps = (distinct + 1) - tps
    return tps, fps, scores[distinct]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from (0, 0) to (1, 1)."""
    labels, scores = _binary(labels, scores)
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds), thresholds increasing, ending at (1, 0) as scikit-learn."""
    labels, scores = _binary(labels, scores)
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ (R_n − R_{n−1}) P_n: the step-wise area scikit-learn calls average precision."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def pr_auc_trapezoid(labels: np.ndarray, scores: np.ndarray) -> float:
    """Trapezoidal area under the PR curve: what the paper's code reported as PR-AUC."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(-np.trapezoid(precision, recall))


def bootstrap_interval(
    labels: np.ndarray,
    scores: np.ndarray,
    statistic: Callable[[np.ndarray, np.ndarray], float],
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Interval:
    """Percentile bootstrap of `statistic`; with `groups`, whole groups are resampled.
    Resamples with one class only are skipped and counted in the method text."""
    labels, scores = _binary(labels, scores)
    estimate = float(statistic(labels, scores))
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(labels))]
    else:
        groups = np.asarray(groups)
        members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    values, skipped = [], 0
    for _ in range(resamples):
        chosen = rng.integers(0, len(members), len(members))
        index = np.concatenate([members[i] for i in chosen])
        if len(set(labels[index].tolist())) < 2:
            skipped += 1
            continue
        values.append(statistic(labels[index], scores[index]))
    unit = "patients" if groups is not None else "items"
    method = f"bootstrap percentile, {resamples} resamples of {unit}" + (
        f" ({skipped} with one class skipped)" if skipped else "")
    if not values:
        return Interval(estimate, math.nan, math.nan, method)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), method)


def patient_rule(
    probabilities_per_study: list[np.ndarray],
    *,
    slice_threshold: float = 0.8,
    fraction: float,
    min_positive_slices: int = 1,
) -> np.ndarray:
    """The paper's rule per study: positive when count(p > threshold) ≥
    max(min_positive_slices, ceil(fraction × N))."""
    verdicts = []
    for probabilities in probabilities_per_study:
        probabilities = np.asarray(probabilities)
        required = required_positive_slices(len(probabilities), fraction, min_positive_slices)
        verdicts.append(int(np.sum(probabilities > slice_threshold)) >= required)
    return np.array(verdicts, dtype=bool)


def _auc_entry(labels, scores, statistic, *, groups, resamples, seed) -> dict | None:
    if len(set(np.asarray(labels).tolist())) < 2:
        return None  # undefined with one class
    return bootstrap_interval(labels, scores, statistic, resamples=resamples, seed=seed, groups=groups).as_dict()


def slice_level_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    *,
    thresholds: tuple[float, ...] = (0.5, 0.7, 0.9),
    groups: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """The paper's Table 1 with intervals, as JSON-ready data."""
    labels, probabilities = np.asarray(labels).astype(int), np.asarray(probabilities, dtype=np.float64)
    auc_args = {"groups": groups, "resamples": resamples, "seed": seed}
    return {
        "n": int(len(labels)), "positives": int(labels.sum()), "negatives": int((1 - labels).sum()),
        "thresholds": {f"{t:g}": ConfusionMatrix.from_predictions(labels, probabilities > t).summary()
                       for t in thresholds},
        "roc_auc": _auc_entry(labels, probabilities, roc_auc, **auc_args),
        "average_precision": _auc_entry(labels, probabilities, average_precision, **auc_args),
        "pr_auc_trapezoid": _auc_entry(labels, probabilities, pr_auc_trapezoid, **auc_args),
    }


def patient_level_metrics(
    study_labels: np.ndarray,
    probabilities_per_study: list[np.ndarray],
    *,
    fractions: tuple[float, ...] = (0.025, 0.05, 0.10),
    slice_threshold: float = 0.8,
    min_positive_slices: int = 1,
    resamples: int = 2000,
    seed: int = 0,
) -> dict:
    """The paper's Table 2 (the n % rules) with intervals, and the study-score ROC-AUC."""
    labels = np.asarray(study_labels).astype(int)
    if len(labels) != len(probabilities_per_study):
        raise ValueError(f"{len(labels)} study labels but {len(probabilities_per_study)} studies")
    rules = {}
    for fraction in fractions:
        predicted = patient_rule(probabilities_per_study, slice_threshold=slice_threshold, fraction=fraction,
                                 min_positive_slices=min_positive_slices)
        rules[f"{fraction * 100:g}%"] = ConfusionMatrix.from_predictions(labels, predicted).summary()
    maximum = np.array([np.max(p) for p in probabilities_per_study])
    top3 = np.array([np.mean(np.sort(p)[::-1][:3]) for p in probabilities_per_study])
    auc_args = {"groups": None, "resamples": resamples, "seed": seed}
    return {
        "n": int(len(labels)), "positives": int(labels.sum()), "negatives": int((1 - labels).sum()),
        "slice_threshold": slice_threshold, "rules": rules,
        "study_score_roc_auc": _auc_entry(labels, maximum, roc_auc, **auc_args),
        "top3_mean_roc_auc": _auc_entry(labels, top3, roc_auc, **auc_args),
    }
