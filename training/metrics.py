"""Metrics of the paper's tables, each with a 95 % interval, as pure numpy/scipy.

Proportions (accuracy, sensitivity, …) get Wilson intervals or, on request, exact
Clopper–Pearson ones (those match the paper's published Table 2 intervals); areas under
curves and calibration errors get percentile-bootstrap intervals, resampling whole
patients when groups are given, because slices of one patient are not independent.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import stats

from training.model.rule import TriageRule

__all__ = [
    "INTERVAL_METHODS",
    "PAPER_RULE_ROW",
    "ConfusionMatrix",
    "brier_score",
    "calibration_metrics",
    "expected_calibration_error",
    "reliability_bins",
    "subtype_sensitivity",
    "Interval",
    "average_precision",
    "bootstrap_interval",
    "clopper_pearson_interval",
    "patient_level_metrics",
    "pr_auc_trapezoid",
    "precision_recall_curve",
    "roc_auc",
    "roc_curve",
    "slice_level_metrics",
    "wilson_interval",
]

Statistic = Callable[[np.ndarray, np.ndarray], float]
PAPER_RULE_ROW = "the paper's rule (P > 0.8 on ≥ 5 %)"
INTERVAL_METHODS = ("wilson", "clopper-pearson")


@dataclass(frozen=True)
class Interval:
    """An estimate with its interval and how it was made, so no number travels alone."""

    estimate: float
    low: float
    high: float
    method: str

    def as_dict(self) -> dict[str, float | str | None]:
        """JSON-ready; an undefined (NaN) value becomes None because JSON has no NaN."""
        def clean(value: float) -> float | None:
            return None if math.isnan(value) else float(value)

        return {"estimate": clean(self.estimate), "low": clean(self.low), "high": clean(self.high),
                "method": self.method}


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


def _check_counts(successes: int, total: int, confidence: float) -> None:
    if successes < 0 or total < 0:
        raise ValueError(f"counts must be non-negative, got {successes} successes of {total}")
    if successes > total:
        raise ValueError(f"need successes ≤ total, got {successes} successes of {total}")
    _check_confidence(confidence)


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval: stays inside [0, 1] and keeps its coverage near 0/n and n/n.

    With no trials the proportion is undefined (estimate NaN) and nothing is known about
    it, so the honest interval is all of [0, 1].
    """
    _check_counts(successes, total, confidence)
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
    """Exact (Clopper–Pearson) interval from beta quantiles: conservative, never under-covers.

    With no trials: estimate NaN and the whole of [0, 1], as for Wilson.
    """
    _check_counts(successes, total, confidence)
    if total == 0:
        return Interval(math.nan, 0.0, 1.0, "Clopper-Pearson")
    alpha = 1 - confidence
    low = 0.0 if successes == 0 else float(stats.beta.ppf(alpha / 2, successes, total - successes + 1))
    high = 1.0 if successes == total else float(stats.beta.ppf(1 - alpha / 2, successes + 1, total - successes))
    return Interval(successes / total, low, high, "Clopper-Pearson")


def _as_labels(labels: np.ndarray, name: str = "labels") -> np.ndarray:
    """1-D boolean labels; anything but 0/1 (or bool) is refused rather than guessed at."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {labels.shape}")
    unexpected = sorted(set(np.unique(labels).tolist()) - {0, 1})
    if unexpected:
        raise ValueError(f"{name} must be 0/1 or bool, got values {unexpected[:5]}")
    return labels.astype(bool)


def _as_scores(scores: np.ndarray, count: int) -> np.ndarray:
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (count,):
        raise ValueError(f"scores of shape {scores.shape} do not match {count} labels")
    if not np.all(np.isfinite(scores)):
        raise ValueError(f"scores must be finite, got {int(np.sum(~np.isfinite(scores)))} non-finite values")
    return scores


def _binary(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validated labels and scores with both classes present, as every curve needs."""
    labels = _as_labels(labels)
    scores = _as_scores(scores, len(labels))
    positives = int(labels.sum())
    if positives in (0, len(labels)):
        raise ValueError(f"both classes must be present, got {positives} positives of {len(labels)} labels")
    return labels, scores


@dataclass(frozen=True)
class ConfusionMatrix:
    """Counts at one operating point; each rate comes with its interval."""

    tp: int
    fp: int
    tn: int
    fn: int

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "tn", "fn"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")

    @classmethod
    def from_predictions(cls, labels: np.ndarray, predicted: np.ndarray) -> ConfusionMatrix:
        labels, predicted = _as_labels(labels), np.asarray(predicted)
        if predicted.shape != labels.shape:
            raise ValueError(f"labels {labels.shape} and predictions {predicted.shape} differ in shape")
        predicted = _as_labels(predicted, "predictions")
        return cls(tp=int(np.sum(labels & predicted)), fp=int(np.sum(~labels & predicted)),
                   tn=int(np.sum(~labels & ~predicted)), fn=int(np.sum(labels & ~predicted)))

    @property
    def n(self) -> int:
        return self.tp + self.fp + self.tn + self.fn

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.tn + self.fp

    @staticmethod
    def _interval(successes: int, total: int, method: str) -> Interval:
        if method == "wilson":
            return wilson_interval(successes, total)
        if method == "clopper-pearson":
            return clopper_pearson_interval(successes, total)
        raise ValueError(f"method must be 'wilson' or 'clopper-pearson', got {method!r}")

    def accuracy(self, method: str = "wilson") -> Interval:
        return self._interval(self.tp + self.tn, self.n, method)

    def sensitivity(self, method: str = "wilson") -> Interval:
        """True-positive rate (TPR, recall)."""
        return self._interval(self.tp, self.positives, method)

    def specificity(self, method: str = "wilson") -> Interval:
        """True-negative rate (TNR)."""
        return self._interval(self.tn, self.negatives, method)

    def ppv(self, method: str = "wilson") -> Interval:
        """Positive predictive value (precision); undefined when nothing is called positive."""
        return self._interval(self.tp, self.tp + self.fp, method)

    def npv(self, method: str = "wilson") -> Interval:
        """Negative predictive value; undefined when nothing is called negative."""
        return self._interval(self.tn, self.tn + self.fn, method)

    def as_dict(self, method: str = "wilson") -> dict[str, dict[str, float | str | None] | int]:
        """The five rates with intervals by `method` and the four counts, JSON-ready."""
        return {
            "accuracy": self.accuracy(method).as_dict(), "sensitivity": self.sensitivity(method).as_dict(),
            "specificity": self.specificity(method).as_dict(), "ppv": self.ppv(method).as_dict(),
            "npv": self.npv(method).as_dict(), "tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn,
        }


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Exact ROC-AUC: the Mann–Whitney statistic, ties counted as one half."""
    labels, scores = _binary(labels, scores)
    ranks = stats.rankdata(scores)  # average ranks: a tied pair contributes 1/2
    n_pos = int(labels.sum())
    n_neg = len(labels) - n_pos
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _cumulative_counts(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives when thresholding at each distinct score, highest first."""
    order = np.argsort(-scores, kind="mergesort")
    labels, scores = labels[order], scores[order]
    last_of_each_score = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]
    tps = np.cumsum(labels)[last_of_each_score]
    fps = (last_of_each_score + 1) - tps
    return tps, fps, scores[last_of_each_score]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from (0, 0) to (1, 1); a point is 'score ≥ threshold',
    the first threshold is +inf (nothing called positive)."""
    labels, scores = _binary(labels, scores)
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    return np.r_[0.0, fps / fps[-1]], np.r_[0.0, tps / tps[-1]], np.r_[np.inf, thresholds]


def precision_recall_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) as scikit-learn returns them: thresholds increasing,
    one more point than thresholds, ending at (precision 1, recall 0)."""
    labels, scores = _binary(labels, scores)
    tps, fps, thresholds = _cumulative_counts(labels, scores)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], thresholds[::-1]


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """Σ (R_n − R_{n−1}) P_n: the step-wise area scikit-learn calls average precision;
    unlike the trapezoid it does not reward interpolating between operating points."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(-np.sum(np.diff(recall) * precision[:-1]))


def pr_auc_trapezoid(labels: np.ndarray, scores: np.ndarray) -> float:
    """Trapezoidal area under the PR curve: what the paper's code reported as PR-AUC,
    kept so our numbers compare with the paper's."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(-np.sum(np.diff(recall) * (precision[1:] + precision[:-1]) / 2))


def _resampler(count: int, groups: np.ndarray | None, rng: np.random.Generator) -> Callable[[], np.ndarray]:
    """Draws one bootstrap index: items with replacement, or whole groups with replacement."""
    if groups is None:
        return lambda: rng.integers(0, count, count)
    groups = np.asarray(groups)
    if groups.shape != (count,):
        raise ValueError(f"groups of shape {groups.shape} do not match {count} labels")
    _, member_of = np.unique(groups, return_inverse=True)
    by_group = np.argsort(member_of, kind="stable")
    sizes = np.bincount(member_of)
    starts = np.cumsum(sizes) - sizes

    def draw() -> np.ndarray:
        chosen = rng.integers(0, len(sizes), len(sizes))
        lengths = sizes[chosen]
        block_starts = np.cumsum(lengths) - lengths
        # Position j of block k reads by_group[starts[k] + (j − block_starts[k])].
        return by_group[np.repeat(starts[chosen] - block_starts, lengths) + np.arange(lengths.sum())]

    return draw


def bootstrap_interval(
    labels: np.ndarray,
    scores: np.ndarray,
    statistic: Statistic,
    *,
    resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> Interval:
    """Percentile bootstrap of `statistic(labels, scores)`.

    With `groups` (patient ids) whole groups are resampled, because slices of one patient
    are correlated and resampling them singly makes the interval too narrow. Resamples
    holding one class only are skipped (an AUC is undefined there) and counted in the
    method text; if every resample is skipped the bounds are NaN.
    """
    labels, scores = _binary(labels, scores)
    _check_confidence(confidence)
    if resamples < 1:
        raise ValueError(f"resamples must be ≥ 1, got {resamples}")
    draw = _resampler(len(labels), groups, np.random.default_rng(seed))
    estimate = float(statistic(labels, scores))
    values: list[float] = []
    for _ in range(resamples):
        index = draw()
        positives = int(labels[index].sum())
        if positives in (0, len(index)):
            continue
        values.append(float(statistic(labels[index], scores[index])))
    skipped = resamples - len(values)
    method = (f"bootstrap percentile, {resamples} resamples" + (" of whole patients" if groups is not None else "")
              + (f" ({skipped} with one class skipped)" if skipped else ""))
    if not values:
        return Interval(estimate, math.nan, math.nan, method)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return Interval(estimate, float(low), float(high), method)


def _as_studies(probabilities_per_study: list[np.ndarray]) -> list[np.ndarray]:
    studies = [np.asarray(p, dtype=np.float64) for p in probabilities_per_study]
    for i, study in enumerate(studies):
        if study.ndim != 1 or study.size == 0:
            raise ValueError(f"study {i}: need a non-empty 1-D array of slice probabilities, got shape {study.shape}")
    return studies


def _auc_entry(labels: np.ndarray, scores: np.ndarray, statistic: Statistic, *, groups: np.ndarray | None,
               resamples: int, seed: int) -> dict[str, float | str | None] | None:
    """Bootstrap interval as a dict, or None where one class only makes the area undefined."""
    if labels.all() or not labels.any():
        return None
    return bootstrap_interval(labels, scores, statistic, resamples=resamples, seed=seed, groups=groups).as_dict()


def slice_level_metrics(
    labels: np.ndarray,
    probabilities: np.ndarray,
    *,
    thresholds: tuple[float, ...] = (0.5, 0.7, 0.9),
    groups: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
    interval: str = "wilson",
) -> dict:
    """The paper's Table 1 with intervals (proportions by `interval`), JSON-ready.
    Threshold keys are f"{t:g}" ("0.5"); a slice is positive when P > t. Areas are None
    with one class only."""
    labels = _as_labels(labels)
    probabilities = _as_scores(probabilities, len(labels))
    if groups is not None and np.shape(groups) != labels.shape:
        raise ValueError(f"groups of shape {np.shape(groups)} do not match {len(labels)} labels")
    auc_args = {"groups": groups, "resamples": resamples, "seed": seed}
    return {
        "n": len(labels), "positives": int(labels.sum()), "negatives": int((~labels).sum()),
        "patients": None if groups is None else len(np.unique(groups)),
        "interval": interval,
        "thresholds": {f"{t:g}": ConfusionMatrix.from_predictions(labels, probabilities > t).as_dict(interval)
                       for t in thresholds},
        "roc_auc": _auc_entry(labels, probabilities, roc_auc, **auc_args),
        "average_precision": _auc_entry(labels, probabilities, average_precision, **auc_args),
        "pr_auc_trapezoid": _auc_entry(labels, probabilities, pr_auc_trapezoid, **auc_args),
    }


def patient_level_metrics(
    study_labels: np.ndarray,
    probabilities_per_study: list[np.ndarray],
    *,
    rule: TriageRule,
    fractions: tuple[float, ...] = (0.025, 0.05, 0.10),
    resamples: int = 2000,
    seed: int = 0,
    interval: str = "wilson",
) -> dict:
    """The paper's Table 2 with intervals: `rule` with each of `fractions` and with its own
    fraction (keys f"{100 × fraction:g}%" such as "2.5%"), and the ROC-AUC of the rule's two study
    scores (the maximum slice probability and the top-k mean). JSON-ready; areas are None
    with one class only."""
    labels = _as_labels(study_labels)
    studies = _as_studies(probabilities_per_study)
    if len(labels) != len(studies):
        raise ValueError(f"{len(labels)} study labels but {len(studies)} studies")
    rules = {}
    for fraction in sorted(set(fractions) | {rule.positive_fraction}):  # the rule's own fraction too
        variant = dataclasses.replace(rule, positive_fraction=fraction)
        predicted = np.array([variant.apply(study).positive for study in studies])
        rules[f"{fraction * 100:g}%"] = ConfusionMatrix.from_predictions(labels, predicted).as_dict(interval)
    if rule != TriageRule():  # a calibrated or configured rule: the paper's beside it, for comparison
        predicted = np.array([TriageRule().apply(study).positive for study in studies])
        rules[PAPER_RULE_ROW] = ConfusionMatrix.from_predictions(labels, predicted).as_dict(interval)
    verdicts = [rule.apply(study) for study in studies]
    maximum = np.array([v.study_score for v in verdicts])
    top_mean = np.array([v.top_k_score for v in verdicts])
    auc_args = {"groups": None, "resamples": resamples, "seed": seed}
    return {
        "n": len(labels), "positives": int(labels.sum()), "negatives": int((~labels).sum()),
        "slice_threshold": rule.slice_threshold, "min_positive_slices": rule.min_positive_slices,
        "positive_fraction": rule.positive_fraction, "interval": interval, "rules": rules,
        "study_score_roc_auc": _auc_entry(labels, maximum, roc_auc, **auc_args),
        "top3_mean_roc_auc": _auc_entry(labels, top_mean, roc_auc, **auc_args),
    }


def brier_score(labels: np.ndarray, probabilities: np.ndarray) -> float:
    """Mean squared difference between P(ICH) and the label: 0 is perfect, 0.25 is a
    constant 0.5."""
    labels = _as_labels(labels)
    probabilities = _as_scores(probabilities, len(labels))
    return float(np.mean((probabilities - labels) ** 2))


def reliability_bins(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> list[dict]:
    """Equal-width bins of P(ICH) (the last one closed at 1): per bin the slices, their mean
    P(ICH) and the share that truly bleed — the points of a reliability plot."""
    labels = _as_labels(labels)
    probabilities = _as_scores(probabilities, len(labels))
    if bins < 1:
        raise ValueError(f"bins must be ≥ 1, got {bins}")
    index = np.minimum((probabilities * bins).astype(int), bins - 1)
    table = []
    for b in range(bins):
        inside = index == b
        count = int(inside.sum())
        table.append({"low": b / bins, "high": (b + 1) / bins, "n": count,
                      "mean_probability": float(probabilities[inside].mean()) if count else None,
                      "fraction_positive": float(labels[inside].mean()) if count else None})
    return table


def expected_calibration_error(labels: np.ndarray, probabilities: np.ndarray, bins: int = 10) -> float:
    """Σ_b (n_b / N) |share positive_b − mean P_b| over equal-width bins of P(ICH)."""
    table = reliability_bins(labels, probabilities, bins)
    total = sum(b["n"] for b in table)
    return float(sum(b["n"] / total * abs(b["fraction_positive"] - b["mean_probability"]) for b in table if b["n"]))


def calibration_metrics(labels: np.ndarray, probabilities: np.ndarray, *, bins: int = 10,
                        groups: np.ndarray | None = None, resamples: int = 2000, seed: int = 0) -> dict:
    """Brier score and expected calibration error (bootstrap intervals, whole groups when
    given) and the reliability table, JSON-ready. Calibration depends on prevalence: on a
    balanced list it says how P(ICH) reads at 50 % prevalence."""
    labels = _as_labels(labels)
    probabilities = _as_scores(probabilities, len(labels))
    boot = {"groups": groups, "resamples": resamples, "seed": seed}

    def ece(y: np.ndarray, p: np.ndarray) -> float:
        return expected_calibration_error(y, p, bins)

    both = 0 < labels.sum() < len(labels)
    return {
        "n": len(labels), "prevalence": float(labels.mean()), "bins": bins,
        "brier": bootstrap_interval(labels, probabilities, brier_score, **boot).as_dict() if both
        else {"estimate": brier_score(labels, probabilities), "low": None, "high": None, "method": "one class only"},
        "ece": bootstrap_interval(labels, probabilities, ece, **boot).as_dict() if both
        else {"estimate": ece(labels, probabilities), "low": None, "high": None, "method": "one class only"},
        "reliability": reliability_bins(labels, probabilities, bins),
    }


def subtype_sensitivity(subtypes: list[tuple[str, ...]], labels: np.ndarray, probabilities: np.ndarray, *,
                        thresholds: tuple[float, ...] = (0.5, 0.7, 0.9), interval: str = "wilson") -> dict:
    """Per bleed subtype, the share of slices showing it that are called positive at each
    threshold (P > t), with intervals by `interval`: which kinds of bleed the model misses.
    A slice with several subtypes counts for each."""
    labels = _as_labels(labels)
    probabilities = _as_scores(probabilities, len(labels))
    if len(subtypes) != len(labels):
        raise ValueError(f"{len(subtypes)} subtype entries but {len(labels)} labels")
    names = sorted({name for present in subtypes for name in present})
    table = {}
    for name in names:
        showing = np.array([name in present for present in subtypes])
        table[name] = {"slices": int(showing.sum()), "thresholds": {
            f"{t:g}": ConfusionMatrix._interval(int(np.sum(showing & (probabilities > t))), int(showing.sum()),
                                                interval).as_dict() for t in thresholds}}
    return table
