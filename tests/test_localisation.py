"""Grad-CAM localisation: the pure geometry, and the metric `ichnode evaluate` reports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from node.errors import ConfigError
from training.model.checkpoint import default_model_config
from training.datasets import load_eval_set
from training.evaluate import localisation_metrics
from training.localisation import dilate, mask_to_input, peak_inside
from training.model.architectures import architecture_spec, available_models, create_model
from training.inference.predictor import Predictor
from training.model.layers import GradcamLayer
from training.model.rule import key_slice_indices
from training.synthetic import read_mask


def test_square_mask_keeps_its_pixels() -> None:
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[2:4, 5:7] = 4  # any subtype bit counts
    np.testing.assert_array_equal(mask_to_input(mask, 8), mask != 0)


def test_wide_mask_is_padded_like_the_image() -> None:
    mask = np.zeros((4, 8), dtype=bool)
    mask[0, 0] = True  # top-left of a 4-row image: row 2 of the centred 8×8 square
    on_input = mask_to_input(mask, 8)
    assert on_input[2, 0] and on_input.sum() == 1


def test_dilation_reaches_the_radius_and_no_further() -> None:
    mask = np.zeros((21, 21), dtype=bool)
    mask[10, 10] = True
    grown = dilate(mask, 3.0)
    assert grown[10, 13] and grown[7, 10] and not grown[10, 14] and not grown[13, 13]
    assert not dilate(np.zeros((5, 5), dtype=bool), 3.0).any()


def test_gradcam_cell_is_measured_from_the_model() -> None:
    predictor = Predictor(create_model("resnet18"), default_model_config("resnet18"), device="cpu")
    assert predictor.gradcam_cell_pixels() == pytest.approx(32.0)  # 224 input, 7 × 7 at layer4
    finer = Predictor(create_model("resnet18"), default_model_config("resnet18"), device="cpu",
                      gradcam_layer="layer3")
    assert finer.gradcam_cell_pixels() == pytest.approx(16.0)
    assert finer.gradcam(np.zeros((1, 3, 224, 224), dtype=np.float32)).shape == (1, 224, 224)


def test_auto_layer_is_the_architectures_best() -> None:
    baseline = Predictor(create_model("resnet18"), default_model_config("resnet18"), device="cpu")
    assert baseline.gradcam_layer == "layer4"
    effclass = Predictor(create_model("effclass"), default_model_config("effclass"), device="cpu")
    assert effclass.gradcam_layer == "bifpn_p3"
    assert effclass.gradcam_cell_pixels() == pytest.approx(8.0)  # P3: 64 × 64 over 512 pixels


def test_a_layer_the_architecture_lacks_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"'bifpn_p3' \(explain.gradcam_layer\) does not exist in 'resnet18'; "
                                          r"it has layer4, layer3"):
        Predictor(create_model("resnet18"), default_model_config("resnet18"), device="cpu",
                  gradcam_layer="bifpn_p3")


def test_config_accepts_exactly_the_registrys_layers() -> None:
    registry = {layer for name in available_models() for layer in architecture_spec(name).gradcam_layers}
    assert set(GradcamLayer) == registry | {GradcamLayer.AUTO}


def test_peak_inside_uses_the_hottest_pixel() -> None:
    cam = np.zeros((6, 6), dtype=np.float32)
    cam[1, 4] = 1.0
    region = np.zeros((6, 6), dtype=bool)
    region[1, 4] = True
    assert peak_inside(cam, region)
    assert not peak_inside(cam, ~region)
    with pytest.raises(ValueError, match="differ in shape"):
        peak_inside(cam, region[:5])


class _FixedCams:
    """A stand-in for Predictor.gradcam that returns prepared maps in call order."""

    def __init__(self, cams: list[np.ndarray]) -> None:
        self.config = default_model_config("effclass")
        self.gradcam_layer = "layer4"
        self.cams = list(cams)

    def gradcam_cell_pixels(self) -> float:
        return 512 / 7

    def prepare_slice(self, _ds: object) -> np.ndarray:
        return np.zeros((3, 512, 512), dtype=np.float32)

    def gradcam(self, inputs: np.ndarray) -> np.ndarray:
        taken, self.cams = self.cams[: len(inputs)], self.cams[len(inputs):]
        return np.stack(taken)


def _peak_at(row: int, column: int, size: int = 512) -> np.ndarray:
    cam = np.zeros((size, size), dtype=np.float32)
    cam[row, column] = 1.0
    return cam


def test_metric_counts_true_positive_key_slices(positive_study: Path) -> None:
    root = positive_study.parent
    spec = default_model_config("effclass").preprocess
    eval_set = load_eval_set(root, spec)
    study = next(s for s in eval_set.studies if s.label == 1)
    # Perfect probabilities: every bleeding slice 0.9 (above 0.8), the rest 0.1.
    probabilities = {s.image_id: (0.9 if s.label else 0.1) for st in eval_set.studies for s in st.slices}
    p = np.array([probabilities[s.image_id] for s in study.slices])
    chosen = [i for i in key_slice_indices(p, 3) if study.slices[i].label == 1]
    masks = read_mask(positive_study)
    inside = [np.argwhere(masks[i] != 0)[0] for i in chosen]

    hits = localisation_metrics(_FixedCams([_peak_at(*rc) for rc in inside]), eval_set, probabilities,
                                slice_threshold=0.8)
    assert hits["true_positive_key_slices"] == len(chosen) > 0
    assert hits["peak_inside"] == len(chosen) and hits["positive_studies"] == 1
    misses = localisation_metrics(_FixedCams([_peak_at(0, 0)] * len(chosen)), eval_set, probabilities,
                                  slice_threshold=0.8)
    assert misses["peak_inside"] == 0 and misses["fraction"]["estimate"] == 0.0


def test_metric_is_absent_without_masks(positive_study: Path) -> None:
    eval_set = load_eval_set(positive_study.parent, default_model_config("effclass").preprocess)
    no_masks = type(eval_set)(eval_set.description, True, eval_set.slice_level,
                              [type(s)(s.study_id, s.label, s.slices) for s in eval_set.studies])
    assert localisation_metrics(_FixedCams([]), no_masks, {}, slice_threshold=0.8) is None
