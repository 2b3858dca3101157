"""The `ichnode` command line: the contract's commands, honest about what is not built."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from node.cli import main

CONTRACT = ["serve", "worker", "log", "status", "retry", "synth", "train", "evaluate"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_contract_command() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in CONTRACT:
        assert command in result.stdout


def test_synth_help() -> None:
    result = _run("synth", "--help")
    assert result.returncode == 0
    for option in ("--out", "--studies", "--seed", "--positive-fraction", "--localizer", "--bone-series"):
        assert option in result.stdout


@pytest.mark.parametrize("command", ["serve", "worker", "log", "status", "retry", "train", "evaluate"])
def test_unbuilt_commands_say_so_and_fail(command: str, capsys: pytest.CaptureFixture) -> None:
    assert main([command]) == 2
    assert "not available yet" in capsys.readouterr().err


def test_synth_writes_studies(tmp_path: Path) -> None:
    result = _run("synth", "--out", str(tmp_path), "--studies", "1", "--seed", "2",
                  "--positive-fraction", "1")
    assert result.returncode == 0, result.stderr
    assert "1 with bleeds" in result.stdout and "SYNTHETIC" in result.stdout
    assert (tmp_path / "study_0000" / "labels.json").is_file()
    assert len(list((tmp_path / "study_0000" / "HEAD").glob("*.dcm"))) >= 20


def test_synth_bad_option_is_a_clear_error(tmp_path: Path) -> None:
    result = _run("synth", "--out", str(tmp_path), "--studies", "0")
    assert result.returncode == 1
    assert "--studies must be ≥ 1" in result.stderr and "Traceback" not in result.stderr
