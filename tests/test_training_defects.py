"""Small training defects, each pinned: configuration ranges, the keys errors name, label
and data checks, what reports and model cards say, and the files export writes."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch

from tests.layouts import cq500_layout, rsna_layout
from tests.trainrun import write_train_config
from training.errors import ConfigError
from training.train import load_train_config, train


@pytest.mark.parametrize(("section", "key", "value", "allowed"), [
    ("optimizer", "weight_decay", -1.0, "a finite number ≥ 0"),
    ("optimizer", "momentum", 1.5, r"in \[0, 1\)"),
    ("optimizer", "momentum", -0.1, r"in \[0, 1\)"),
    ("optimizer", "lr", "nan", "a finite number > 0"),
    ("schedule", "gamma", 0.0, r"in \(0, 1\]"),
    ("schedule", "gamma", 2.0, r"in \(0, 1\]"),
])
def test_optimizer_and_schedule_values_out_of_range_name_the_key(tmp_path: Path, section: str, key: str,
                                                                 value: float | str, allowed: str) -> None:
    path = tmp_path / "train.toml"
    path.write_text(f"[{section}]\n{key} = {value}\n")
    with pytest.raises(ConfigError, match=f"{section}.{key} must be {allowed}, got"):
        load_train_config(path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_training_on_a_missing_gpu_names_training_device(tmp_path: Path) -> None:
    path = tmp_path / "train.toml"
    path.write_text(f"[training]\ndevice = \"cuda\"\n[experiment]\nfolder = \"{tmp_path}\"\n")
    with pytest.raises(ConfigError, match="^training.device is 'cuda' but no CUDA GPU is available"):
        train(load_train_config(path), progress=False)


def test_training_without_the_pretrained_parts_warns_in_the_log_and_the_run_record(
        training_prepared: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = load_train_config(write_train_config(tmp_path / "train.toml", training_prepared, tmp_path / "runs",
                                                  "random", training={"epochs": 1, "max_steps_per_epoch": 1,
                                                                      "workers": 0}))
    train(config, progress=False)
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("WARNING: ")]
    assert len(printed) == 1
    assert "model.pretrained_resnet is not set: the ResNet starts from random weights" in printed[0]
    assert "far below the paper's" in printed[0]
    recorded = json.loads((config.folder / "run.json").read_text())["warnings"]
    assert recorded == [printed[0].removeprefix("WARNING: ")]


def test_exported_files_are_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    from training.export import export
    from training.model.architectures import create_model
    from training.model.checkpoint import default_model_config, save_checkpoint

    previous = os.umask(0o022)
    try:
        checkpoint = save_checkpoint(tmp_path / "model.pt", create_model("resnet18"), default_model_config("resnet18"))
        result = export(checkpoint, tmp_path / "out", samples=1)
        os.umask(0o027)
        restricted = save_checkpoint(tmp_path / "restricted.pt", create_model("resnet18"),
                                     default_model_config("resnet18"))
    finally:
        os.umask(previous)
    for path in (checkpoint, result.onnx, result.card):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE(restricted.stat().st_mode) == 0o640


def test_a_garbage_weights_file_is_not_a_checkpoint_without_torchs_unsafe_advice(tmp_path: Path) -> None:
    from training.errors import CheckpointError
    from training.model.architectures import create_model
    from training.model.checkpoint import load_checkpoint
    from training.pretrained import file_sha256, load_pretrained_parts

    garbage = tmp_path / "model.pth"
    garbage.write_bytes(bytes(range(256)) * 8)  # a pickle opcode torch refuses, as random bytes give
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(garbage)
    assert str(refused.value).startswith(f"{garbage} is not a model checkpoint: it is not a file of tensors")
    with pytest.raises(CheckpointError) as refused_part:
        load_pretrained_parts(create_model("resnet18"), "resnet18", resnet=garbage, resnet_sha256=file_sha256(garbage))
    assert str(refused_part.value).startswith(f"{garbage} is not a PyTorch weights file: it is not a file of tensors")
    for message in (str(refused.value), str(refused_part.value)):
        assert "weights_only" not in message and "trusted source" not in message


def test_a_model_card_without_an_input_profile_says_abstention_is_off_and_promises_none() -> None:
    import dataclasses

    import numpy as np

    from training.export import model_card
    from training.model.checkpoint import default_model_config
    from training.model.inputs import InputProfile

    plain = default_model_config("resnet18")
    card = model_card(plain, checkpoint=Path("m.pt"), sha256="0" * 64)
    assert "No input profile: out-of-distribution abstention is off." in card
    assert "resemble its training inputs" not in card and "a study unlike them is NOT TRIAGED" not in card
    assert "None" not in card
    profile = InputProfile("avgpool", np.zeros(512), np.eye(512), 1.0, 2.0, "the training slices", "a test", 10)
    profiled = model_card(dataclasses.replace(plain, inputs=profile), checkpoint=Path("m.pt"), sha256="0" * 64)
    assert "resemble its training inputs" in profiled and "## Its training inputs (a study unlike them" in profiled
    assert "No input profile" not in profiled


@pytest.mark.parametrize(("rows", "message"), [
    ("ID_a_epidural,0\nID_a_subdural,1\n",
     r"has no '<image>_any' rows: each image's label comes from its ID_…_any row"),
    ("ID_a_any,0\nID_a_epidural,0\nID_a_subdural,1\n",
     r"line 4: ID_a_subdural is 1 but ID_a_any is 0 \(line 2\)"),
    ("ID_a_any,1\nID_b_any,0\nID_a_any,0\n",
     r"line 4: ID_a_any is 0, but line 2 gave it 1"),
    ("ID_a_any,1\nID_a_epidural,1\nID_a_epidural,0\n",
     r"line 4: ID_a_epidural is 0, but line 3 gave it 1"),
])
def test_labels_that_give_no_label_or_contradict_themselves_are_refused_naming_the_line(
        tmp_path: Path, rows: str, message: str) -> None:
    from training.errors import DataError
    from training.prepare import read_rsna_labels

    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\n" + rows)
    with pytest.raises(DataError, match=f"^{path} {message}"):
        read_rsna_labels(path)


def test_identical_repeated_label_rows_are_merged(tmp_path: Path) -> None:
    from training.prepare import read_rsna_labels

    path = tmp_path / "stage_2_train.csv"
    path.write_text("ID,Label\nID_a_any,1\nID_a_epidural,1\nID_a_any,1\nID_a_epidural,1\nID_b_any,0\n")
    labels = read_rsna_labels(path)
    assert labels.any == {"ID_a": 1, "ID_b": 0} and labels.subtypes == {"ID_a": ("epidural",)}
    assert labels.duplicate_rows == 1


def test_prepare_warns_with_counts_when_many_listed_images_are_missing(training_studies: Path,
                                                                       tmp_path: Path) -> None:
    from training.prepare import prepare

    present = sum(len(json.loads(path.read_text())["slices"]) for path in training_studies.glob("study_*/labels.json"))
    rsna_layout(tmp_path / "rsna", training_studies, absent=9 * present)  # 90 % of the list not downloaded
    images = tmp_path / "rsna" / "stage_2_train"
    summary = prepare(tmp_path / "rsna", tmp_path / "out", workers=1, progress=False)
    missing = [w for w in summary["warnings"] if "missing" in w]
    assert missing == [f"{9 * present} of the {10 * present} images stage_2_train.csv lists (90%) are missing "
                       f"from {images}: the lists are made from the rest (a partial download, or the wrong folder?)"]


@pytest.mark.parametrize("command", [["prepare-rsna", "--out", "{tmp}/out"],
                                     ["evaluate", "--checkpoint", "{checkpoint}", "--out", "{tmp}/out"]])
def test_a_data_folder_that_does_not_exist_is_named_as_missing(tmp_path: Path, command: list[str],
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    from node.cli import main

    checkpoint = Path(__file__).resolve().parent.parent / "models" / "effclass-synthetic-demo.pt"
    arguments = [part.format(tmp=tmp_path, checkpoint=checkpoint) for part in command]
    assert main([*arguments, "--data", str(tmp_path / "nowhere")]) == 1
    assert f"data folder {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_synthetic_phantoms_in_the_cq500_layout_are_reported_as_synthetic(training_studies: Path,
                                                                          tmp_path: Path) -> None:
    from training.datasets import load_eval_set
    from training.evaluate import data_description
    from training.model.checkpoint import default_model_config

    spec = default_model_config("resnet18").preprocess
    phantoms = load_eval_set(cq500_layout(tmp_path / "phantoms", training_studies, patients=3),
                             spec)
    assert phantoms.synthetic
    assert phantoms.description.startswith("synthetic phantoms (ichnode synth) - NOT clinical data - in the "
                                           "CQ500 layout in ")
    assert "say nothing about clinical performance" in data_description(phantoms)
    unmarked = load_eval_set(cq500_layout(tmp_path / "unmarked", training_studies, patients=3, strip_marks=True), spec)
    assert not unmarked.synthetic and unmarked.description.startswith(f"CQ500 in {tmp_path / 'unmarked'}: 3 patients")
