"""Keeps unauthenticated and stalled peers from holding the Storage SCP.

pynetdicom (3.0) reads each PDU with blocking, unbounded recv calls and buffers whatever
length the peer declares, and it checks AE titles and `maximum_associations` only once a
whole A-ASSOCIATE-RQ has arrived; with TLS it even runs the handshake in its accept loop.
So a peer that connects and sends nothing, or half a PDU, holds a thread (and, once
handed to pynetdicom, an association slot) for ever, and a length field can make the
node buffer gigabytes before it knows who is calling.

The guard sits in front: each connection first waits in its own thread, counted against
a budget of its own (node.max_pending_associations, node.max_pending_per_address), until
it has sent a complete A-ASSOCIATE-RQ of at most MAX_ASSOCIATE_RQ_LENGTH bytes naming
this node and an allowed calling AE title, all within node.acse_timeout_seconds of
connecting (TLS handshake included). Only then is the socket, with the request already
read, handed to pynetdicom, under a read timeout of node.network_timeout_seconds so that
a stall in the middle of a later PDU ends the association.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from socketserver import TCPServer
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.pdu import A_ASSOCIATE_RJ, A_ASSOCIATE_RQ
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer
from pynetdicom.utils import make_target

from node.config import NodeSection

if TYPE_CHECKING:
    from pynetdicom import AE
    from pynetdicom.association import Association
    from pynetdicom.events import EventHandlerType
    from pynetdicom.presentation import PresentationContext

__all__ = ["MAX_ASSOCIATE_RQ_LENGTH", "GuardedAssociationServer", "start_guarded_server"]

log = logging.getLogger(__name__)

# An A-ASSOCIATE-RQ is a few kB: DCMTK storescu's default one, proposing over a hundred
# storage SOP classes, is 9.6 kB, and the PS3.8 maximum of 128 presentation contexts with
# three transfer syntaxes each comes to about 15 kB. 64 KiB leaves room for long UIDs and a
# user identity token, and costs next to nothing for a peer that has not yet said who it is.
MAX_ASSOCIATE_RQ_LENGTH = 64 * 1024

_PDU_HEADER_LENGTH = 6  # PDU type, reserved, 4-byte big-endian length (PS3.8 9.3.1)
_A_ASSOCIATE_RQ_TYPE = 0x01
# A-ASSOCIATE-RJ (PS3.8 9.3.4): result 1 = rejected-permanent, source 1 = DICOM UL
# service-user, reason 3 = calling AE title not recognized, 7 = called AE title not recognized.
_REJECT_CALLING_AET = (0x01, 0x01, 0x03)
_REJECT_CALLED_AET = (0x01, 0x01, 0x07)


class _Refused(Exception):
    """A connection the guard closes; the message says why, for the log."""

    def __init__(self, reason: str, level: int = logging.WARNING) -> None:
        super().__init__(reason)
        self.level = level


@dataclass
class _Pending:
    """A connection that has not yet been handed to pynetdicom."""

    sock: socket.socket  # the TLS socket once wrapped
    host: str
    deadline: float  # time.monotonic() by which its A-ASSOCIATE-RQ must be complete


def _peer(client_address: Any) -> str:
    return f"{client_address[0]}:{client_address[1]}"


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise TimeoutError
    return remaining


def _recv_all(sock: socket.socket, size: int, deadline: float) -> bytes:
    """`size` bytes, or fewer if the peer closes; each recv bounded by what is left until `deadline`."""
    data = bytearray()
    while len(data) < size:
        sock.settimeout(_remaining(deadline))
        chunk = sock.recv(min(size - len(data), 16384))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def _shutdown(sock: socket.socket) -> None:
    """Wake any thread blocked on `sock`: the plain socket method, even on a TLS socket,
    whose own shutdown() would drop its SSL object under a handshake in progress."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _close(sock: socket.socket) -> None:
    _shutdown(sock)
    sock.close()


class _PrefixedAssociationSocket(AssociationSocket):
    """An AssociationSocket that yields the bytes the guard already read before the socket's own."""

    _prefix: bytearray

    @classmethod
    def adopt(cls, sock: AssociationSocket, prefix: bytes) -> None:
        # pynetdicom builds the AssociationSocket inside RequestHandler._create_association
        # and queues its state machine's Evt5 (connection open) as it does; re-classing that
        # instance keeps the queue as it is, where a second socket would queue Evt5 twice.
        sock.__class__ = cls
        cast(_PrefixedAssociationSocket, sock)._prefix = bytearray(prefix)

    @property
    def ready(self) -> bool:
        if self._prefix and self.socket is not None:
            return True
        return super().ready

    def recv(self, nr_bytes: int) -> bytearray:
        data = self._prefix[:nr_bytes]
        del self._prefix[:nr_bytes]
        if len(data) < nr_bytes:
            data += super().recv(nr_bytes - len(data))
        return data


class GuardedRequestHandler(RequestHandler):
    """Runs in the connection's own thread: admits it, then starts pynetdicom's Association."""

    server: GuardedAssociationServer

    def handle(self) -> None:
        pending = self.server.pending(self.request)
        try:
            self._associate_rq = self._receive_associate_rq(pending)
        except _Refused as exc:
            log.log(exc.level, "connection from %s closed: %s", _peer(self.client_address), exc)
            _close(pending.sock)
            return
        except BaseException:
            _close(pending.sock)  # pynetdicom would close only the socket it accepted, not a TLS one
            raise
        self.request = pending.sock
        # From here on a read that stalls, mid-PDU included, raises TimeoutError in
        # pynetdicom's recv, which it takes as the connection closing (Evt17).
        self.request.settimeout(self.server.node.network_timeout_seconds)
        super().handle()

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        _PrefixedAssociationSocket.adopt(assoc.dul.socket, self._associate_rq)
        return assoc

    def _receive_associate_rq(self, pending: _Pending) -> bytes:
        """The first PDU, whole, read before node.acse_timeout_seconds are over; _Refused
        unless it is an A-ASSOCIATE-RQ within the length limit, to us, from an allowed AE."""
        node = self.server.node
        try:
            if self.server.ssl_context is not None:
                pending.sock.settimeout(_remaining(pending.deadline))
                pending.sock = self.server.ssl_context.wrap_socket(
                    pending.sock, server_side=True, do_handshake_on_connect=False)
                pending.sock.do_handshake()
            header = _recv_all(pending.sock, _PDU_HEADER_LENGTH, pending.deadline)
            if not header:  # a port probe or load-balancer health check, not an attack
                raise _Refused("the peer hung up without sending anything", logging.INFO)
            if len(header) < _PDU_HEADER_LENGTH:
                raise _Refused(f"the peer hung up after {len(header)} bytes of a PDU header")
            pdu_type, _, length = struct.unpack(">BBL", header)
            if pdu_type != _A_ASSOCIATE_RQ_TYPE:
                raise _Refused(f"its first PDU is of type 0x{pdu_type:02X}, not an A-ASSOCIATE-RQ (0x01)")
            if length > MAX_ASSOCIATE_RQ_LENGTH:
                raise _Refused(f"its A-ASSOCIATE-RQ declares {length} bytes, over the limit of "
                               f"{MAX_ASSOCIATE_RQ_LENGTH}")
            pdu = header + _recv_all(pending.sock, length, pending.deadline)
            if len(pdu) < _PDU_HEADER_LENGTH + length:
                raise _Refused(f"the peer hung up after {len(pdu) - _PDU_HEADER_LENGTH} of the {length} "
                               f"bytes of its A-ASSOCIATE-RQ")
        except TimeoutError:
            raise _Refused(f"no complete A-ASSOCIATE-RQ within {node.acse_timeout_seconds:g} s of "
                           f"connecting (node.acse_timeout_seconds)") from None
        except ssl.SSLError as exc:
            raise _Refused(f"TLS failed: {exc}") from None
        except OSError as exc:
            raise _Refused(f"connection lost before a complete A-ASSOCIATE-RQ: {exc}") from None
        self._check_ae_titles(pending, pdu)
        return pdu

    def _check_ae_titles(self, pending: _Pending, pdu: bytes) -> None:
        """pynetdicom's own AE title rules, applied before the association takes a slot:
        handed over, even a request it rejects holds one until the peer hangs up, and for
        node.network_timeout_seconds if the peer sends the start of another PDU."""
        request = A_ASSOCIATE_RQ()
        try:
            request.decode(pdu)
        except Exception as exc:  # pynetdicom's decoder raises whatever the bytes provoke
            raise _Refused(f"malformed A-ASSOCIATE-RQ: {exc!r}") from None
        allowed = [aet.strip() for aet in self.ae.require_calling_aet]
        if self.ae.require_called_aet and request.called_ae_title != self.server.ae_title.strip():
            reason, why = _REJECT_CALLED_AET, f"called AE title {request.called_ae_title!r} is not ours"
        elif allowed and request.calling_ae_title not in allowed:
            reason, why = (_REJECT_CALLING_AET, f"calling AE title {request.calling_ae_title!r} is "
                                                f"not in node.allowed_calling_aets")
        else:
            return
        reject = A_ASSOCIATE_RJ()
        reject.result, reject.source, reject.reason_diagnostic = reason
        try:
            pending.sock.settimeout(_remaining(pending.deadline))
            pending.sock.sendall(reject.encode())
        except OSError:
            pass  # refused all the same
        raise _Refused(f"association rejected: {why}")


class GuardedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a budget and a deadline for connections still negotiating."""

    def __init__(
        self,
        ae: AE,
        address: tuple[str, int],
        ae_title: str,
        contexts: list[PresentationContext],
        ssl_context: ssl.SSLContext | None = None,
        evt_handlers: list[EventHandlerType] | None = None,
        *,
        node: NodeSection,
    ) -> None:
        self.node = node
        self._lock = threading.Lock()
        self._pending: dict[socket.socket, _Pending] = {}  # keyed by the accepted socket
        self._pending_per_host: Counter[str] = Counter()
        super().__init__(ae, address, ae_title, contexts, ssl_context, evt_handlers,
                         request_handler=GuardedRequestHandler)

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the TLS handshake runs in the connection's thread, under its deadline,
        where a client that never starts it cannot stop this loop accepting others."""
        return TCPServer.get_request(self)

    def process_request(self, request: socket.socket, client_address: Any) -> None:
        """In the accept loop: count the connection as pending, or close it at once when
        its address or everyone together already have as many pending as allowed."""
        host = client_address[0]
        with self._lock:
            if len(self._pending) >= self.node.max_pending_associations:
                refusal = (f"{len(self._pending)} connections are already negotiating "
                           f"(node.max_pending_associations)")
            elif self._pending_per_host[host] >= self.node.max_pending_per_address:
                refusal = (f"{self._pending_per_host[host]} connections from {host} are already "
                           f"negotiating (node.max_pending_per_address)")
            else:
                refusal = None
                deadline = time.monotonic() + self.node.acse_timeout_seconds
                self._pending[request] = _Pending(request, host, deadline)
                self._pending_per_host[host] += 1
        if refusal is not None:
            log.warning("connection from %s closed at once: %s", _peer(client_address), refusal)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts the connection's thread
        except BaseException:
            self._forget(request)
            raise

    def process_request_thread(self, request: socket.socket, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._forget(request)

    def pending(self, request: socket.socket) -> _Pending:
        with self._lock:
            return self._pending[request]

    def _forget(self, request: socket.socket) -> None:
        with self._lock:
            pending = self._pending.pop(request, None)
            if pending is not None:
                self._pending_per_host[pending.host] -= 1
                if not self._pending_per_host[pending.host]:
                    del self._pending_per_host[pending.host]

    def server_close(self) -> None:
        """End the connections still negotiating first, so that joining their threads
        (which the threading mix-in does next) does not wait out their deadlines."""
        with self._lock:
            for pending in self._pending.values():
                _shutdown(pending.sock)
        super().server_close()


def start_guarded_server(
    ae: AE,
    node: NodeSection,
    evt_handlers: list[EventHandlerType],
    ssl_context: ssl.SSLContext | None,
) -> GuardedAssociationServer:
    """What `ae.start_server(block=False)` does, with the guarded server class: serve in a
    daemon thread, registered with the AE so that `server.shutdown()` works as usual."""
    server = ae.make_server((node.host, node.port), ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=GuardedAssociationServer, node=node)
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    thread = threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{timestamp}",
                              daemon=True)
    thread.start()
    ae._servers.append(server)
    return server
