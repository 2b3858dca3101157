"""Small training defects, each pinned: configuration ranges, the keys errors name, label
and data checks, what reports and model cards say, and the files export writes."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.errors import ConfigError
from training.train import load_train_config


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
