"""Small training runs for the tests: a ResNet18 baseline at 224² (the cheapest model that
runs the real training code) on a few synthetic slices, batch 2, with DataLoader workers."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

# Two epochs of four steps: enough to cross an epoch and a schedule, a few seconds a step.
REFERENCE: dict[str, dict[str, Any]] = {
    "model": {"architecture": "resnet18"},
    "optimizer": {"name": "sgd", "lr": 1e-3},
    "schedule": {"name": "cosine"},
    "training": {"epochs": 2, "batch_size": 2, "workers": 2, "device": "cpu", "flips": True,
                 "max_steps_per_epoch": 4, "checkpoint_every_steps": 3, "keep_checkpoints": 2,
                 "deterministic": True},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_train_config(path: Path, prepared: Path, experiments: Path, name: str,
                       **changes: dict[str, Any]) -> Path:
    """A train.toml: REFERENCE with `changes` (section → keys) on top."""
    sections = copy.deepcopy(REFERENCE)
    sections["data"] = {"prepared": str(prepared)}
    sections["experiment"] = {"folder": str(experiments), "name": name}
    for section, keys in changes.items():
        sections.setdefault(section, {}).update(keys)
    lines = []
    for section, keys in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in keys.items())
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
