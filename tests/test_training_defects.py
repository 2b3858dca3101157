"""Small training defects, each pinned: configuration ranges, the keys errors name, label
and data checks, what reports and model cards say, and the files export writes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

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
