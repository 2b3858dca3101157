"""`ichnode calibrate`: choose the patient rule's operating point for a target sensitivity.

A triage tool exists not to miss bleeds, so its operating point is stated as a
sensitivity. The paper's rule (slice P > 0.8 on ≥ 5 % of slices) was chosen to report
accuracy; on studies with small bleeds it leaves study sensitivity on the table even when
the model ranks every bleeding study above every normal one.

The family kept is the paper's own: a study is positive when at least
max(min_positive_slices, ceil(positive_fraction × N)) slices have P(ICH) > t. For a fixed
fraction and minimum, each study then has one statistic (the k-th highest slice
probability, k being the slices the rule requires) and the rule is a threshold on it, so
sensitivity falls and specificity rises monotonically with t and the choice is exact:
specificity is best at the highest t that still calls the target share of bleeding
studies positive, and stays the same down to the highest normal study below it, so t is
put halfway between that normal study and the lowest bleeding study above it, which
keeps every bleeding study the best specificity allows. The default is
positive_fraction 0 with one slice — a threshold on the study score (the highest slice
P(ICH)) — because it has one parameter to fit on a validation set of modest size and it
does not penalise small bleeds that show on few slices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets import load_eval_set
from training.errors import DataError
from training.evaluate import data_description, predict_slices
from training.inference.predictor import Predictor
from training.inference.settings import Backend, Device
from training.metrics import Interval, bootstrap_interval, wilson_interval
from training.model.checkpoint import load_checkpoint, read_state_dict, save_checkpoint
from training.model.rule import TriageRule, required_positive_slices

__all__ = ["SMALL_CLASS", "OperatingPoint", "study_statistics", "choose_threshold", "operating_point", "calibrate",
           "write_calibrated"]

# Fewer studies than this in either class leave the intervals too wide to decide on.
SMALL_CLASS = 50


@dataclass(frozen=True)
class OperatingPoint:
    """The chosen rule and what it did on the calibration data, with 95 % intervals."""

    rule: TriageRule
    target_sensitivity: float
    studies: int
    positives: int
    negatives: int
    sensitivity: Interval  # Wilson
    specificity: Interval  # Wilson
    sensitivity_bootstrap: Interval  # over patients, at the chosen rule
    specificity_bootstrap: Interval
    threshold_bootstrap: Interval  # the threshold chosen again on each resample
    data: str
    warnings: tuple[str, ...]

    def as_dict(self) -> dict:
        return {
            "slice_threshold": self.rule.slice_threshold, "positive_fraction": self.rule.positive_fraction,
            "min_positive_slices": self.rule.min_positive_slices, "target_sensitivity": self.target_sensitivity,
            "studies": self.studies, "positives": self.positives, "negatives": self.negatives,
            **{name: getattr(self, name).as_dict() for name in (
                "sensitivity", "specificity", "sensitivity_bootstrap", "specificity_bootstrap",
                "threshold_bootstrap")},
            "measured_on": self.data, "warnings": list(self.warnings),
        }


def study_statistics(per_study: list[np.ndarray], positive_fraction: float, min_positive_slices: int) -> np.ndarray:
    """Each study's k-th highest slice probability, k = the slices the rule requires
    (capped at the study's slices): the rule calls a study positive exactly when this
    exceeds the slice threshold."""
    values = []
    for probabilities in per_study:
        ordered = np.sort(np.asarray(probabilities, dtype=np.float64))[::-1]
        if ordered.size == 0:
            raise ValueError("a study without slice probabilities cannot be calibrated on")
        k = required_positive_slices(ordered.size, positive_fraction, min_positive_slices)
        values.append(ordered[k - 1] if k <= ordered.size else -1.0)  # below every threshold: never positive
    return np.array(values)


def choose_threshold(labels: np.ndarray, statistics: np.ndarray, target: float) -> float:
    """The slice threshold (positive when statistic > threshold) that calls at least
    `target` of the bleeding studies positive with the best specificity, and, among the
    thresholds as specific, the one with the widest margin: halfway between the highest
    normal study it lets pass and the lowest bleeding study above that."""
    labels = np.asarray(labels, dtype=bool)
    statistics = np.asarray(statistics, dtype=np.float64)
    positives = np.sort(statistics[labels])[::-1]
    if positives.size == 0:
        raise ValueError("calibration needs at least one study with ICH")
    needed = math.ceil(round(target * positives.size, 9))
    kept = positives[needed - 1]  # the lowest statistic that must stay above the threshold
    if not kept > 0:
        raise ValueError(f"the target sensitivity {target} needs a study whose slices all have P(ICH) 0")
    # Any threshold from the highest normal study below `kept` up to `kept` is as specific;
    # the lower it is, the more bleeding studies it keeps.
    normal_below = statistics[~labels & (statistics < kept)]
    floor = normal_below.max() if normal_below.size else 0.0
    lowest_above = positives[positives > floor].min()
    threshold = (floor + lowest_above) / 2
    readable = round(threshold, 4)  # as config files and reports show it, when that stays inside the gap
    if floor < readable < lowest_above or (floor == readable == 0.0 < lowest_above and not normal_below.size):
        threshold = readable
    return float(min(max(threshold, 0.0), np.nextafter(1.0, 0.0)))


def operating_point(labels: np.ndarray, per_study: list[np.ndarray], *, target: float, data: str,
                    positive_fraction: float = 0.0, min_positive_slices: int = 1, resamples: int = 2000,
                    seed: int = 0) -> OperatingPoint:
    """Choose the rule for `target` study sensitivity and measure it, with intervals."""
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    labels = np.asarray(labels, dtype=bool)
    if labels.size != len(per_study):
        raise ValueError(f"{labels.size} labels but {len(per_study)} studies")
    if labels.all() or not labels.any():
        raise ValueError("calibration needs studies with and without ICH")
    statistics = study_statistics(per_study, positive_fraction, min_positive_slices)
    threshold = choose_threshold(labels, statistics, target)
    rule = TriageRule(threshold, positive_fraction, min_positive_slices)
    called = statistics > threshold
    positives, negatives = int(labels.sum()), int((~labels).sum())
    tp, tn = int((called & labels).sum()), int((~called & ~labels).sum())

    def sensitivity(truth: np.ndarray, values: np.ndarray) -> float:
        return float(np.mean(values[truth] > threshold))

    def specificity(truth: np.ndarray, values: np.ndarray) -> float:
        return float(np.mean(values[~truth] <= threshold))

    def rechosen(truth: np.ndarray, values: np.ndarray) -> float:
        return choose_threshold(truth, values, target)

    boot = {"resamples": resamples, "seed": seed}
    warnings = []
    if min(positives, negatives) < SMALL_CLASS:
        warnings.append(f"the calibration data hold {positives} studies with ICH and {negatives} without; with "
                        f"fewer than {SMALL_CLASS} in either class the intervals are too wide to rely on")
    return OperatingPoint(
        rule, target, labels.size, positives, negatives, wilson_interval(tp, positives), wilson_interval(tn, negatives),
        bootstrap_interval(labels, statistics, sensitivity, **boot),
        bootstrap_interval(labels, statistics, specificity, **boot),
        bootstrap_interval(labels, statistics, rechosen, **boot), data, tuple(warnings))


def calibrate(checkpoint: Path, data: Path, out: Path, *, target: float = 0.95, positive_fraction: float = 0.0,
              min_positive_slices: int = 1, device: Device = Device("auto"), batch_size: int = 8,
              backend: Backend = Backend.AUTO, resamples: int = 2000, progress: bool = True) -> OperatingPoint:
    """Predict every study of `data`, choose the operating point, and write a new checkpoint
    `out` whose recommended rule it is; its provenance records the data, the target and
    what the rule did there."""
    _check_new(checkpoint, out)  # before minutes of inference, not after
    predictor = Predictor.from_checkpoint(checkpoint, device=device, batch_size=batch_size, backend=backend)
    eval_set = load_eval_set(Path(data), predictor.config.preprocess, split="val")
    studies = [s for s in eval_set.studies if s.slices]
    if not studies:
        raise DataError(f"{data} holds no labelled studies to calibrate on")
    probabilities = predict_slices(predictor, eval_set, [x for s in studies for x in s.slices], progress=progress,
                                   desc="calibrate")
    per_study = [np.array([probabilities[x.image_id] for x in s.slices]) for s in studies]
    try:
        point = operating_point(np.array([s.label for s in studies]), per_study, target=target,
                                data=data_description(eval_set),
                                positive_fraction=positive_fraction, min_positive_slices=min_positive_slices,
                                resamples=resamples)
    except ValueError as exc:
        raise DataError(f"cannot calibrate on {data}: {exc}") from exc
    write_calibrated(checkpoint, out, point)
    return point


def write_calibrated(checkpoint: Path, out: Path, point: OperatingPoint) -> None:
    """A new checkpoint: the same weights (stored as they were), recommending `point`'s
    rule, with the operating point in its provenance."""
    _check_new(checkpoint, out)
    model, config = load_checkpoint(checkpoint)
    half = any(t.dtype.is_floating_point and t.dtype.itemsize == 2 for t in read_state_dict(checkpoint).values())
    provenance = dataclasses.replace(config.provenance,
                                     metrics={**config.provenance.metrics, "operating_point": point.as_dict()})
    save_checkpoint(out, model, dataclasses.replace(config, triage=point.rule, provenance=provenance), half=half)


def _check_new(checkpoint: Path, out: Path) -> None:
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise DataError(f"calibrate writes a new checkpoint: --out must differ from {checkpoint}")
