"""The checkpoint's description of its training inputs, and how far a study lies from it.

A classifier gives confident probabilities on anything, a phantom-trained one on every
real scan: the probability itself cannot say that an input is unlike what the model
learnt from. The profile can. It holds a Gaussian of one layer's channel means over the
training slices (mean and the Cholesky factor of a shrunk precision matrix); a slice's
score is its Mahalanobis distance from that Gaussian. A study is outside the training
inputs — not triaged — when the mean over its slices is above `limit` (the whole scan is
unlike them: contrast, noise, another body part) or its most unusual slice is above
`slice_limit` (part of it is: metal streaks on the slices near a clip). Both limits are
fixed on validation studies the model was not trained on. Which layer and why is measured by
`ichnode fit-ood` (docs/training.md). Pure numpy: the node and `ichnode evaluate` score
studies the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["METHOD", "InputProfile", "Assessment", "mahalanobis"]

METHOD = "mahalanobis"  # the only scoring method a profile holds; others are compared in fitting


def mahalanobis(descriptors: np.ndarray, mean: np.ndarray, whitening: np.ndarray) -> np.ndarray:
    """Mahalanobis distance of each row of `descriptors` [N, D] from a Gaussian given by
    its mean and whitening (whitening @ whitening.T = precision)."""
    return np.linalg.norm((np.asarray(descriptors, dtype=np.float64) - mean) @ whitening, axis=1)


@dataclass(frozen=True)
class Assessment:
    """One study against the profile."""

    score: float  # mean Mahalanobis distance of its slices
    limit: float
    peak: float  # the distance of its most unusual slice
    peak_limit: float
    layer: str
    slices: int

    @property
    def outside(self) -> bool:
        return self.score > self.limit or self.peak > self.peak_limit

    def describe(self) -> str:
        return (f"Mahalanobis distance from the training slices at the model's {self.layer}: mean of {self.slices} "
                f"slices {self.score:.2f} (limit {self.limit:.2f}), most unusual slice {self.peak:.2f} "
                f"(limit {self.peak_limit:.2f})")

    def reason(self) -> str:
        """Why the study is not triaged, for the log and the result."""
        found = []
        if self.score > self.limit:
            found.append(f"out-of-distribution score {self.score:.2f} is above {self.limit:.2f}")
        if self.peak > self.peak_limit:
            found.append(f"its most unusual slice scores {self.peak:.2f}, above {self.peak_limit:.2f}")
        return (f"the images lie outside this model's training inputs: {' and '.join(found)} "
                "(limits fixed on validation studies)")

    def as_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 4), "limit": round(self.limit, 4), "peak": round(self.peak, 4),
                "peak_limit": round(self.peak_limit, 4), "outside": self.outside, "layer": self.layer,
                "slices": self.slices, "method": METHOD}


@dataclass(frozen=True, eq=False)
class InputProfile:
    """A Gaussian of the training slices' descriptors at one layer, and the study limit."""

    layer: str  # the descriptor layer (training.model.architectures.descriptor_modules)
    mean: np.ndarray  # [D]
    whitening: np.ndarray  # [D, D]: distance = |whitening.T @ (x - mean)|, whitening @ whitening.T = precision
    limit: float  # mean slice score above which a study is not triaged
    slice_limit: float  # highest slice score above which a study is not triaged
    fitted_on: str  # which slices the Gaussian describes
    limit_chosen_on: str  # which studies fixed the limit, and how
    training_slices: int

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        whitening = np.asarray(self.whitening, dtype=np.float64)
        if mean.ndim != 1 or whitening.shape != (mean.size, mean.size):
            raise ValueError(f"an input profile needs mean [D] and whitening [D, D], got {mean.shape} and "
                             f"{whitening.shape}")
        for name in ("limit", "slice_limit"):
            value = getattr(self, name)
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"an input profile's {name} must be a positive number, got {value}")
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "whitening", whitening)

    @property
    def dimensions(self) -> int:
        return int(self.mean.size)

    def slice_scores(self, descriptors: np.ndarray) -> np.ndarray:
        """Mahalanobis distance of each row of `descriptors` [N, D]."""
        descriptors = np.asarray(descriptors, dtype=np.float64)
        if descriptors.ndim != 2 or descriptors.shape[1] != self.dimensions:
            raise ValueError(f"descriptors at {self.layer} must be [N, {self.dimensions}], got "
                             f"{list(descriptors.shape)}")
        return mahalanobis(descriptors, self.mean, self.whitening)

    def assess(self, descriptors: list[dict[str, np.ndarray]]) -> Assessment:
        """One study, from each slice's descriptors (as the inference pass returns them)."""
        if not descriptors:
            raise ValueError("a study needs at least one slice to be assessed")
        scores = self.slice_scores(np.stack([d[self.layer] for d in descriptors]))
        return Assessment(float(scores.mean()), self.limit, float(scores.max()), self.slice_limit, self.layer,
                          len(descriptors))

    def describe(self) -> str:
        return (f"Mahalanobis distance at {self.layer} ({self.dimensions} features) from {self.training_slices} "
                f"training slices; not triaged when the mean over a study's slices is above {self.limit:.2f} or "
                f"its most unusual slice above {self.slice_limit:.2f} ({self.limit_chosen_on})")

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, "layer": self.layer, "mean": self.mean.astype(np.float32),
                "whitening": self.whitening.astype(np.float32), "limit": self.limit,
                "slice_limit": self.slice_limit, "fitted_on": self.fitted_on,
                "limit_chosen_on": self.limit_chosen_on, "training_slices": self.training_slices}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputProfile":
        if data.get("method") != METHOD:
            raise ValueError(f"input profile method {data.get('method')!r} is not {METHOD!r}")
        return cls(layer=data["layer"], mean=np.asarray(data["mean"]), whitening=np.asarray(data["whitening"]),
                   limit=float(data["limit"]), slice_limit=float(data["slice_limit"]), fitted_on=data["fitted_on"],
                   limit_chosen_on=data["limit_chosen_on"],
                   training_slices=int(data["training_slices"]))
