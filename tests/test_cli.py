"""The `ichnode` command line: the contract's commands and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest



CONTRACT = ["serve", "worker", "log", "status", "retry", "synth", "train", "evaluate", "prepare-rsna"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_contract_command() -> None:
    result = _run("--help")
    assert result.returncode == 0
    for command in CONTRACT:
        assert command in result.stdout


@pytest.mark.parametrize("command", CONTRACT)
def test_every_command_has_help(command: str) -> None:
    result = _run(command, "--help")
    assert result.returncode == 0 and "usage: ichnode" in result.stdout, result.stderr


def test_synth_help() -> None:
    result = _run("synth", "--help")
    assert result.returncode == 0
    for option in ("--out", "--studies", "--seed", "--positive-fraction", "--localizer", "--bone-series"):
        assert option in result.stdout


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


def test_worker_without_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}/store"\ndatabase_url = "sqlite:///{tmp_path}/n.db"\n')
    result = _run("worker", "--config", str(config))
    assert result.returncode == 1
    assert "ichnode worker needs a model" in result.stderr and "Traceback" not in result.stderr


def test_bad_config_names_file_and_key(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text("[node]\nport = 99999\n")
    result = _run("status", "--config", str(config))
    assert result.returncode == 1
    assert str(config) in result.stderr and "node.port" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = _run("serve", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1 and "not found" in result.stderr


def test_retry_requeues_failed_deliveries(tmp_path: Path) -> None:
    from storage.db import Database, Delivery, DeliveryState, Study, StudyState, utcnow

    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}/store"\ndatabase_url = "sqlite:///{tmp_path}/n.db"\n')
    database = Database(f"sqlite:///{tmp_path}/n.db", create=True)
    with database.write() as session:
        study = Study(study_instance_uid="1.2.3", state=StudyState.DONE, first_received_at=utcnow(),
                      last_received_at=utcnow())
        session.add(study)
        session.flush()
        session.add(Delivery(study_id=study.id, destination="pacs", kind="sc", result_folder="r",
                             state=DeliveryState.FAILED, attempts=8, next_attempt_at=utcnow(),
                             last_error="PACS could not be reached"))
    result = _run("retry", "--config", str(config))
    assert result.returncode == 0 and "re-queued 1 failed deliveries and 0 failed notifications" in result.stdout
    with database.read() as session:
        delivery = session.query(Delivery).one()
        assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0
    status = _run("status", "--config", str(config))
    assert "pending 1" in status.stdout and "done 1" in status.stdout
