"""Real peers for network tests: Orthanc as the PACS, the node as a subprocess (both from
demo.peers, which `make demo` shares), DCMTK tools and a node config for tests.

Everything listens on loopback at free ports; every wait polls with a deadline.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from demo.peers import NodeProcess, Orthanc, free_port, port_open, wait_for
from tests.conftest import require_tool

__all__ = ["NodeProcess", "Orthanc", "free_port", "port_open", "wait_for", "node_config", "storescu", "echoscu"]


def node_config(
    folder: Path,
    *,
    port: int,
    checkpoint: Path | None,
    destinations: list[tuple[str, str, int]] = (),
    allowed_calling_aets: tuple[str, ...] = (),
    stable_seconds: float = 2.0,
    heartbeat_seconds: float = 10.0,
    stale_after_seconds: float = 120.0,
    node_extra: str = "",
    extra: str = "",
) -> str:
    """A config for a test node: loopback, fast completion and retries."""
    allowed = ", ".join(f'"{a}"' for a in allowed_calling_aets)
    text = f"""
[node]
ae_title = "ICHNODE"
host = "127.0.0.1"
port = {port}
allowed_calling_aets = [{allowed}]
{node_extra}
[storage]
root = "{folder / 'store'}"
database_url = "sqlite:///{folder / 'node.db'}"
min_free_mb = 0  # the floor has its own test; a nearly full CI disk must not fail the others
[completion]
stable_seconds = {stable_seconds}
check_interval_seconds = 0.5
[worker]
poll_seconds = 0.5
min_slices = 10
heartbeat_seconds = {heartbeat_seconds}
stale_after_seconds = {stale_after_seconds}
[model]
checkpoint = "{checkpoint or ''}"
device = "cpu"
batch_size = 4
[delivery]
initial_backoff_seconds = 1
max_backoff_seconds = 2
max_attempts = 30
timeout_seconds = 10
[log]
path = "{folder / 'triage.log'}"
{extra}
"""
    for name, ae_title, dest_port in destinations:
        text += f'\n[[destinations]]\nname = "{name}"\nae_title = "{ae_title}"\nhost = "127.0.0.1"\nport = {dest_port}\n'
    return text


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
