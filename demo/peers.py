"""Real peers on loopback: Orthanc as the PACS, a throw-away PostgreSQL cluster, and the
node as a subprocess.

`make demo`, the benchmarks and the network tests all start the same peers the same way:
free ports, a folder of their own, every wait a poll with a deadline.
"""

from __future__ import annotations

import glob
import http.server
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TypeVar

__all__ = ["Browser", "NodeProcess", "Orthanc", "PostgresCluster", "WebhookReceiver", "find_tool", "free_port",
           "node_config", "port_open", "wait_for"]

T = TypeVar("T")
DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"  # Debian's orthanc-dicomweb


def find_tool(name: str) -> str:
    """Path of a peer program (DCMTK, Orthanc); Debian puts Orthanc in /usr/sbin, which a
    non-root PATH may lack."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is None:
        raise FileNotFoundError(f"{name} is not installed; `make test` and `make demo` install it")
    return path


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for(condition: Callable[[], T], *, timeout: float, what: str, every: float = 0.2) -> T:
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


def port_open(port: int) -> bool:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


class WebhookReceiver:
    """An HTTP server on loopback that records the JSON bodies posted to it, as a chat
    tool's incoming webhook would; `failing` makes it answer 500 meanwhile."""

    def __init__(self) -> None:
        self.received: list[dict] = []  # bodies answered 200
        self.refused = 0  # posts answered 500
        self.failing = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server calls
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if receiver.failing.is_set():
                    receiver.refused += 1
                    self.send_response(500)
                else:
                    receiver.received.append(json.loads(body))
                    self.send_response(200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True, name="webhook")

    def start(self) -> "WebhookReceiver":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Browser:
    """Debian's Chromium, headless, driven by Playwright: nothing is downloaded (Playwright's
    own browsers are not used). As root Chromium needs --no-sandbox."""

    def __init__(self, width: int = 1280, height: int = 900) -> None:
        self.size = {"width": width, "height": height}

    def __enter__(self):
        from playwright.sync_api import sync_playwright  # test and demo dependency only

        self._playwright = sync_playwright().start()
        args = ["--no-sandbox"] if os.geteuid() == 0 else []
        self._browser = self._playwright.chromium.launch(executable_path=find_tool("chromium"), args=args)
        self.page = self._browser.new_page(viewport=self.size)
        return self.page

    def __exit__(self, *exc: object) -> None:
        self._browser.close()
        self._playwright.stop()


class Orthanc:
    """An Orthanc PACS with its own storage, on free loopback ports.

    `dicomweb` loads Debian's DICOMweb plugin (STOW-RS, QIDO-RS, WADO-RS at `dicomweb_url`);
    `modalities` names the DICOM peers Orthanc may send to (C-MOVE destinations, Storage
    Commitment reports), as {name: (AE title, port)} on loopback; `settings` are further
    keys of Orthanc's configuration file, which win over these."""

    def __init__(self, folder: Path, ae_title: str = "PACS", dicom_port: int | None = None, *,
                 dicomweb: bool = False, modalities: dict[str, tuple[str, int]] | None = None,
                 settings: dict | None = None) -> None:
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = dicom_port or free_port()
        self.http_port = free_port()
        self.dicomweb = dicomweb
        self.modalities = dict(modalities or {})
        self.settings = dict(settings or {})
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb root (the plugin's default, /dicom-web)."""
        return f"{self.url}/dicom-web"

    def start(self) -> Orthanc:
        binary = find_tool("Orthanc")
        self.folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "ichnode-pacs",
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "StorageDirectory": str(self.folder / "db"),
            "IndexDirectory": str(self.folder / "db"),
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomAlwaysAllowStore": True,
            "DicomCheckCalledAet": False,
            "Plugins": [DICOMWEB_PLUGIN] if self.dicomweb else [],
            "DicomModalities": {name: [aet, "127.0.0.1", port] for name, (aet, port) in self.modalities.items()},
            **({"DicomWeb": {"Enable": True, "Root": "/dicom-web/"}} if self.dicomweb else {}),
            **self.settings,
        }
        if self.dicomweb and not Path(DICOMWEB_PLUGIN).exists():
            raise FileNotFoundError(f"Orthanc's DICOMweb plugin {DICOMWEB_PLUGIN} is not installed (Debian package "
                                    "orthanc-dicomweb); `make test` installs it")
        path = self.folder / "orthanc.json"
        path.write_text(json.dumps(config))
        log = open(self.folder / "orthanc.log", "wb")
        self.process = subprocess.Popen([binary, str(path)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._http_ok() or self._exited(), timeout=60, what="Orthanc to start")
        if self.process.poll() is not None:
            raise RuntimeError(f"Orthanc exited: {(self.folder / 'orthanc.log').read_text()[-2000:]}")
        wait_for(lambda: port_open(self.dicom_port), timeout=30, what="Orthanc's DICOM port")
        return self

    def _exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def _http_ok(self) -> bool:
        try:
            self.get("/system")
            return True
        except urllib.error.HTTPError:  # an answer (401 with AuthenticationEnabled): it is up
            return True
        except OSError:
            return False

    def get(self, path: str):
        with urllib.request.urlopen(f"{self.url}{path}", timeout=5) as response:
            return json.loads(response.read())

    def get_bytes(self, path: str) -> bytes:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as response:
            return response.read()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def postgres_bin() -> Path:
    """The folder of PostgreSQL's server programs: Debian keeps initdb and pg_ctl in
    /usr/lib/postgresql/<version>/bin, off PATH; elsewhere they are on PATH."""
    on_path = shutil.which("initdb")
    if on_path:  # a link on PATH stands for the folder that holds pg_ctl, psql and pg_dump too
        return Path(os.path.realpath(on_path)).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not found:
        raise FileNotFoundError("PostgreSQL's initdb is not installed (Debian package postgresql); `make test` "
                                "installs it")
    return Path(found[-1]).parent


class PostgresCluster:
    """A throw-away PostgreSQL cluster: initdb and pg_ctl on a free loopback port, in a
    folder of its own, with trust authentication for one superuser. PostgreSQL refuses to
    run as root, so as root the programs run as the `postgres` user of Debian's package,
    which owns the folder. `durable=False` turns fsync off (tests); benchmarks keep it on."""

    def __init__(self, *, durable: bool = True, user: str = "ich") -> None:
        self.bin = postgres_bin()
        self.user = user
        self.port = free_port()
        self.durable = durable
        self.folder: Path | None = None

    @property
    def data(self) -> Path:
        assert self.folder is not None, "start() the cluster first"
        return self.folder / "data"

    def _as_owner(self, command: list[str]) -> list[str]:
        if os.geteuid() != 0:
            return command
        return [find_tool("runuser"), "-u", "postgres", "--", *command]

    def _run(self, *command: str, timeout: float = 120) -> None:
        result = subprocess.run(self._as_owner(list(command)), capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            log = (self.folder / "postgres.log") if self.folder else None
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise RuntimeError(f"{' '.join(command[:2])} failed: {result.stderr[-2000:]}{tail}")

    def start(self) -> PostgresCluster:
        """initdb (the first time) and start; returns when it accepts connections."""
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="ichnode-pg-"))
            if os.geteuid() == 0:
                owner = pwd.getpwnam("postgres")
                os.chown(self.folder, owner.pw_uid, owner.pw_gid)
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", self.user, "--auth=trust",
                      "-E", "UTF8", "--locale=C", "--no-sync")
        options = [f"-p {self.port}", f"-k {self.folder}", "-c listen_addresses=127.0.0.1",
                   "-c max_connections=200"]
        if not self.durable:
            options += ["-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off"]
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", " ".join(options),
                  "-l", str(self.folder / "postgres.log"), "-w", "-t", "60", "start")
        return self

    def stop(self) -> None:
        """Fast shutdown: open transactions are rolled back, connections closed."""
        if self.folder is not None and (self.data / "postmaster.pid").exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "60", "stop")

    def restart(self) -> None:
        """pg_ctl restart: a fast shutdown, then the same server options again."""
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.folder / "postgres.log"),
                  "-m", "fast", "-w", "-t", "60", "restart")

    def remove(self) -> None:
        """Stop the cluster and delete its folder."""
        try:
            self.stop()
        finally:
            if self.folder is not None:
                shutil.rmtree(self.folder, ignore_errors=True)
                self.folder = None

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL of one database, with the psycopg 3 driver."""
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def execute(self, sql: str, database: str = "postgres") -> list[tuple]:
        """Run SQL as the superuser outside a transaction (CREATE DATABASE needs that)."""
        import psycopg  # a dependency of the node; imported here so other peers do not need it

        with psycopg.connect(host="127.0.0.1", port=self.port, user=self.user, dbname=database,
                             autocommit=True) as connection:
            cursor = connection.execute(sql)
            return cursor.fetchall() if cursor.description else []

    def create_database(self, name: str, *, template: str | None = None) -> str:
        """A new, empty database (or a copy of `template`); returns its URL."""
        self.execute(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def load(self, database: str, script: Path) -> None:
        """Run a SQL script (a pg_dump) with psql, stopping at the first error."""
        result = subprocess.run([str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1",
                                 "-p", str(self.port), "-U", self.user, "-d", database, "-f", str(script)],
                                capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"psql -f {script} failed: {result.stderr[-2000:]}")

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.remove()


class NodeProcess:
    """`ichnode serve` (or `ichnode worker`) as a subprocess with a config written for the test."""

    def __init__(self, folder: Path, config_text: str, port: int, *, command: str = "serve") -> None:
        self.folder = folder
        self.port = port
        self.command = command
        self.config_path = folder / "node.toml"
        self.config_path.write_text(config_text)
        self.process: subprocess.Popen | None = None

    def start(self, *, wait: bool = True) -> NodeProcess:
        self.log = open(self.folder / "node.stderr", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "node.cli", self.command, "--config", str(self.config_path)],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        if wait:
            if self.command == "serve":
                self.wait_listening()
            else:
                self.wait_for_output("analysing studies from")
        return self

    def wait_for_output(self, text: str, timeout: float = 180) -> None:
        """Until the process has logged `text`; fails with its output if it exits first."""
        wait_for(lambda: text in self.output() or self.process.poll() is not None, timeout=timeout,
                 what=f"{self.command} to log {text!r}")
        if text not in self.output():
            raise RuntimeError(f"{self.command} exited: {self.output()[-3000:]}")

    def wait_listening(self, timeout: float = 120) -> None:
        """Until the node accepts associations; fails with its output if it exits first."""
        wait_for(lambda: port_open(self.port) or self.process.poll() is not None,
                 timeout=timeout, what="the node to listen")
        if self.process.poll() is not None:
            raise RuntimeError(f"node exited: {self.output()[-3000:]}")

    def output(self) -> str:
        return (self.folder / "node.stderr").read_text(errors="replace")

    def peak_memory_mb(self) -> float | None:
        """The running node's peak resident memory (VmHWM), in MiB."""
        try:
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
        except OSError:  # already gone
            return None
        return None

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.process is None:
            return 0
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string is a JSON string


def node_config(
    folder: Path,
    *,
    port: int,
    checkpoint: Path | None,
    destinations: list[tuple[str, str, int]] = (),
    notify: list[tuple[str, str]] = (),
    allowed_calling_aets: tuple[str, ...] = (),
    stable_seconds: float = 2.0,
    heartbeat_seconds: float = 10.0,
    stale_after_seconds: float = 120.0,
    overrides: dict[str, dict[str, object]] | None = None,
) -> str:
    """A config for a test node: loopback, fast completion and retries. `overrides` sets
    or adds keys per section, e.g. {"delivery": {"timeout_seconds": 3}}."""
    sections: dict[str, dict[str, object]] = {
        "node": {"ae_title": "ICHNODE", "host": "127.0.0.1", "port": port,
                 "allowed_calling_aets": list(allowed_calling_aets)},
        # No free-disk floor: it has its own test, and a nearly full CI disk must not fail the others.
        "storage": {"root": str(folder / "store"), "database_url": f"sqlite:///{folder / 'node.db'}",
                    "min_free_mb": 0},
        "completion": {"stable_seconds": stable_seconds, "check_interval_seconds": 0.5},
        "worker": {"poll_seconds": 0.5, "min_slices": 10, "heartbeat_seconds": heartbeat_seconds,
                   "stale_after_seconds": stale_after_seconds},
        "model": {"checkpoint": str(checkpoint or ""), "device": "cpu", "batch_size": 4},
        "delivery": {"initial_backoff_seconds": 1, "max_backoff_seconds": 2, "max_attempts": 30,
                     "timeout_seconds": 10},
        "log": {"path": str(folder / "triage.log")},
        # The web pages have their own tests; others would all want port 8080.
        "web": {"enabled": False},
    }
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    text = "".join(f"[{section}]\n" + "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())
                   for section, values in sections.items())
    for name, ae_title, dest_port in destinations:
        text += f'\n[[destinations]]\nname = "{name}"\nae_title = "{ae_title}"\nhost = "127.0.0.1"\nport = {dest_port}\n'
    for url, on in notify:
        text += f'\n[[notify]]\nurl = "{url}"\non = "{on}"\n'
    return text
