"""Real peers for network tests: Orthanc as the PACS, the node as a subprocess and a node
config for it (all from demo.peers, which `make demo` and `make bench` share), and DCMTK
tools.

Everything listens on loopback at free ports; every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from demo.peers import (Browser, NodeProcess, Orthanc, PostgresCluster, WebhookReceiver, free_port, node_config,
                        port_open, wait_for)
from tests.conftest import require_tool

__all__ = ["Browser", "NodeProcess", "Orthanc", "PostgresCluster", "WebhookReceiver", "free_port", "port_open",
           "wait_for", "node_config", "storescu", "echoscu", "c_store_status", "dciodvfy_errors", "tmpfs"]


def storescu(port: int, files: list[Path], *, calling: str = "SCANNER", called: str = "ICHNODE",
             extra: list[str] = ()) -> subprocess.CompletedProcess:
    """DCMTK storescu as the scanner."""
    binary = require_tool("storescu")
    return subprocess.run(
        [binary, "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=300,
    )


def echoscu(port: int, *, calling: str = "SCANNER", called: str = "ICHNODE") -> subprocess.CompletedProcess:
    binary = require_tool("echoscu")
    return subprocess.run([binary, "-aet", calling, "-aec", called, "127.0.0.1", str(port)],
                          capture_output=True, text=True, timeout=60)


def c_store_status(port: int, path: Path) -> int | None:
    """The status the node answers to one C-STORE of `path` (None: no answer)."""
    ae = AE(ae_title="SCANNER")
    ds = pydicom.dcmread(path)
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title="ICHNODE")
    assert assoc.is_established
    try:
        return getattr(assoc.send_c_store(ds), "Status", None)
    finally:
        assoc.release()


def dciodvfy_errors(path: Path) -> list[str]:
    """The error lines dicom3tools' dciodvfy reports for a DICOM file (warnings pass)."""
    report = subprocess.run([require_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]


@contextlib.contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at `mount` with `options` (size=, nr_inodes=) for the block;
    skips the test where mounting needs a root this run does not have."""
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"{options},mode=0700", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
