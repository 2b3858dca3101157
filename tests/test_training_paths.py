"""Prepared folders do not depend on the working directory or on where the data is mounted:
the lists name each DICOM file relative to the data folder, and whoever reads them looks
for the files under the data folder given now (or the one recorded), saying so when one
is missing."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from node.errors import DataError
from tests.layouts import rsna_layout
from tests.trainrun import write_train_config
from training.datasets import load_eval_set, load_training_slices
from training.prepare import FIELDS, prepare, read_split

LISTS = ("train", "val", "test", "val_full", "test_full")


def _lists(prepared: Path) -> dict[str, bytes]:
    return {name: (prepared / "splits" / f"{name}.csv").read_bytes() for name in LISTS}


@pytest.fixture
def layout(training_studies: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Data at mount_a/rsna, prepared from work1 with a relative --data."""
    data = rsna_layout(tmp_path / "mount_a" / "rsna", training_studies)
    prepared = tmp_path / "prepared"
    for name in ("work1", "work2", "work3"):
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "work1")
    prepare(Path("../mount_a/rsna"), prepared, workers=2, progress=False)
    return {"root": tmp_path, "data": data, "prepared": prepared}


def _checkpoint(folder: Path) -> Path:
    from training.model.architectures import create_model
    from training.model.checkpoint import default_model_config, save_checkpoint

    return save_checkpoint(folder / "r18.pt", create_model("resnet18"), default_model_config("resnet18"))


def test_sources_are_relative_to_the_data_folder_which_is_recorded(layout: dict[str, Path]) -> None:
    summary = json.loads((layout["prepared"] / "prepare.json").read_text())
    assert summary["data"] == str(layout["data"].resolve()) and summary["source_paths"] == "relative to data"
    for name in LISTS:
        for record in read_split(layout["prepared"] / "splits" / f"{name}.csv"):
            assert record.source == f"stage_2_train/{record.image_id}.dcm"
    journal = [json.loads(line) for line in (layout["prepared"] / "headers.jsonl").read_text().splitlines()]
    assert journal and all(entry["source"].startswith("stage_2_train/") for entry in journal)


def test_evaluate_from_another_folder_finds_the_sources_and_checks_scope(
        layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from training.evaluate import evaluate

    monkeypatch.chdir(layout["root"] / "work2")
    eval_set = load_eval_set(layout["prepared"], _spec())
    sources = [s.source for study in eval_set.studies for s in study.slices]
    assert sources and all(path.is_absolute() and path.is_file() for path in sources)
    assert all(path.parent == layout["data"].resolve() / "stage_2_train" for path in sources)
    result = evaluate(_checkpoint(layout["root"]), layout["prepared"], layout["root"] / "eval", device="cpu",
                      resamples=50, progress=False)
    assert result.abstention_metrics["studies"] >= 1
    assert result.abstention_metrics["scope_not_checked"] == 0
    assert not [w for w in result.warnings if "scope checks" in w]


def test_moved_data_reuses_the_cache_and_resumes(layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from training.train import load_train_config, train

    root, prepared = layout["root"], layout["prepared"]
    config_path = write_train_config(root / "train.toml", prepared, root / "experiments", "moved",
                                     training={"epochs": 1, "max_steps_per_epoch": 2, "checkpoint_every_steps": 1,
                                               "workers": 0})
    train(load_train_config(config_path), progress=False)
    before = _lists(prepared)
    stamps = {path.name: path.stat().st_mtime_ns for path in (prepared / "cache").glob("*.png")}

    # The data mounted elsewhere (a move keeps modification times, as rsync -a does), prepared
    # again from another working directory.
    (root / "mount_b").mkdir()
    os.rename(layout["data"], root / "mount_b" / "data")
    monkeypatch.chdir(root / "work3")
    summary = prepare(Path("../mount_b/data"), prepared, workers=2, progress=False)
    assert summary["cache_made"] == 0 and summary["cache_reused"] == summary["cached_slices"] > 0
    assert summary["data"] == str((root / "mount_b" / "data").resolve())
    assert _lists(prepared) == before
    assert {path.name: path.stat().st_mtime_ns for path in (prepared / "cache").glob("*.png")} == stamps

    config_path = write_train_config(root / "train.toml", prepared, root / "experiments", "moved",
                                     training={"epochs": 2, "max_steps_per_epoch": 2, "checkpoint_every_steps": 1,
                                               "workers": 0})
    result = train(load_train_config(config_path), resume=True, progress=False)
    assert result.checkpoint.is_file()
    run = json.loads((root / "experiments" / "moved" / "run.json").read_text())
    assert len(run["segments"]) == 2  # the start and the resume


def test_a_missing_source_is_reported_with_the_folder_it_was_looked_for_in(
        layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from node.cli import main

    root, prepared = layout["root"], layout["prepared"]
    moved = root / "mount_b" / "data"
    moved.parent.mkdir()
    os.rename(layout["data"], moved)
    monkeypatch.chdir(root / "work2")
    checkpoint = _checkpoint(root)
    cli = ["evaluate", "--checkpoint", str(checkpoint), "--data", str(prepared), "--device", "cpu",
           "--resamples", "50"]
    # Not where it was prepared from: every file is reported missing, naming the recorded folder.
    assert main([*cli, "--out", str(root / "eval_missing")]) == 0
    metrics = json.loads((root / "eval_missing" / "metrics.json").read_text())
    [warning] = [w for w in metrics["warnings"] if "scope checks were not run" in w]
    studies = metrics["not_triaged"]["studies"]
    assert f"not run on {studies} of {studies} studies" in warning
    assert str(layout["data"].resolve()) in warning and "recorded by prepare-rsna" in warning
    assert "--data-root" in warning and str(layout["data"].resolve() / "stage_2_train") in warning
    assert metrics["not_triaged"]["scope_not_checked"] == studies
    assert "warning: the node's scope checks were not run" in capsys.readouterr().out

    # Given where the data is now: checked; one file removed is named, with its count.
    test_full = read_split(prepared / "splits" / "test_full.csv")
    (moved / test_full[0].source).unlink()
    assert main([*cli, "--data-root", "../mount_b/data", "--out", str(root / "eval_one")]) == 0
    metrics = json.loads((root / "eval_one" / "metrics.json").read_text())
    [warning] = [w for w in metrics["warnings"] if "scope checks were not run" in w]
    assert "1 of their DICOM files were not found" in warning
    assert str(moved.resolve() / test_full[0].source) in warning and "(given)" in warning
    assert metrics["not_triaged"]["scope_not_checked"] == 1


def test_an_earlier_folders_sources_are_converted_on_read(layout: dict[str, Path],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Lists written before sources were relative held the paths as given to prepare-rsna."""
    prepared = layout["prepared"]
    summary = json.loads((prepared / "prepare.json").read_text())
    del summary["source_paths"]
    (prepared / "prepare.json").write_text(json.dumps(summary))
    for name in LISTS:
        records = read_split(prepared / "splits" / f"{name}.csv")
        with open(prepared / "splits" / f"{name}.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=FIELDS)
            writer.writeheader()
            for record in records:
                row = {key: getattr(record, key) for key in FIELDS}
                writer.writerow({**row, "source": f"../mount_a/rsna/{record.source}"})  # relative to work1
    monkeypatch.chdir(layout["root"] / "work2")
    eval_set = load_eval_set(prepared, _spec())
    assert all(s.source.is_file() and s.source.parent == layout["data"].resolve() / "stage_2_train"
               for study in eval_set.studies for s in study.slices)
    training = load_training_slices(prepared, _spec())
    assert all(s.source.is_file() for s in training.slice_level)

    rows = list(csv.DictReader(open(prepared / "splits" / "test_full.csv", newline="")))
    rows[0]["source"] = "elsewhere.dcm"
    with open(prepared / "splits" / "test_full.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DataError, match="'elsewhere.dcm' .* run `ichnode prepare-rsna` again"):
        load_eval_set(prepared, _spec())


def test_a_data_folder_that_does_not_exist_is_named(layout: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture) -> None:
    from node.cli import main

    monkeypatch.chdir(layout["root"] / "work2")
    assert main(["prepare-rsna", "--data", "no_such_folder", "--out", "out"]) == 1
    error = capsys.readouterr().err
    assert "no_such_folder does not exist (relative to the working directory" in error
    assert "holds neither" not in error
    with pytest.raises(DataError, match="no_such_folder does not exist"):
        load_eval_set(Path("no_such_folder"), _spec())
    with pytest.raises(DataError, match="the data folder gone given for the sources of .* does not exist"):
        load_eval_set(layout["prepared"], _spec(), data_root=Path("gone"))
    with pytest.raises(DataError, match="for a folder made by `ichnode prepare-rsna`"):
        load_eval_set(layout["data"], _spec(), data_root=layout["data"])


def _spec():
    from training.model.checkpoint import default_model_config

    return default_model_config("resnet18").preprocess
