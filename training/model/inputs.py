"""The checkpoint's description of its training inputs, and how far a study lies from it.

A classifier gives confident probabilities on anything, a phantom-trained one on every
real scan: the probability itself cannot say that an input is unlike what the model
learnt from. The profile can. It holds a Gaussian of one layer's channel means over the
training slices (mean and the Cholesky factor of a shrunk precision matrix); a slice's
score is its Mahalanobis distance from that Gaussian, a study's the mean over its slices,
and a study scoring above `limit` (fixed on validation studies the model was not trained
on) is outside the training inputs: not triaged. Which layer and why is measured by
`ichnode fit-ood` (docs/training.md). Pure numpy: the node and `ichnode evaluate` score
studies the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["METHOD", "InputProfile", "Assessment"]

METHOD = "mahalanobis"  # the only scoring method a profile holds; others are compared in fitting


@dataclass(frozen=True)
class Assessment:
    """One study against the profile."""

    score: float  # mean Mahalanobis distance of its slices
    limit: float  # above this: outside the training inputs
    layer: str
    slices: int

    @property
    def outside(self) -> bool:
        return self.score > self.limit

    def describe(self) -> str:
        return f"mean Mahalanobis distance of {self.slices} slices from the training slices at the model's {self.layer}"

    def reason(self) -> str:
        """Why the study is not triaged, for the log and the result."""
        return (f"the images lie outside this model's training inputs: out-of-distribution score {self.score:.2f} "
                f"is above {self.limit:.2f}, the limit fixed on validation studies")

    def as_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 4), "limit": round(self.limit, 4), "outside": self.outside,
                "layer": self.layer, "slices": self.slices, "method": METHOD}


@dataclass(frozen=True, eq=False)
class InputProfile:
    """A Gaussian of the training slices' descriptors at one layer, and the study limit."""

    layer: str  # the descriptor layer (training.model.architectures.descriptor_modules)
    mean: np.ndarray  # [D]
    whitening: np.ndarray  # [D, D]: distance = |whitening.T @ (x - mean)|, whitening @ whitening.T = precision
    limit: float  # study score above which a study is not triaged
    fitted_on: str  # which slices the Gaussian describes
    limit_chosen_on: str  # which studies fixed the limit, and how
    training_slices: int

    def __post_init__(self) -> None:
        mean = np.asarray(self.mean, dtype=np.float64)
        whitening = np.asarray(self.whitening, dtype=np.float64)
        if mean.ndim != 1 or whitening.shape != (mean.size, mean.size):
            raise ValueError(f"an input profile needs mean [D] and whitening [D, D], got {mean.shape} and "
                             f"{whitening.shape}")
        if not np.isfinite(self.limit) or self.limit <= 0:
            raise ValueError(f"an input profile's limit must be a positive number, got {self.limit}")
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
        return np.linalg.norm((descriptors - self.mean) @ self.whitening, axis=1)

    def study_score(self, descriptors: np.ndarray) -> float:
        return float(np.mean(self.slice_scores(descriptors)))

    def assess(self, descriptors: list[dict[str, np.ndarray]]) -> Assessment:
        """One study, from each slice's descriptors (as the inference pass returns them)."""
        if not descriptors:
            raise ValueError("a study needs at least one slice to be assessed")
        values = np.stack([d[self.layer] for d in descriptors])
        return Assessment(self.study_score(values), self.limit, self.layer, len(descriptors))

    def describe(self) -> str:
        return (f"Mahalanobis distance at {self.layer} ({self.dimensions} features) from {self.training_slices} "
                f"training slices; not triaged above {self.limit:.2f} ({self.limit_chosen_on})")

    def to_dict(self) -> dict[str, Any]:
        return {"method": METHOD, "layer": self.layer, "mean": self.mean.astype(np.float32),
                "whitening": self.whitening.astype(np.float32), "limit": self.limit, "fitted_on": self.fitted_on,
                "limit_chosen_on": self.limit_chosen_on, "training_slices": self.training_slices}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InputProfile":
        if data.get("method") != METHOD:
            raise ValueError(f"input profile method {data.get('method')!r} is not {METHOD!r}")
        return cls(layer=data["layer"], mean=np.asarray(data["mean"]), whitening=np.asarray(data["whitening"]),
                   limit=float(data["limit"]), fitted_on=data["fitted_on"], limit_chosen_on=data["limit_chosen_on"],
                   training_slices=int(data["training_slices"]))
