"""Shared fixtures: synthetic studies are made once per session (they take seconds)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.peers import find_tool
from training.synthetic import SyntheticOptions, write_studies


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two studies (seed 11): one with bleeds, one without, each with scout and bone series."""
    root = tmp_path_factory.mktemp("synthetic")
    write_studies(
        root,
        SyntheticOptions(
            studies=2, seed=11, positive_fraction=0.5, localizer=True, bone_series=True
        ),
    )
    return root


def load_labels(study: Path) -> dict:
    return json.loads((study / "labels.json").read_text())


@pytest.fixture(scope="session")
def positive_study(synthetic_root: Path) -> Path:
    return next(s for s in sorted(synthetic_root.iterdir()) if load_labels(s)["positive"])


@pytest.fixture(scope="session")
def negative_study(synthetic_root: Path) -> Path:
    return next(s for s in sorted(synthetic_root.iterdir()) if not load_labels(s)["positive"])


def require_tool(name: str) -> str:
    """Path of a real peer program; its absence fails the test (`make test` installs it)."""
    try:
        return find_tool(name)
    except FileNotFoundError as exc:
        pytest.fail(str(exc))
