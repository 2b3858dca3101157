"""Optional DICOM TLS, tested with DCMTK storescu +tls and certificates made by openssl."""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from node.config import parse_config
from node.dashboard import Dashboard, ModelInfo
from node.health import Readiness
from node.history import TriageHistory
from node.web import create_app
from node.webserver import WebServer
from storage.db import Database
from storage.store import InstanceStore
from tests.conftest import require_tool
from tests.peers import NodeProcess, free_port, node_config, storescu


def _openssl(*args: str) -> None:
    subprocess.run([require_tool("openssl"), *args], check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate it signed."""
    folder = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=test CA",
             "-keyout", str(folder / "ca.key"), "-out", str(folder / "ca.crt"))
    for name, extension in (("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"), ("client", "")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}",
                 "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.csr"))
        (folder / f"{name}.ext").write_text(extension + "\n")
        _openssl("x509", "-req", "-in", str(folder / f"{name}.csr"), "-CA", str(folder / "ca.crt"),
                 "-CAkey", str(folder / "ca.key"), "-CAcreateserial", "-days", "2",
                 "-out", str(folder / f"{name}.crt"), "-extfile", str(folder / f"{name}.ext"))
    return folder


def test_storescu_over_tls_with_client_certificates(tmp_path: Path, pki: Path, negative_study: Path) -> None:
    port = free_port()
    tls = {"tls_certificate": pki / "server.crt", "tls_private_key": pki / "server.key",
           "tls_ca_certificates": pki / "ca.crt"}
    node = NodeProcess(tmp_path, node_config(tmp_path, port=port, checkpoint=None, overrides={"node": tls}), port)
    node.start()
    files = sorted((negative_study / "HEAD").glob("*.dcm"))[:3]
    try:
        secure = storescu(port, files, extra=["+tls", str(pki / "client.key"), str(pki / "client.crt"),
                                              "+cf", str(pki / "ca.crt")])
        assert secure.returncode == 0, secure.stderr
        plain = storescu(port, files[:1])
        assert plain.returncode != 0  # TLS only
        anonymous = storescu(port, files[:1], extra=["+tla", "+cf", str(pki / "ca.crt")])
        assert anonymous.returncode != 0  # a client certificate is required
    finally:
        node.stop()
    assert len(list((tmp_path / "store").rglob("*.dcm"))) == 3
    assert "(DICOM TLS)" in node.output()


def test_tls_settings_are_checked_at_start_up(tmp_path: Path, pki: Path) -> None:
    from node.config import parse_config
    from node.errors import ConfigError

    with pytest.raises(ConfigError, match="must be set together"):
        parse_config({"node": {"tls_certificate": str(pki / "server.crt")}}, tmp_path)
    with pytest.raises(ConfigError, match="is not a file"):
        parse_config({"node": {"tls_certificate": str(tmp_path / "no.crt"),
                               "tls_private_key": str(pki / "server.key")}}, tmp_path)


def test_the_web_pages_serve_https_with_the_dicom_certificate(tmp_path: Path, pki: Path) -> None:
    config = parse_config({
        "node": {"tls_certificate": str(pki / "server.crt"), "tls_private_key": str(pki / "server.key")},
        "storage": {"root": str(tmp_path / "store"), "database_url": f"sqlite:///{tmp_path / 'node.db'}"},
        "log": {"path": str(tmp_path / "triage.log")},
        "web": {"tls": True, "port": free_port()},
    }, tmp_path)
    store = InstanceStore(config.storage.root)
    store.ensure()
    database = Database(config.storage.database_url, create=True)
    dashboard = Dashboard(config, database, store, TriageHistory(config.log.path), ModelInfo.of(config, None))
    readiness = Readiness(database, store, 0, model_loaded=False, model_configured=False,
                          scheduler_running=lambda: True, worker=None, worker_stale_seconds=60)
    server = WebServer(config, create_app(config, dashboard, readiness))
    server.start()
    try:
        assert config.web.url.startswith("https://127.0.0.1:")
        ready = httpx.get(config.web.url + "readyz", verify=ssl.create_default_context(cafile=str(pki / "ca.crt")))
        assert ready.status_code == 200 and ready.json()["status"] == "ready"
        assert ready.headers["strict-transport-security"] == "max-age=31536000"
    finally:
        server.stop()
