"""`ichnode calibrate`: the operating point for a target sensitivity, on sets whose right
answer is known, and written into a new checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.calibrate import choose_threshold, operating_point, study_statistics
from training.metrics import wilson_interval
from training.model.architectures import create_model
from training.model.checkpoint import default_model_config, load_checkpoint, read_state_dict, save_checkpoint
from training.model.rule import TriageRule


def _studies(scores: list[float], slices: int = 20) -> list[np.ndarray]:
    """One study per score: one slice at the score, the rest low."""
    return [np.array([score] + [0.01] * (slices - 1)) for score in scores]


def test_the_threshold_keeps_the_target_share_of_bleeding_studies() -> None:
    positive_scores = [0.50 + 0.025 * i for i in range(20)]  # 0.500 … 0.975
    negative_scores = [0.05, 0.1, 0.2, 0.3, 0.45]
    labels = np.array([1] * 20 + [0] * 5)
    studies = _studies(positive_scores + negative_scores)
    # 0.95 of 20 is 19 studies: anything below 0.525 keeps them. Every threshold from the
    # highest normal study (0.45) up is as specific, so it sits halfway from there to the
    # lowest bleeding study (0.5) and keeps all 20.
    point = operating_point(labels, studies, target=0.95, data="constructed", resamples=200)
    assert point.rule.slice_threshold == pytest.approx(0.475)
    assert (point.rule.positive_fraction, point.rule.min_positive_slices) == (0.0, 1)
    assert (point.sensitivity.estimate, point.specificity.estimate) == (1.0, 1.0)
    assert point.sensitivity == wilson_interval(20, 20) and point.specificity == wilson_interval(5, 5)
    assert point.threshold_bootstrap.low <= 0.475 <= point.threshold_bootstrap.high
    assert point.warnings and "20 studies with ICH and 5 without" in point.warnings[0]
    # A normal study at 0.51 among the bleeding ones: 0.95 can still be had without calling it
    # positive, by letting the lowest bleeding study (0.5) go.
    statistics = np.array(positive_scores + negative_scores + [0.51])
    with_normal = np.append(labels, 0)
    assert choose_threshold(with_normal, statistics, 0.95) == pytest.approx(0.5175)  # halfway 0.51 → 0.525
    assert choose_threshold(with_normal, statistics, 1.0) == pytest.approx(0.475)  # all 20: 0.51 called too


def test_a_normal_study_inside_the_bleeding_ones_costs_specificity_not_sensitivity() -> None:
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.85, 0.2])
    labels = np.array([1, 1, 1, 1, 0, 0])
    point = operating_point(labels, _studies(scores.tolist()), target=1.0, data="constructed", resamples=50)
    assert point.rule.slice_threshold == pytest.approx(0.4)  # halfway from 0.6 down to 0.2
    assert (point.sensitivity.estimate, point.specificity.estimate) == (1.0, 0.5)


def test_the_statistic_follows_the_rule_family() -> None:
    study = np.array([0.9, 0.8, 0.7, 0.1] + [0.05] * 16)  # 20 slices
    assert study_statistics([study], 0.0, 1)[0] == 0.9  # the study score
    assert study_statistics([study], 0.0, 3)[0] == 0.7  # three slices needed: the third highest
    assert study_statistics([study], 0.10, 1)[0] == 0.8  # ceil(0.1 × 20) = 2 slices
    assert study_statistics([np.array([0.9, 0.8])], 0.0, 3)[0] == -1.0  # can never be positive
    # With two slices required, a bleed seen on one slice only (0.95, then 0.2) is the hardest
    # to keep: keeping it puts the threshold under 0.2, and the normal study (0.6, 0.55) is
    # called positive too. The rule itself agrees with the statistic it was chosen on.
    labels = np.array([1, 1, 0])
    studies = [study, np.array([0.95, 0.2] + [0.05] * 18), np.array([0.6, 0.55] + [0.05] * 18)]
    point = operating_point(labels, studies, target=1.0, data="constructed", positive_fraction=0.10, resamples=20)
    assert point.rule.slice_threshold == pytest.approx(0.1)
    assert [point.rule.apply(s).positive for s in studies] == [True, True, True]
    assert (point.sensitivity.estimate, point.specificity.estimate) == (1.0, 0.0)


@pytest.mark.parametrize("labels, target, message", [
    ([1, 1], 0.95, "studies with and without ICH"),
    ([1, 0], 0.0, r"target sensitivity must be in \(0, 1\]"),
])
def test_what_cannot_be_calibrated_says_why(labels: list[int], target: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        operating_point(np.array(labels), _studies([0.9, 0.1]), target=target, data="constructed")


def test_calibrate_writes_a_new_checkpoint_recommending_the_rule(tmp_path: Path, synthetic_root: Path) -> None:
    torch.manual_seed(0)
    original = save_checkpoint(tmp_path / "model.pt", create_model("resnet18"), default_model_config("resnet18"),
                               half=True)
    out = tmp_path / "calibrated.pt"
    done = subprocess.run([sys.executable, "-m", "node.cli", "calibrate", "--checkpoint", str(original),
                           "--data", str(synthetic_root), "--out", str(out), "--target-sensitivity", "1",
                           "--device", "cpu", "--resamples", "50"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "operating point for study sensitivity ≥ 1, measured on" in done.stdout
    assert "sensitivity: 1.000" in done.stdout and "warning: the calibration data hold 1 studies" in done.stdout
    model, config = load_checkpoint(out)
    point = config.provenance.metrics["operating_point"]
    assert config.triage.slice_threshold == point["slice_threshold"] and config.triage.positive_fraction == 0.0
    assert point["target_sensitivity"] == 1.0 and "synthetic" in point["measured_on"]
    assert point["sensitivity"]["estimate"] == 1.0
    # The same weights, still stored as float16.
    before, after = read_state_dict(original), read_state_dict(out)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert load_checkpoint(original)[1].triage == TriageRule()  # the original is untouched
    same = subprocess.run([sys.executable, "-m", "node.cli", "calibrate", "--checkpoint", str(out), "--data",
                           str(synthetic_root), "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert same.returncode != 0 and "--out must differ" in same.stderr
