"""`ichnode fit-ood`: describe a checkpoint's training inputs, so the node knows when not to answer.

The profile (training/model/inputs.py) is a Gaussian of the training slices' descriptors
at one layer; its two study limits (the mean over a study's slices, and its most unusual
slice) are fixed on validation studies the model never trained on, each as the conformal
quantile for half the target false-abstention rate: with n validation studies and target
α, the ⌈(n + 1)(1 − α)⌉-th smallest score, so that a new study from the same distribution
scores above it with probability at most α (capped at the highest validation score, which
promises 1/(n + 1)). Other ways of scoring — the energy and the maximum softmax
probability of the logits, Mahalanobis distances at other layers and by one statistic
alone — are measured beside it on the same validation studies and on shifted studies
(`--shifted`), so the choice rests on evidence; the report says how each did. Shifted studies
used here are for choosing only: report abstention on others (`ichnode evaluate`).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.datasets import EvalSet, load_eval_set, load_training_slices
from training.errors import DataError
from training.evaluate import data_description, infer_slices
from training.inference.predictor import Predictor
from training.inference.settings import Backend, Device
from training.metrics import roc_auc
from training.model.checkpoint import load_checkpoint, read_state_dict, save_checkpoint
from training.model.inputs import InputProfile, mahalanobis
from training.model.scope import Scope

__all__ = ["DEFAULT_LAYER", "MethodResult", "FitResult", "fit_gaussian", "conformal_limit", "score_methods",
           "fit_ood"]

# Chosen on the evidence in docs/training.md §7: the classifier's own input, the ResNet's
# pooled features, by their mean or most unusual slice, caught the most of the shifts tried.
DEFAULT_LAYER = "avgpool"


def fit_gaussian(descriptors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and whitening matrix (the Cholesky factor of the precision) of the rows of
    `descriptors`, the covariance shrunk towards a scaled identity by Ledoit and Wolf's rule,
    so that fewer slices than features still give a well-conditioned precision."""
    from sklearn.covariance import LedoitWolf

    descriptors = np.asarray(descriptors, dtype=np.float64)
    if descriptors.ndim != 2 or len(descriptors) < 2:
        raise ValueError(f"fitting needs descriptors [N ≥ 2, D], got {list(descriptors.shape)}")
    mean = descriptors.mean(axis=0)
    precision = LedoitWolf(assume_centered=True).fit(descriptors - mean).precision_
    return mean, np.linalg.cholesky((precision + precision.T) / 2)


def conformal_limit(validation_scores: np.ndarray, target: float) -> float:
    """The ⌈(n + 1)(1 − target)⌉-th smallest validation score (the highest when that rank
    exceeds n): a new in-distribution study scores above it with probability ≤ target."""
    scores = np.sort(np.asarray(validation_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("the limit needs at least one validation study")
    if not 0 < target < 1:
        raise ValueError(f"the target abstention rate must be in (0, 1), got {target}")
    rank = math.ceil(round((scores.size + 1) * (1 - target), 9))
    return float(scores[min(rank, scores.size) - 1])


def _energy(logits: np.ndarray) -> np.ndarray:
    """Negative free energy of the logits: higher for inputs unlike the training data."""
    return -np.logaddexp(logits[:, 0], logits[:, 1])


def _least_confidence(logits: np.ndarray) -> np.ndarray:
    """One minus the maximum softmax probability."""
    p = 1 / (1 + np.exp(-(logits[:, 1] - logits[:, 0])))
    return 1 - np.maximum(p, 1 - p)


@dataclass(frozen=True)
class MethodResult:
    """One way of scoring studies: its limits on the validation studies and what it caught."""

    name: str
    limits: dict[str, float]  # statistic → limit; a study above any is not triaged
    validation_abstained: float
    shifted: dict[str, dict[str, float]]  # set name → {"auroc": …, "abstained": …, "studies": …}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


Aggregate = Callable[[np.ndarray], float]
# How a study's slice scores become the statistics a limit applies to: the mean (a whole
# scan unlike the training inputs) and the most unusual slice (a part of one).
STATISTICS: dict[str, Aggregate] = {"mean": lambda v: float(np.mean(v)), "highest slice": lambda v: float(np.max(v))}


@dataclass(frozen=True)
class FitResult:
    profile: InputProfile
    methods: list[MethodResult]
    out: Path


StudyDescriptors = list[dict[str, np.ndarray]]  # per study: layer → [slices, D]


def _study_descriptors(predictor: Predictor, eval_set: EvalSet, progress: bool, desc: str) -> StudyDescriptors:
    """Each study's slices' descriptors, by layer."""
    studies = [study for study in eval_set.studies if study.slices]
    outputs = infer_slices(predictor, eval_set, [s for study in studies for s in study.slices], progress=progress,
                           desc=desc)
    return [{layer: np.stack([outputs[s.image_id][1][layer] for s in study.slices])
             for layer in predictor.descriptor_layers} for study in studies]


def study_limits(slice_scores: list[np.ndarray], statistics: tuple[str, ...], target: float) -> dict[str, float]:
    """Each statistic's conformal limit on the validation studies, for target / (number of
    statistics): a study above any limit is not triaged, and by the union bound at most
    `target` of in-distribution studies are."""
    return {name: conformal_limit(np.array([STATISTICS[name](v) for v in slice_scores]), target / len(statistics))
            for name in statistics}


def _past_limits(slice_scores: np.ndarray, limits: dict[str, float]) -> float:
    """How far past its nearest limit a study is, relative to the limit (above 0: not
    triaged); the energy's limits are negative, so the distance is divided by their size."""
    return max((STATISTICS[name](slice_scores) - limit) / abs(limit) for name, limit in limits.items())


def score_methods(training: dict[str, np.ndarray], validation: StudyDescriptors,
                  shifted: dict[str, StudyDescriptors], target: float) -> list[MethodResult]:
    """Every scoring method on the same studies: the energy and least confidence of the
    logits (their mean over a study), and the Mahalanobis distance at each descriptor layer
    (fitted on `training`) by its mean, its most unusual slice, and either. Each limit is
    conformal on `validation`; a study's AUROC score is how far past its nearest limit it is."""
    scorers = {"energy of the logits": (lambda d: _energy(d["logits"]), ("mean",)),
               "maximum softmax probability": (lambda d: _least_confidence(d["logits"]), ("mean",))}
    for layer, values in training.items():
        if layer == "logits":
            continue
        mean, whitening = fit_gaussian(values)

        def distance(d: dict[str, np.ndarray], layer: str = layer, mean: np.ndarray = mean,
                     whitening: np.ndarray = whitening) -> np.ndarray:
            return mahalanobis(d[layer], mean, whitening)

        for statistics in (("mean",), ("highest slice",), ("mean", "highest slice")):
            scorers[f"Mahalanobis at {layer}, {' or '.join(statistics)}"] = (distance, statistics)
    results = []
    for name, (scorer, statistics) in scorers.items():
        valid_slices = [scorer(study) for study in validation]
        limits = study_limits(valid_slices, statistics, target)
        valid = np.array([_past_limits(v, limits) for v in valid_slices])
        caught = {}
        for set_name, studies in shifted.items():
            scores = np.array([_past_limits(scorer(study), limits) for study in studies])
            labels = np.r_[np.zeros(valid.size), np.ones(scores.size)]
            caught[set_name] = {"auroc": round(roc_auc(labels, np.r_[valid, scores]), 4),
                                "abstained": round(float(np.mean(scores > 0)), 4), "studies": int(scores.size)}
        results.append(MethodResult(name, limits, round(float(np.mean(valid > 0)), 4), caught))
    return results


def fit_ood(checkpoint: Path, data: Path, validation: Path, out: Path, *, layer: str = DEFAULT_LAYER,
            target: float = 0.01, shifted: list[Path] = (), scope: Scope | None = None,
            report: Path | None = None, device: Device = Device("auto"), batch_size: int = 8,
            backend: Backend = Backend.AUTO, progress: bool = True) -> FitResult:
    """Fit the profile on `data`'s training slices, fix its limit on `validation`'s
    studies, compare the other methods on `shifted`, and write a new checkpoint `out`
    holding the profile (and `scope`, when given)."""
    if Path(out).resolve() == Path(checkpoint).resolve():
        raise DataError(f"fit-ood writes a new checkpoint: --out must differ from {checkpoint}")
    predictor = Predictor.from_checkpoint(checkpoint, device=device, batch_size=batch_size, backend=backend)
    if layer not in predictor.descriptor_layers or layer == "logits":
        raise DataError(f"--layer {layer!r}: {predictor.config.architecture} describes its inputs at "
                        f"{', '.join(l for l in predictor.descriptor_layers if l != 'logits')}")
    spec = predictor.config.preprocess
    training_set = load_training_slices(Path(data), spec)
    validation_set = load_eval_set(Path(validation), spec, split="val")
    if not training_set.slice_level:
        raise DataError(f"{data} holds no training slices to describe")
    if not any(s.slices for s in validation_set.studies):
        raise DataError(f"{validation} holds no studies to fix the limit on")
    train_outputs = infer_slices(predictor, training_set, training_set.slice_level, progress=progress,
                                 desc="training slices")
    training = {name: np.stack([train_outputs[s.image_id][1][name] for s in training_set.slice_level])
                for name in predictor.descriptor_layers}
    valid = _study_descriptors(predictor, validation_set, progress, "validation studies")
    shifted_sets = {Path(folder).name: _study_descriptors(predictor, load_eval_set(Path(folder), spec), progress,
                                                          f"shifted {Path(folder).name}") for folder in shifted}
    methods = score_methods(training, valid, shifted_sets, target)
    mean, whitening = fit_gaussian(training[layer])
    profile = InputProfile(layer, mean, whitening, limit=1.0, slice_limit=1.0, fitted_on=training_set.description,
                           limit_chosen_on="", training_slices=len(training_set.slice_level))
    limits = study_limits([profile.slice_scores(study[layer]) for study in valid], PROFILE_STATISTICS, target)
    profile = dataclasses.replace(profile, limit=limits["mean"], slice_limit=limits["highest slice"],
                                  limit_chosen_on=_limits_note(len(valid), target, data_description(validation_set)))
    _write(checkpoint, out, profile, scope, methods)
    if report is not None:
        _write_report(report, profile, methods, target)
    return FitResult(profile, methods, Path(out))


PROFILE_STATISTICS = ("mean", "highest slice")


def _limits_note(studies: int, target: float, data: str) -> str:
    """How the limits were fixed, and what they can promise with so many validation studies."""
    floor = 1 / (studies + 1)
    each = target / len(PROFILE_STATISTICS)
    promise = (f"at most {target:.1%} false abstention" if each >= floor else
               f"aiming at {target:.1%} false abstention, though {studies} studies can promise no less than "
               f"{floor:.1%} for each of the {len(PROFILE_STATISTICS)} limits ({len(PROFILE_STATISTICS) * floor:.1%} "
               "for both)")
    return f"conformal limits, {promise}, on {studies} validation studies: {data}"


def _write(checkpoint: Path, out: Path, profile: InputProfile, scope: Scope | None,
           methods: list[MethodResult]) -> None:
    """A new checkpoint: the same weights (stored as they were) with the profile, the
    scope, and the comparison of methods in its provenance."""
    model, config = load_checkpoint(checkpoint)
    half = any(t.dtype.is_floating_point and t.dtype.itemsize == 2 for t in read_state_dict(checkpoint).values())
    summary = {"layer": profile.layer, "limit": profile.limit, "slice_limit": profile.slice_limit,
               "fitted_on": profile.fitted_on,
               "limit_chosen_on": profile.limit_chosen_on, "methods": [m.as_dict() for m in methods]}
    provenance = dataclasses.replace(config.provenance, metrics={**config.provenance.metrics, "input_profile": summary})
    save_checkpoint(out, model, dataclasses.replace(config, inputs=profile, scope=scope or config.scope,
                                                    provenance=provenance), half=half)


def method_table(methods: list[MethodResult]) -> list[str]:
    """The comparison as Markdown table lines: the share of each shifted set abstained on at
    each method's limit, the share of validation studies, and the AUROCs."""
    sets = list(methods[0].shifted) if methods else []
    lines = ["| method | limits | validation abstained | " + " | ".join(f"{s} abstained (AUROC)" for s in sets) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in sets) + " |"]
    for m in methods:
        cells = [f"{m.shifted[s]['abstained']:.0%} ({m.shifted[s]['auroc']:.2f})" for s in sets]
        limits = ", ".join(f"{name} {limit:.4g}" for name, limit in m.limits.items())
        lines.append(f"| {m.name} | {limits} | {m.validation_abstained:.0%} | " + " | ".join(cells) + " |")
    return lines


def _write_report(folder: Path, profile: InputProfile, methods: list[MethodResult], target: float) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "fit-ood.json").write_text(json.dumps(
        {"profile": {"layer": profile.layer, "limit": profile.limit, "slice_limit": profile.slice_limit,
                     "fitted_on": profile.fitted_on,
                     "limit_chosen_on": profile.limit_chosen_on, "training_slices": profile.training_slices},
         "target_abstention": target, "methods": [m.as_dict() for m in methods]}, indent=1) + "\n")
    lines = ["# Out-of-distribution profile", "", f"Profile: {profile.describe()}.", "",
             f"Fitted on: {profile.fitted_on}.", "", "Each method's limits are conformal on the same validation "
             f"studies (target false abstention {target:.0%}, shared among a method's limits); a study is not "
             "triaged above any of them.", "",
             *method_table(methods), ""]
    (folder / "fit-ood.md").write_text("\n".join(lines))
