"""Knowing when not to answer: the input profile (training/model/inputs.py), `ichnode fit-ood`
(training/abstention.py), `ichnode ood-set` and the abstention figures of `ichnode evaluate`;
and the shipped demonstration model on studies inside and outside what it was trained on."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from training.abstention import conformal_limit, fit_gaussian
from training.evaluate import evaluate
from training.inference.predictor import Predictor
from training.inference.settings import Device
from training.model.architectures import create_model
from training.model.checkpoint import Provenance, default_model_config, load_checkpoint, save_checkpoint
from training.model.inputs import InputProfile
from training.oodset import write_ood_set
from training.synthetic import Shift, SyntheticOptions, write_studies

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "models" / "effclass-synthetic-demo.pt"


def test_the_gaussian_whitens_and_the_profile_scores_by_mahalanobis() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(6, 6))
    samples = rng.normal(size=(4000, 6)) @ mixing + 3.0
    mean, whitening = fit_gaussian(samples)
    assert np.allclose(mean, samples.mean(axis=0))
    precision = whitening @ whitening.T
    assert np.allclose(np.linalg.inv(precision), np.cov(samples.T), rtol=0.05, atol=0.05)  # little shrinkage here
    profile = InputProfile("avgpool", mean, whitening, 5.0, 50.0, "test", "test", len(samples))
    point = samples[:3]
    expected = np.sqrt(np.einsum("ij,jk,ik->i", point - mean, precision, point - mean))
    assert np.allclose(profile.slice_scores(point), expected)
    far = profile.assess([{"avgpool": mean + 50 * mixing[0]}] * 4)
    assert far.outside and far.slices == 4 and far.score > 5.0
    # One slice far out (metal near a clip) is enough, even when the mean stays inside.
    inside = [{"avgpool": mean}] * 29
    local = profile.assess(inside + [{"avgpool": mean + 100 * mixing[1]}])
    assert local.score < 5.0 < 50.0 < local.peak and local.outside and "most unusual slice" in local.reason()
    assert not profile.assess(inside).outside
    with pytest.raises(ValueError, match=r"descriptors at avgpool must be \[N, 6\]"):
        profile.slice_scores(np.zeros((2, 5)))
    with pytest.raises(ValueError, match="limit must be a positive number"):
        dataclasses.replace(profile, limit=float("nan"))


@pytest.mark.parametrize(("count", "target", "rank"), [(100, 0.01, 100), (99, 0.01, 99), (199, 0.01, 198),
                                                       (19, 0.1, 18), (9, 0.1, 9)])
def test_the_limit_is_the_conformal_rank_of_the_validation_scores(count: int, target: float, rank: int) -> None:
    scores = np.random.default_rng(count).permutation(np.arange(1.0, count + 1))
    assert conformal_limit(scores, target) == rank


def test_the_profile_travels_in_the_checkpoint(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    profile = InputProfile("avgpool", rng.normal(size=512), np.tril(rng.normal(size=(512, 512))), 2.5, 7.5,
                           "some slices", "some studies", 40)
    config = dataclasses.replace(default_model_config("resnet18"), inputs=profile)
    path = save_checkpoint(tmp_path / "m.pt", create_model("resnet18"), config)
    _, loaded = load_checkpoint(path)
    assert loaded.inputs is not None and loaded.inputs.limit == 2.5 and loaded.inputs.slice_limit == 7.5
    assert loaded.inputs.training_slices == 40
    assert np.allclose(loaded.inputs.mean, profile.mean.astype(np.float32))
    assert np.allclose(loaded.inputs.whitening, profile.whitening.astype(np.float32))
    assert loaded.scope == config.scope


@pytest.fixture(scope="module")
def fitted(tmp_path_factory: pytest.TempPathFactory, synthetic_root: Path) -> tuple[Path, Path]:
    """A random ResNet18 given a profile by `ichnode fit-ood` on synthetic studies, and its report."""
    root = tmp_path_factory.mktemp("fit-ood")
    torch.manual_seed(0)
    checkpoint = save_checkpoint(root / "r18.pt", create_model("resnet18"),
                                 default_model_config("resnet18", Provenance(training_data="synthetic")))
    write_studies(root / "validation", SyntheticOptions(studies=3, seed=12, min_slices=20, max_slices=20))
    write_studies(root / "noise", SyntheticOptions(studies=1, seed=13, shift=Shift.NOISE, min_slices=20,
                                                   max_slices=20))
    scope = root / "train.toml"
    scope.write_text('[scope]\nbody_parts = ["HEAD"]\nslice_thickness_mm = [4.0, 5.0]\nmin_coverage_mm = 60\n')
    done = subprocess.run([sys.executable, "-m", "node.cli", "fit-ood", "--checkpoint", str(checkpoint), "--data",
                           str(synthetic_root), "--validation", str(root / "validation"), "--shifted",
                           str(root / "noise"), "--scope-config", str(scope), "--out", str(root / "fitted.pt"),
                           "--report", str(root / "report"), "--device", "cpu"],
                          capture_output=True, text=True, timeout=600, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "input profile: Mahalanobis distance at avgpool (512 features)" in done.stdout
    return root / "fitted.pt", root / "report"


def test_fit_ood_writes_the_profile_the_scope_and_the_comparison(fitted: tuple[Path, Path]) -> None:
    checkpoint, report = fitted
    _, config = load_checkpoint(checkpoint)
    profile = config.inputs
    assert profile is not None and profile.layer == "avgpool" and profile.dimensions == 512
    assert "training list" not in profile.fitted_on and "synthetic phantoms" in profile.fitted_on
    assert "3 validation studies" in profile.limit_chosen_on
    assert config.scope.slice_thickness_mm == (4.0, 5.0) and config.scope.min_coverage_mm == 60
    compared = json.loads((report / "fit-ood.json").read_text())["methods"]
    assert [m["name"] for m in compared] == [
        "energy of the logits", "maximum softmax probability",
        *(f"Mahalanobis at {layer}, {how}" for layer in ("layer3", "avgpool")
          for how in ("mean", "highest slice", "mean or highest slice"))]
    for method in compared:  # each limit abstains on no more validation studies than the conformal rank allows
        assert method["validation_abstained"] == 0.0 and method["shifted"]["noise"]["studies"] == 1
    assert "| Mahalanobis at avgpool, mean or highest slice |" in (report / "fit-ood.md").read_text()
    assert profile.slice_limit > profile.limit
    assert config.provenance.metrics["input_profile"]["layer"] == "avgpool"


def test_fit_ood_refuses_to_overwrite_and_names_unknown_layers(fitted: tuple[Path, Path], synthetic_root: Path) -> None:
    checkpoint, _ = fitted
    cli = [sys.executable, "-m", "node.cli", "fit-ood", "--checkpoint", str(checkpoint), "--data", str(synthetic_root),
           "--validation", str(synthetic_root)]
    same = subprocess.run([*cli, "--out", str(checkpoint)], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert same.returncode == 1 and "--out must differ" in same.stderr
    layer = subprocess.run([*cli, "--out", str(checkpoint.with_name("x.pt")), "--layer", "bifpn"],
                           capture_output=True, text=True, timeout=300, cwd=REPO)
    assert layer.returncode == 1 and "resnet18 describes its inputs at layer3, avgpool" in layer.stderr


def test_evaluate_reports_abstention_beside_the_tables(fitted: tuple[Path, Path], tmp_path: Path) -> None:
    checkpoint, _ = fitted
    counts = write_ood_set(tmp_path / "ood", seed=14, studies_per_shift=1)
    assert counts["body"] == 1 and sum(counts.values()) == 10
    result = evaluate(checkpoint, tmp_path / "ood", tmp_path / "report", device=Device("cpu"), resamples=50,
                      progress=False)
    abstention = result.abstention_metrics
    assert abstention is not None and abstention["studies"] == 10
    kinds = abstention["by_kind"]
    assert kinds["real MR slice (pydicom)"]["not_triaged"] == 1  # no CT series
    assert kinds["real CT of the neck (pydicom-data)"]["not_triaged"] == 1  # BodyPartExamined NECK
    assert kinds["body"]["not_triaged"] == 1  # its header is silent: the images say it
    assert kinds["metal"]["not_triaged"] == 1  # clips: every slice is checked, as the node's scan does
    assert {"no_series", "not_head", "metal"} <= set(abstention["by_reason"])
    report = result.files["report"].read_text()
    assert "## Not triaged" in report and "an out-of-distribution set" in report
    metrics = json.loads(result.files["metrics"].read_text())
    assert metrics["not_triaged"]["not_triaged"] == abstention["not_triaged"]


@pytest.fixture(scope="module")
def demo() -> Predictor:
    return Predictor.from_checkpoint(DEMO, device=Device("cpu"), batch_size=8)


def test_the_demo_model_declares_its_scope_and_training_inputs(demo: Predictor) -> None:
    config = demo.config
    assert config.provenance.synthetic and config.inputs is not None and config.inputs.layer == "avgpool"
    assert config.scope.slice_thickness_mm == (4.0, 5.0)
    assert "validation studies" in config.inputs.limit_chosen_on


def _study_descriptors(predictor: Predictor, files: list[Path]) -> list[dict[str, np.ndarray]]:
    import pydicom

    return predictor.infer(predictor.prepare([pydicom.dcmread(f) for f in files])).descriptors


def test_the_demo_model_answers_for_phantoms_and_not_for_real_scans(demo: Predictor, synthetic_root: Path,
                                                                     tmp_path: Path) -> None:
    """Held-out phantoms (seed 11, never used for training or for the limit) are inside its
    training inputs; a real head CT and a very noisy phantom are not."""
    profile = demo.config.inputs
    for study in sorted(synthetic_root.iterdir()):
        assessment = profile.assess(_study_descriptors(demo, sorted((study / "HEAD").glob("*.dcm"))))
        assert not assessment.outside, (study.name, assessment)
    write_ood_set(tmp_path / "ood", seed=15, studies_per_shift=1)
    real_head = next(p.parent for p in (tmp_path / "ood").glob("study_*/labels.json")
                     if json.loads(p.read_text()).get("test_file") == "693_UNCI.dcm")
    noise = next(p.parent for p in (tmp_path / "ood").glob("study_*/labels.json")
                 if json.loads(p.read_text()).get("shift") == "noise")
    for study in (real_head, noise):
        files = sorted((study / "HEAD").glob("*.dcm"))[:12]
        assessment = profile.assess(_study_descriptors(demo, files))
        assert assessment.outside, (study.name, assessment)
