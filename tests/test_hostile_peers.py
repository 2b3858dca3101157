"""Peers that connect and stall, send half a PDU, claim gigabytes or the wrong AE title
cannot hold the Storage SCP (node.guard): the SCP in-process, raw sockets and DCMTK
echoscu as the allowed scanner, all on loopback.

Hostile peers connect from 127.0.0.2 and up (all of 127/8 is loopback on Linux), so
that the per-address budget they exhaust is not the scanner's (127.0.0.1).
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import Verification

from node.config import NodeSection
from node.guard import GuardedAssociationServer
from node.ingest import Ingest
from node.scp import start_scp
from node.triagelog import TriageLog
from storage.db import Database
from storage.store import InstanceStore
from tests.conftest import require_tool
from tests.peers import echoscu, free_port, wait_for

ACSE_TIMEOUT = 1.0
NETWORK_TIMEOUT = 2.0
# Long enough that nothing times out while a test looks at it.
LONG_TIMEOUT = 60.0
# How long a wait for the server to act may take before the test fails; far above the
# timeouts above, so that a slow machine does not fail a correct node.
PATIENCE = 20.0

StartNode = Callable[..., int]


def _start_scp(folder: Path, **overrides: Any) -> GuardedAssociationServer:
    """The SCP at a free port, allowing calling AE SCANNER, with NodeSection `overrides`."""
    database = Database(f"sqlite:///{folder / 'node.db'}", create=True)
    ingest = Ingest(InstanceStore(folder / "store"), database, TriageLog(folder / "triage.log"))
    settings = dict(host="127.0.0.1", port=free_port(), allowed_calling_aets=("SCANNER",),
                    acse_timeout_seconds=ACSE_TIMEOUT, network_timeout_seconds=NETWORK_TIMEOUT)
    return start_scp(NodeSection(**(settings | overrides)), ingest)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[StartNode]:
    """start_node(**NodeSection overrides) → the port of an SCP started by _start_scp."""
    servers: list[GuardedAssociationServer] = []

    def start(**overrides: Any) -> int:
        servers.append(_start_scp(tmp_path / f"node{len(servers)}", **overrides))
        return servers[-1].server_address[1]

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Raw client sockets a test opens; closed after it."""
    opened: list[socket.socket] = []
    yield opened
    for sock in opened:
        sock.close()


def _connect(sockets: list[socket.socket], port: int, source: str = "127.0.0.2") -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=PATIENCE, source_address=(source, 0))
    sockets.append(sock)
    return sock


def _associate_rq(calling: str = "SCANNER", called: str = "ICHNODE") -> bytes:
    """An A-ASSOCIATE-RQ proposing Verification, as pynetdicom encodes it."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    context = build_context(Verification)
    context.context_id = 1
    primitive.presentation_context_definition_list = [context]
    maximum_length = MaximumLengthNotification()
    maximum_length.maximum_length_received = 16384
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [maximum_length, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return pdu.encode()


def _recv_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        assert chunk, f"the server closed the connection after {len(data)} of {size} bytes"
        data += chunk
    return data


def _server_closed(sock: socket.socket) -> bool:
    """Whether the server has closed `sock` (end of stream or reset), without blocking;
    whatever it sent before is read and dropped."""
    try:
        while select.select([sock], [], [], 0)[0]:
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
    return False


def _wait_closed(sock: socket.socket, what: str) -> None:
    wait_for(lambda: _server_closed(sock), timeout=PATIENCE, what=what, every=0.05)


def _read_until_closed(sock: socket.socket) -> bytes:
    """All the server sends before it closes `sock`."""
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def _echo_ok(port: int) -> bool:
    return echoscu(port).returncode == 0


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_negotiating_connections_take_no_association_slot(start_node, sockets) -> None:
    port = start_node(max_associations=1, max_pending_per_address=2, max_pending_associations=8,
                      acse_timeout_seconds=LONG_TIMEOUT)
    request = _associate_rq()
    silent = _connect(sockets, port)
    half_header = _connect(sockets, port)
    half_header.sendall(request[:3])
    half_body = _connect(sockets, port, source="127.0.0.3")
    half_body.sendall(request[: len(request) // 2])
    over_the_address_cap = _connect(sockets, port)

    _wait_closed(over_the_address_cap, "the third connection from 127.0.0.2 to be closed")
    result = echoscu(port)
    assert result.returncode == 0, result.stderr  # one slot, three stalled peers
    for sock in (silent, half_header, half_body):
        assert not _server_closed(sock)  # still negotiating, inside their deadline


def test_shutdown_ends_the_connections_still_negotiating(tmp_path: Path, sockets) -> None:
    server = _start_scp(tmp_path, acse_timeout_seconds=LONG_TIMEOUT)
    port = server.server_address[1]
    silent = _connect(sockets, port)
    result = echoscu(port)  # accepted after the silent connection, so that one is pending now
    assert result.returncode == 0, result.stderr

    stopping = threading.Thread(target=server.shutdown)
    stopping.start()
    _wait_closed(silent, "shutdown to close the pending connection")
    stopping.join(PATIENCE)
    assert not stopping.is_alive()  # it did not wait out the pending connection's deadline


def test_unfinished_negotiations_are_closed_after_the_artim_timeout(start_node, sockets) -> None:
    port = start_node(max_associations=1)
    request = _associate_rq()
    silent = _connect(sockets, port)
    half_header = _connect(sockets, port, source="127.0.0.3")
    half_header.sendall(request[:3])
    half_body = _connect(sockets, port, source="127.0.0.4")
    half_body.sendall(request[: len(request) // 2])

    for sock, what in ((silent, "silent"), (half_header, "half a header"), (half_body, "half a body")):
        _wait_closed(sock, f"the connection that sent {what} to be closed")
    result = echoscu(port)
    assert result.returncode == 0, result.stderr


def test_the_pending_budget_is_shared_and_given_back(start_node, sockets, caplog) -> None:
    port = start_node(max_pending_associations=2, acse_timeout_seconds=LONG_TIMEOUT)
    held = [_connect(sockets, port), _connect(sockets, port, source="127.0.0.3")]
    over_budget = _connect(sockets, port, source="127.0.0.4")

    _wait_closed(over_budget, "the connection over node.max_pending_associations to be closed")
    assert "127.0.0.4" in caplog.text and "node.max_pending_associations" in caplog.text
    for sock in held:
        sock.close()
    wait_for(lambda: _echo_ok(port), timeout=PATIENCE, what="an echo once the stalled peers left")


def test_a_stall_inside_a_p_data_pdu_ends_the_association(start_node, sockets) -> None:
    port = start_node(max_associations=1)
    peer = _connect(sockets, port)
    peer.sendall(_associate_rq())
    pdu_type, _, length = struct.unpack(">BBL", _recv_exactly(peer, 6))
    assert pdu_type == 0x02  # A-ASSOCIATE-AC
    _recv_exactly(peer, length)
    peer.sendall(struct.pack(">BBL", 0x04, 0, 10_000) + bytes(100))  # P-DATA-TF: 100 of 10 000 bytes

    _wait_closed(peer, "the stalled association to be ended")
    wait_for(lambda: _echo_ok(port), timeout=PATIENCE, what="an echo in the freed association slot")


def test_an_associate_rq_claiming_2_gib_is_refused_unread(start_node, sockets, caplog) -> None:
    port = start_node()
    before = _rss_bytes()
    peer = _connect(sockets, port)
    megabyte = bytes(2**20)
    try:
        peer.sendall(struct.pack(">BBL", 0x01, 0, 2**31))
        for _ in range(50):
            peer.sendall(megabyte)
    except OSError:
        pass  # the server closed the connection while we were sending: the point
    _wait_closed(peer, "the 2 GiB A-ASSOCIATE-RQ to be refused")

    assert _rss_bytes() - before < 20 * 2**20  # the SCP runs in this process
    assert "declares 2147483648 bytes, over the limit of 65536" in caplog.text
    result = echoscu(port)
    assert result.returncode == 0, result.stderr


def test_a_first_pdu_other_than_associate_rq_is_refused(start_node, sockets, caplog) -> None:
    port = start_node()
    peer = _connect(sockets, port)
    peer.sendall(struct.pack(">BBL", 0x04, 0, 10) + bytes(10))  # P-DATA-TF before any association

    _wait_closed(peer, "the connection that began with P-DATA-TF to be closed")
    assert "127.0.0.2" in caplog.text and "first PDU is of type 0x04" in caplog.text


@pytest.mark.parametrize("calling, called, reason", [("INTRUDER", "ICHNODE", 0x03), ("SCANNER", "OTHER", 0x07)])
def test_wrong_ae_titles_are_rejected_without_taking_a_slot(start_node, sockets, calling, called, reason) -> None:
    port = start_node(max_associations=1, network_timeout_seconds=LONG_TIMEOUT)
    peer = _connect(sockets, port)
    # Half a PDU after the request: pynetdicom alone would wait for the rest before even
    # sending its rejection, holding the association slot for node.network_timeout_seconds.
    peer.sendall(_associate_rq(calling, called) + b"\x04\x00\x00")

    # A-ASSOCIATE-RJ: rejected-permanent by the service-user, for the reason of the AE title.
    assert _read_until_closed(peer) == struct.pack(">BBLBBBB", 0x03, 0, 4, 0, 0x01, 0x01, reason)
    result = echoscu(port)
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed server certificate for 127.0.0.1 and its key."""
    folder = tmp_path_factory.mktemp("tls")
    subprocess.run([require_tool("openssl"), "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(folder / "server.key"), "-out", str(folder / "server.crt")],
                   check=True, capture_output=True, timeout=60)
    return folder / "server.crt", folder / "server.key"


def _tls_echo(port: int, certificate: Path) -> subprocess.CompletedProcess:
    return subprocess.run([require_tool("echoscu"), "+tla", "+cf", str(certificate), "-aet", "SCANNER",
                           "-aec", "ICHNODE", "127.0.0.1", str(port)], capture_output=True, text=True, timeout=60)


def test_a_client_that_never_starts_tls_does_not_block_others(start_node, sockets, certificate) -> None:
    crt, key = certificate
    port = start_node(tls_certificate=crt, tls_private_key=key, acse_timeout_seconds=LONG_TIMEOUT)
    silent = _connect(sockets, port)

    result = _tls_echo(port, crt)
    assert result.returncode == 0, result.stderr
    assert not _server_closed(silent)  # still waiting for its handshake, inside its deadline


def test_the_tls_handshake_is_bounded_by_the_artim_timeout(start_node, sockets, certificate) -> None:
    crt, key = certificate
    port = start_node(tls_certificate=crt, tls_private_key=key)
    silent = _connect(sockets, port)
    context = ssl.create_default_context(cafile=crt)
    established = context.wrap_socket(_connect(sockets, port, source="127.0.0.3"), server_hostname="127.0.0.1")
    sockets.append(established)

    _wait_closed(silent, "the connection that never started TLS to be closed")
    assert _read_until_closed(established) == b""  # handshake done, no A-ASSOCIATE-RQ sent
    result = _tls_echo(port, crt)
    assert result.returncode == 0, result.stderr
