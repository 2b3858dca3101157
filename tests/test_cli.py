"""The `ichnode` command line: the contract's commands and clear errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest



CONTRACT = ["serve", "worker", "log", "status", "retry", "reanalyse", "synth", "train", "evaluate", "prepare-rsna"]


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


def test_version_is_the_release_in_the_package_metadata() -> None:
    from importlib import metadata

    result = _run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ichnode {metadata.version('ichnode')}"


# What `--help`, `--version` and `status` must never load: each takes seconds to import.
MODEL_LIBRARIES = ("torch", "torchvision", "timm", "effdet", "onnxruntime", "highdicom", "matplotlib")


def _model_libraries_loaded(argv: list[str] | None) -> list[str]:
    """The model libraries a fresh interpreter holds after importing the CLI and, unless
    `argv` is None, running `main(argv)`."""
    run = "" if argv is None else "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
    code = (f"import sys\nfrom node.cli import main\n{run}"
            f"print('loaded:' + ','.join(m for m in {MODEL_LIBRARIES!r} if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code, *(argv or [])], capture_output=True, text=True,
                            timeout=120)
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("loaded:")]
    return [name for name in line.removeprefix("loaded:").split(",") if name]


@pytest.mark.parametrize("argv", [None, ["--help"], ["--version"], ["evaluate", "--help"]],
                         ids=["import", "help", "version", "evaluate-help"])
def test_the_cli_and_its_help_load_no_model_library(argv: list[str] | None) -> None:
    assert _model_libraries_loaded(argv) == []


def test_status_says_the_release_and_loads_no_model_library(tmp_path: Path) -> None:
    from importlib import metadata

    config = tmp_path / "node.toml"
    config.write_text('[storage]\nroot = "store"\ndatabase_url = "sqlite:///node.db"\n')
    assert _run("db", "upgrade", "--config", str(config)).returncode == 0
    assert _model_libraries_loaded(["status", "--config", str(config)]) == []
    status = _run("status", "--config", str(config))
    assert status.returncode == 0
    assert status.stdout.splitlines()[0] == f"node:          ichnode {metadata.version('ichnode')}, config {config}"


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
    tmp_path.mkdir(exist_ok=True)
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
    from storage.db import Database, Delivery, DeliveryState
    from tests.conftest import add_delivery

    tmp_path.mkdir(exist_ok=True)
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}/store"\ndatabase_url = "sqlite:///{tmp_path}/n.db"\n')
    database = Database(f"sqlite:///{tmp_path}/n.db", create=True)
    add_delivery(database, "r", DeliveryState.FAILED, attempts=8, last_error="PACS could not be reached")
    result = _run("retry", "--config", str(config))
    assert result.returncode == 0 and "re-queued 1 failed deliveries and 0 failed notifications" in result.stdout
    with database.read() as session:
        delivery = session.query(Delivery).one()
        assert delivery.state == DeliveryState.PENDING and delivery.attempts == 0
    status = _run("status", "--config", str(config))
    assert "pending 1" in status.stdout and "done 1" in status.stdout


def _node_with_studies(tmp_path: Path, states: dict[str, str]) -> Path:
    """A config and a database holding one study (with one instance) per StudyInstanceUID,
    in the state given."""
    from storage.db import Database, Instance, Study, StudyState, utcnow

    tmp_path.mkdir(exist_ok=True)
    config = tmp_path / "node.toml"
    config.write_text(f'[storage]\nroot = "{tmp_path}/store"\ndatabase_url = "sqlite:///{tmp_path}/n.db"\n'
                      f'[log]\npath = "{tmp_path}/triage.log"\n')
    database = Database(f"sqlite:///{tmp_path}/n.db", create=True)
    with database.write() as session:
        for uid, state in states.items():
            study = Study(study_instance_uid=uid, accession_number=f"A{uid}", state=StudyState(state),
                          first_received_at=utcnow(), last_received_at=utcnow(), instance_count=1, attempts=2,
                          analyses=1 if state == "done" else 0,
                          last_error="RuntimeError: boom" if state == "failed" else None)
            session.add(study)
            session.flush()
            session.add(Instance(sop_instance_uid=f"{uid}.1", study_id=study.id, series_instance_uid=f"{uid}.0",
                                 sop_class_uid="1.2.840.10008.5.1.4.1.1.2", modality="CT",
                                 transfer_syntax_uid="1.2.840.10008.1.2.1", path="x.dcm", size=1,
                                 calling_aet="SCANNER", received_at=utcnow()))
    database.dispose()
    return config


def _states(tmp_path: Path) -> dict[str, tuple[str, int, str | None, int]]:
    from storage.db import Database, Study

    database = Database(f"sqlite:///{tmp_path}/n.db")
    with database.read() as session:
        return {s.study_instance_uid: (s.state.value, s.attempts, s.last_error, s.analyses)
                for s in session.query(Study).order_by(Study.study_instance_uid)}


def test_reanalyse_queues_failed_and_done_studies_and_leaves_the_queue_alone(tmp_path: Path) -> None:
    from node.triagelog import read_events

    config = _node_with_studies(tmp_path, {"1.1": "failed", "1.2": "done", "1.3": "processing"})
    result = _run("reanalyse", "1.1", "1.2", "1.3", "--config", str(config))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "study 1.1 (accession A1.1): failed, queued to be analysed again; new result series follow " \
                       "the earlier ones"
    assert lines[1].startswith("study 1.2 (accession A1.2): done, queued to be analysed again")
    assert lines[2] == "study 1.3 (accession A1.3): processing, left alone: it is in the queue and will be " \
                       "analysed anyway"
    states = _states(tmp_path)
    assert states["1.1"] == ("ready", 0, None, 0) and states["1.2"] == ("ready", 0, None, 1)
    assert states["1.3"] == ("processing", 2, None, 0)
    events = [(e["event"], e["study_instance_uid"], e.get("by"), e.get("previous_state"))
              for e in read_events(tmp_path / "triage.log")]
    assert events == [("reanalyse", "1.1", "cli", "failed"), ("reanalyse", "1.2", "cli", "done")]

    unknown = _run("reanalyse", "1.1", "9.9", "--config", str(config))
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert "study 1.1 (accession A1.1): ready, left alone" in unknown.stdout
    assert "ichnode reanalyse: no study 9.9 on this node: check the StudyInstanceUID" in unknown.stderr

    neither = _run("reanalyse", "--config", str(config))
    assert neither.returncode == 2 and "one of the arguments STUDY_UID --failed is required" in neither.stderr


def test_reanalyse_failed_takes_every_failed_study(tmp_path: Path) -> None:
    config = _node_with_studies(tmp_path, {"1.1": "done"})
    none = _run("reanalyse", "--failed", "--config", str(config))
    assert none.returncode == 0 and none.stdout == "no failed studies\n"
    config = _node_with_studies(tmp_path / "more", {"2.1": "failed", "2.2": "failed", "2.3": "done"})
    result = _run("reanalyse", "--failed", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("failed, queued to be analysed again") == 2
    assert [state for state, *_ in _states(tmp_path / "more").values()] == ["ready", "ready", "done"]
