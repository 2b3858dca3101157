"""The node's log: library warnings, Alembic's migrations and pynetdicom's lines about a
failed send reach it as one log line each, or not at all, never as raw text on stderr."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

LOG_LINE = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")

# What a serve process meets: pydicom's warnings about a person name too long and a date
# that is not one (it also logs each itself), a warning over several lines, and a C-STORE
# to a PACS that is down and to one that rejects the node's AE title.
NODE_PROCESS = """
import logging, sys, warnings
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import SecondaryCaptureImageStorage
from node.config import Destination
from node.delivery import DicomSender
from node.errors import DeliveryError
from node.logs import setup_logging

setup_logging()
Dataset().PatientName = "Doe^" + "J" * 70
Dataset().PatientBirthDate = "'Doe^Jane' 19800203"
warnings.warn("`torch.jit.script` is deprecated.\\nPlease switch to `torch.compile` or `torch.export`.", FutureWarning)
pacs = AE(ae_title="PACS")
pacs.add_supported_context(SecondaryCaptureImageStorage)
pacs.require_calling_aet = ["SOMEONE"]
server = pacs.start_server(("127.0.0.1", 0), block=False)
for number, port in enumerate((int(sys.argv[1]), server.server_address[1]), start=1):
    try:
        DicomSender("ICHNODE", 5.0).send(Destination("pacs", "PACS", "127.0.0.1", port), [], priority_high=False)
    except DeliveryError as exc:
        logging.getLogger("node.delivery").warning("delivery %d: %s (attempt 1)", number, exc)
server.shutdown()
"""


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _log_lines(stderr: str) -> list[str]:
    lines = stderr.splitlines()
    raw = [line for line in lines if not LOG_LINE.match(line)]
    assert not raw, f"stderr has text that is not a log line: {raw}"
    return lines


def test_library_warnings_and_failed_sends_are_one_log_line_each() -> None:
    result = subprocess.run([sys.executable, "-c", NODE_PROCESS, str(_closed_port())], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = _log_lines(result.stderr)
    pn = [line for line in lines if "PN component length" in line]
    assert len(pn) == 1 and " WARNING py.warnings: UserWarning: " in pn[0]
    (birth_date,) = [line for line in lines if "VR DA" in line]
    assert "Doe^Jane" not in birth_date and "19800203" not in birth_date  # a warning about data: redacted
    (deprecation,) = [line for line in lines if "FutureWarning" in line]
    assert "`torch.jit.script` is deprecated. Please switch to `torch.compile` or `torch.export`." in deprecation
    assert not [line for line in lines if "pynetdicom" in line]
    down, rejected = [line for line in lines if "node.delivery" in line]
    assert "delivery 1: pacs (PACS@127.0.0.1" in down and "could not be reached" in down
    assert "delivery 2: pacs (PACS@127.0.0.1" in rejected and "rejected the association" in rejected
    assert len(lines) == 5


def test_a_database_upgrade_logs_no_migration_chatter(tmp_path: Path) -> None:
    config = tmp_path / "node.toml"
    config.write_text('[storage]\nroot = "store"\ndatabase_url = "sqlite:///node.db"\n')
    result = subprocess.run([sys.executable, "-m", "node.cli", "db", "upgrade", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "created the tables" in result.stdout
    (line,) = _log_lines(result.stderr)
    assert " WARNING node.service: created a new, empty database" in line
    assert "alembic" not in result.stderr
