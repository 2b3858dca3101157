"""prepare-rsna, train and evaluate on small folders the tests build from synthetic DICOM."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.layouts import SUBTYPES, cq500_layout, rsna_layout
from training.model.checkpoint import load_checkpoint
from training.prepare import cache_image, prepare, read_rsna_labels, read_split
from training.synthetic import SyntheticOptions, write_studies
from training.train import learning_rate, load_train_config, train



@pytest.fixture(scope="module")
def rsna_folder(training_studies: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The RSNA 2019 layout with the real CSV format, a duplicated row, the known corrupt
    image and one more unreadable file."""
    root = tmp_path_factory.mktemp("rsna")
    images = root / "stage_2_train"
    images.mkdir()
    rows = []
    for n, labels_path in enumerate(sorted(training_studies.glob("study_*/labels.json"))):
        labels = json.loads(labels_path.read_text())
        for entry in labels["slices"]:
            image_id = f"ID_{n:02d}{entry['instance_number']:03d}abc"
            shutil.copy(labels_path.parent / entry["file"], images / f"{image_id}.dcm")
            for subtype in SUBTYPES:
                value = entry["label"] if subtype == "any" else int(subtype in entry["subtypes"])
                rows.append((f"{image_id}_{subtype}", value))
    rows.append(rows[5])  # a duplicated row, as in the real file
    (images / "ID_6431af929.dcm").write_bytes(b"\0" * 200)
    rows.extend((f"ID_6431af929_{s}", 0) for s in SUBTYPES)
    good = next(images.glob("*.dcm")).read_bytes()
    (images / "ID_broken0001.dcm").write_bytes(good[:400])  # truncated
    rows.extend((f"ID_broken0001_{s}", 0) for s in SUBTYPES)
    with open(root / "stage_2_train.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ID", "Label"])
        writer.writerows(rows)
    return root


@pytest.fixture(scope="module")
def prepared(rsna_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("prepared")
    prepare(rsna_folder, out, workers=2, progress=False)
    return out


def test_labels_from_any_rows_with_duplicates_dropped(rsna_folder: Path) -> None:
    labels = read_rsna_labels(rsna_folder / "stage_2_train.csv")
    assert labels.duplicate_rows == 1
    assert all(not k.endswith("_any") and k.startswith("ID_") for k in labels.any)
    assert set(labels.any.values()) == {0, 1}
    # Subtypes come from the other five rows of each image.
    positives = [k for k, v in labels.any.items() if v]
    assert all(labels.subtypes[k] for k in positives) and not any(labels.subtypes[k] for k in labels.any
                                                                   if not labels.any[k])


def test_prepare_splits_caches_and_reports(prepared: Path, rsna_folder: Path) -> None:
    summary = json.loads((prepared / "prepare.json").read_text())
    assert summary["layout"] == "rsna" and summary["duplicate_rows_dropped"] == 1
    # The files are ichnode's phantoms: the layout does not make them RSNA data.
    assert summary["training_data"] == "synthetic" and summary["provenance"]["stated_by"] == "the data"
    assert "known corrupt" in summary["skipped"]["ID_6431af929"]
    assert "ID_broken0001" in summary["skipped"]
    total = len(list((rsna_folder / "stage_2_train").glob("*.dcm")))
    assert summary["usable_slices"] == total - 2
    assert summary["patients"] == {"train": 4, "val": 1, "test": 1}

    splits = {name: read_split(prepared / "splits" / f"{name}.csv") for name in ("train", "val", "test", "test_full")}
    patients = {name: {r.patient_id for r in records} for name, records in splits.items()}
    assert not (patients["train"] & patients["val"]) and not (patients["train"] & patients["test"])
    assert patients["test"] <= patients["test_full"]
    for name in ("train", "val", "test"):
        labels = [r.label for r in splits[name]]
        positives = sum(labels)
        assert len(labels) - positives == min(positives, len(labels) - positives) or positives == 0
    everything = read_split(prepared / "slices.csv")
    test_patient_slices = [r for r in everything if r.patient_id in patients["test_full"]]
    assert len(splits["test_full"]) == len(test_patient_slices)
    # Slices are ordered along the slice normal within each series.
    for series in {r.series_uid for r in everything}:
        positions = [r.position for r in everything if r.series_uid == series]
        assert positions == sorted(positions)
    # The cache holds exactly what cache_image makes of the file.
    record = splits["train"][0]
    cached = np.asarray(Image.open(prepared / record.cache))
    assert cached.shape == (512, 512, 3) and cached.dtype == np.uint8
    assert record.source == f"stage_2_train/{record.image_id}.dcm"  # relative to the data folder
    np.testing.assert_array_equal(cached, cache_image(pydicom.dcmread(rsna_folder / record.source)))


def test_prepare_is_reproducible_and_resumable(prepared: Path, rsna_folder: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    shutil.copytree(prepared, again)
    victim = next((again / "cache").glob("*.png"))
    victim.unlink()
    kept = next(p for p in (again / "cache").glob("*.png"))
    kept_mtime = kept.stat().st_mtime_ns
    prepare(rsna_folder, again, workers=2, progress=False)
    assert victim.is_file()  # remade
    assert kept.stat().st_mtime_ns == kept_mtime  # not remade
    for name in ("train", "val", "test", "test_full"):
        assert (again / "splits" / f"{name}.csv").read_text() == (prepared / "splits" / f"{name}.csv").read_text()


def _train_config(tmp_path: Path, prepared: Path, **overrides: str) -> Path:
    settings = {"architecture": '"resnet18"', "optimizer": '"adamw"', "lr": "1e-3", "epochs": "4",
                "max_steps": "0", "batch_size": "4", "name": '"test"', "flips": "false"}
    settings.update(overrides)
    path = tmp_path / "train.toml"
    path.write_text(f"""
[data]
prepared = "{prepared}"
[model]
architecture = {settings['architecture']}
[optimizer]
name = {settings['optimizer']}
lr = {settings['lr']}
[training]
epochs = {settings['epochs']}
batch_size = {settings['batch_size']}
workers = 0
device = "cpu"
flips = {settings['flips']}
max_steps_per_epoch = {settings['max_steps']}
[experiment]
folder = "{tmp_path / 'experiments'}"
name = {settings['name']}
""")
    return path


def test_paper_recipe_is_the_default() -> None:
    config = load_train_config(None)
    assert (config.optimizer.name, config.optimizer.lr, config.optimizer.momentum, config.optimizer.weight_decay) == (
        "sgd", 1e-4, 0.9, 1e-3)
    assert (config.schedule.name, config.schedule.step_size, config.schedule.gamma) == ("step", 1, 0.5)
    assert (config.training.batch_size, config.training.epochs, config.training.flips) == (4, 3, True)
    assert config.model.architecture == "effclass"
    # StepLR(1, 0.5) as the authors' code steps it: once per epoch, whatever the epoch's length.
    assert [learning_rate(config, step, steps_per_epoch=10) for step in (0, 9, 10, 25)] == [1e-4, 1e-4, 5e-5, 2.5e-5]


def test_training_lowers_the_loss_and_writes_a_checkpoint(training_prepared: Path, tmp_path: Path) -> None:
    config = load_train_config(_train_config(tmp_path, training_prepared, epochs="3"))
    result = train(config, progress=False)
    losses = [h["train_loss"] for h in result.history]
    assert len(losses) == 3 and losses[-1] < losses[0]
    model, model_config = load_checkpoint(result.checkpoint, architecture="resnet18")
    assert model_config.provenance.training_data == "synthetic" and model_config.provenance.synthetic
    assert "validation split" in model_config.provenance.metrics["measured_on"]
    folder = result.checkpoint.parent
    for name in ("config.json", "run.json", "metrics.json", "steps.csv", "curves.png", "model.pt", "state",
                 "tensorboard"):
        assert (folder / name).exists(), name
    assert json.loads((folder / "metrics.json").read_text())["best_epoch"] == result.best_epoch


def test_effclass_trains_a_step_on_the_cpu(training_prepared: Path, tmp_path: Path) -> None:
    config = load_train_config(_train_config(tmp_path, training_prepared, architecture='"effclass"', epochs="1",
                                             max_steps="1", batch_size="2", optimizer='"sgd"', lr="1e-4"))
    result = train(config, progress=False)
    assert load_checkpoint(result.checkpoint, architecture="effclass")[1].preprocess.input_size == 512


def test_batchnorm_statistics_are_recomputed_exactly() -> None:
    import torch

    from training.train import _recompute_batchnorm

    norm = torch.nn.BatchNorm2d(3, momentum=0.01)
    generator = torch.Generator().manual_seed(0)
    batches = [(torch.randn(4, 3, 5, 5, generator=generator) * 3 + 7, torch.zeros(4)) for _ in range(3)]
    _recompute_batchnorm(norm, batches, torch.device("cpu"), batches=2)
    seen = torch.cat([x for x, _ in batches[:2]])
    torch.testing.assert_close(norm.running_mean, seen.mean(dim=(0, 2, 3)))
    assert norm.momentum == 0.01 and int(norm.num_batches_tracked) == 2


def test_bad_training_config_names_the_key(tmp_path: Path) -> None:
    from node.errors import ConfigError

    path = tmp_path / "bad.toml"
    path.write_text("[optimizer]\nname = \"rmsprop\"\n")
    with pytest.raises(ConfigError, match="optimizer.name must be sgd or adamw"):
        load_train_config(path)
    path.write_text("[training]\nepochz = 3\n")
    with pytest.raises(ConfigError, match="unknown key training.epochz"):
        load_train_config(path)


def test_evaluate_writes_both_tables(training_prepared: Path, training_studies: Path, reference_run: Path,
                                    tmp_path: Path) -> None:
    from training.metrics import roc_auc

    checkpoint = reference_run / "model.pt"
    cli = [sys.executable, "-m", "node.cli", "evaluate", "--checkpoint", str(checkpoint), "--device", "cpu",
           "--resamples", "200"]
    for data, name, interval in ((training_prepared, "prepared", "wilson"),
                                 (training_studies, "studies", "clopper-pearson")):
        out = tmp_path / name
        result = subprocess.run([*cli, "--data", str(data), "--out", str(out), "--interval", interval],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr
        report = (out / "report.md").read_text()
        assert "synthetic" in report.lower() and "NOT clinical data" in report
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["slice_level"] is not None and metrics["patient_level"] is not None
        # Lesion masks exist for `ichnode synth` folders only, not for a prepared cache.
        assert (metrics["gradcam_localisation"] is not None) == (name == "studies")
        method = {"wilson": "Wilson", "clopper-pearson": "Clopper-Pearson"}[interval]
        assert metrics["slice_level"]["thresholds"]["0.5"]["sensitivity"]["method"] == method
        assert metrics["patient_level"]["rules"]["5%"]["specificity"]["method"] == method
        # Calibration and the reliability plot; sensitivity per subtype (both layouts know them).
        calibration = metrics["calibration"]
        assert 0 <= calibration["brier"]["estimate"] <= 1 and 0 <= calibration["ece"]["estimate"] <= 1
        assert sum(b["n"] for b in calibration["reliability"]) == metrics["slice_level"]["n"]
        assert (out / "reliability.png").is_file() and "## Calibration" in report
        assert metrics["subtype_sensitivity"] and "## Sensitivity by bleed subtype" in report
        # Every synthetic study folder has far more normal slices than bleeding ones.
        if name == "studies":
            assert any("slice-level list is unbalanced" in w for w in metrics["warnings"])
            assert "warning: the slice-level list is unbalanced" in result.stdout
        # predictions.csv holds the probabilities as computed: the AUC recomputed from it is the one reported.
        with open(out / "predictions.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert any(len(r["probability"].split(".")[-1]) > 6 for r in rows)
        if name == "prepared":
            listed = {r.image_id for r in read_split(data / "splits" / "test.csv")}
            chosen = [r for r in rows if r["image_id"] in listed]
            recomputed = roc_auc(np.array([int(r["label"]) for r in chosen]),
                                 np.array([float(r["probability"]) for r in chosen]))
            assert recomputed == metrics["slice_level"]["roc_auc"]["estimate"]


def test_evaluate_reads_the_cq500_layout(training_studies: Path, tmp_path: Path) -> None:
    from training.model.checkpoint import default_model_config, save_checkpoint
    from training.evaluate import evaluate
    from training.model.architectures import create_model

    root = cq500_layout(tmp_path / "cq500", training_studies, patients=4, third_reader_disagrees=True)
    checkpoint = save_checkpoint(tmp_path / "r18.pt", create_model("resnet18"), default_model_config("resnet18"))
    result = evaluate(checkpoint, root, tmp_path / "out", device="cpu", resamples=100, progress=False)
    assert result.slice_metrics is None  # CQ500 has no slice labels
    assert result.patient_metrics["n"] == 4
    assert "CQ500" in (tmp_path / "out" / "report.md").read_text()


def test_two_process_ddp_smoke_run(training_prepared: Path, tmp_path: Path) -> None:
    config = _train_config(tmp_path, training_prepared, epochs="1", max_steps="2", name='"ddp"')
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
         str(_free_port()), "-m", "node.cli", "train", "--config", str(config)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = tmp_path / "experiments" / "ddp" / "model.pt"
    assert load_checkpoint(checkpoint)[1].architecture == "resnet18"
    history = json.loads((checkpoint.parent / "metrics.json").read_text())["history"]
    assert history[0]["train_slices_seen"] == 2 * 2 * 4  # two processes × two steps × batch 4


def _free_port() -> int:
    from tests.peers import free_port

    return free_port()


def test_what_the_data_is_comes_from_the_files(training_studies: Path, tmp_path: Path) -> None:
    from node.errors import DataError

    marked = rsna_layout(tmp_path / "marked", training_studies, strip_marks=False, rsna_identity=True)
    with pytest.raises(DataError, match="synthetic phantoms .* never 'rsna'"):
        prepare(marked, tmp_path / "p1", workers=2, progress=False, training_data="rsna")
    with pytest.raises(DataError, match="never 'other'"):
        prepare(marked, tmp_path / "p1", workers=2, progress=False, training_data="other")
    assert prepare(marked, tmp_path / "p1", workers=2, progress=False)["training_data"] == "synthetic"

    unmarked = rsna_layout(tmp_path / "unmarked", training_studies, strip_marks=True, rsna_identity=True)
    assert prepare(unmarked, tmp_path / "p2", workers=2, progress=False)["training_data"] == "rsna"
    other = rsna_layout(tmp_path / "other", training_studies, strip_marks=True, rsna_identity=False)
    summary = prepare(other, tmp_path / "p3", workers=2, progress=False)
    assert summary["training_data"] == "other" and summary["provenance"]["derived_from_data"] == "other"
    stated = prepare(other, tmp_path / "p3", workers=2, progress=False, training_data="rsna")
    assert stated["training_data"] == "rsna" and stated["provenance"]["stated_by"] == "user"
    # Subtypes from the CSV reach the split lists.
    positives = [r for r in read_split(tmp_path / "p3" / "splits" / "train.csv") if r.label]
    assert positives and all(r.subtypes for r in positives)


def test_a_reused_folder_is_rebuilt_from_the_new_data_never_mixed(training_prepared: Path, tmp_path: Path) -> None:
    out = tmp_path / "reused"
    shutil.copytree(training_prepared, out)
    other = tmp_path / "other_studies"
    # Another data set with the same study and slice names (study_0000_0001, …).
    write_studies(other, SyntheticOptions(studies=6, seed=21, positive_fraction=0.5, min_slices=10, max_slices=12))
    summary = prepare(other, out, workers=2, progress=False)
    assert summary["cache_reused"] == 0 and summary["cache_made"] == summary["cached_slices"]
    assert summary["cache_removed"] > 0  # the first data set's images that no list uses now
    for name in ("train", "val", "test", "val_full", "test_full"):
        for record in read_split(out / "splits" / f"{name}.csv"):
            assert (other / record.source).is_file()
            cached = np.asarray(Image.open(out / record.cache))
            np.testing.assert_array_equal(cached, cache_image(pydicom.dcmread(other / record.source)),
                                          err_msg=record.image_id)
    assert {p.name for p in (out / "cache").glob("*.png")} == {
        Path(r.cache).name for name in ("train", "val", "test", "val_full", "test_full")
        for r in read_split(out / "splits" / f"{name}.csv")}
    # The same data again: everything is reused.
    assert prepare(other, out, workers=2, progress=False)["cache_made"] == 0


def test_a_label_that_is_not_0_or_1_names_its_line(tmp_path: Path) -> None:
    from node.cli import main

    (tmp_path / "stage_2_train").mkdir()
    (tmp_path / "stage_2_train.csv").write_text("ID,Label\nID_a_epidural,0\nID_a_any,0\nID_b_any,yes\n")
    with pytest.raises(Exception, match=r"stage_2_train.csv line 4: the label of ID_b_any is 'yes', not 0 or 1"):
        read_rsna_labels(tmp_path / "stage_2_train.csv")
    assert main(["prepare-rsna", "--data", str(tmp_path), "--out", str(tmp_path / "out")]) == 1


def test_choices_read_the_validation_patients_and_reports_the_test_patients(training_prepared: Path) -> None:
    """calibrate and fit-ood choose on the validation split; evaluate reports the test split."""
    from training.datasets import load_eval_set
    from training.model.preprocess import PreprocessSpec

    spec = PreprocessSpec(input_size=224)
    chosen_on, reported_on = (load_eval_set(training_prepared, spec, split=s) for s in ("val", "test"))
    assert "validation split" in chosen_on.description and "held-out test split" in reported_on.description
    assert {s.study_id for s in chosen_on.studies} == {r.patient_id for r in read_split(
        training_prepared / "splits" / "val_full.csv")}
    assert not {s.study_id for s in chosen_on.studies} & {s.study_id for s in reported_on.studies}
