"""uvicorn in a thread of `ichnode serve`, with the limits a hostile peer needs.

uvicorn (0.55, h11) on its own waits for ever for a request that never arrives whole: a
connection that sends nothing, half a request line or a header a byte a minute holds a
descriptor for good, and once the process runs out of them the DICOM side cannot accept
associations either. Its limit_concurrency still accepts every connection and answers 503
only once a request arrives. So the pages are served by a subclass of uvicorn's h11
protocol that closes a connection at once beyond web.max_connections and closes one whose
request has not arrived whole (head and body) within web.request_timeout_seconds (a
STOW-RS body, under /dicomweb/, gets dicomweb.request_timeout_seconds instead); the
descriptor budget this gives is in docs/monitoring.md. The warnings a peer can provoke at
will, and the failed accepts once descriptors run out (asyncio logs every one, up to the
listen backlog's worth a second), are logged at most once a minute each.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp
from uvicorn.protocols.http.h11_impl import H11Protocol

from node.config import Config
from node.errors import ConfigError
from node.stow_in import PATH_PREFIX

__all__ = ["LOG_INTERVAL_SECONDS", "KEEP_ALIVE_SECONDS", "OncePerInterval", "WebServer"]

log = logging.getLogger(__name__)
LOG_INTERVAL_SECONDS = 60.0
KEEP_ALIVE_SECONDS = 5  # an idle connection between requests (a browser fetching a page's pictures)
MAX_HEAD_BYTES = 16 * 1024  # request line and headers: larger gets 400
# Connections the kernel has accepted and the loop not yet: they hold no descriptor of the
# node's, only kernel memory (uvicorn's default is 2048).
BACKLOG = 128
# The loggers of what a peer can make happen again and again: our refusals, uvicorn's
# "Invalid HTTP request received.", asyncio's "socket.accept() out of system resource".
NOISY_LOGGERS = ("node.web", __name__, "uvicorn.error", "asyncio")
_BUSY = b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a cap on open connections and a deadline for each request."""

    def __init__(self, *args: Any, max_connections: int, request_seconds: float,
                 long_bodies: tuple[str, float] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.request_seconds = request_seconds
        # (path prefix, seconds): the body of a request under that path may take this long in all
        self.long_bodies = long_bodies
        self.request_deadline: asyncio.TimerHandle | None = None
        self.request_began = 0.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            log.warning("web.max_connections (%d) connections are open: closing new ones at once",
                        self.max_connections)
            transport.write(_BUSY)
            transport.close()
            return
        self._expect_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_request()  # the next request on a kept-alive connection gets the same time

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget_deadline()
        super().connection_lost(exc)

    def _expect_request(self) -> None:
        self._forget_deadline()
        if not self.transport.is_closing():
            self.request_began = self.loop.time()
            self.request_deadline = self.loop.call_later(self.request_seconds, self._request_overdue)

    def _forget_deadline(self) -> None:
        if self.request_deadline is not None:
            self.request_deadline.cancel()
            self.request_deadline = None

    def _request_overdue(self) -> None:
        self.request_deadline = None
        if self.conn.their_state == h11.SEND_BODY and self.long_bodies is not None \
                and self.scope["path"].startswith(self.long_bodies[0]):  # scope: the request whose body this is
            left = self.request_began + self.long_bodies[1] - self.loop.time()
            if left > 0:
                self.request_deadline = self.loop.call_later(left, self._request_overdue)
                return
        # IDLE: no whole request head yet (or none at all); SEND_BODY: the body is incomplete.
        # DONE: the request is in and the app is answering, which may take its time.
        if self.conn.their_state in (h11.IDLE, h11.SEND_BODY) and not self.transport.is_closing():
            self.transport.close()


class OncePerInterval(logging.Filter):
    """Lets each warning or error (by logger and message) through at most once per `seconds`;
    the next one says how many were left out meanwhile. A peer that repeats what gets
    logged, or descriptors running out (asyncio logs every failed accept, up to the listen
    backlog's worth a second), would otherwise fill the disk with the same line."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.seconds = seconds
        self.clock = clock
        self.seen: dict[tuple[str, str], tuple[float, int]] = {}  # → when last logged, how many left out since

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        now = self.clock()
        key = (record.name, str(record.msg))
        logged, left_out = self.seen.get(key, (now - self.seconds, 0))
        if now - logged < self.seconds:
            self.seen[key] = (logged, left_out + 1)
            return False
        if len(self.seen) > 256:  # messages that carry their own details need not pile up
            self.seen = {k: v for k, v in self.seen.items() if now - v[0] < self.seconds}
        self.seen[key] = (now, 0)
        if left_out:
            record.msg = f"{record.msg} ({left_out} more like this in the last {now - logged:.0f} s, not logged)"
        return True


class WebServer:
    """uvicorn in a thread beside the SCP; `start` returns once it listens or raises."""

    def __init__(self, config: Config, app: ASGIApp) -> None:
        node = config.node
        self.settings = config.web
        tls = dict(ssl_certfile=str(node.tls_certificate), ssl_keyfile=str(node.tls_private_key)) \
            if self.settings.tls else {}
        stow = config.dicomweb
        protocol = functools.partial(BoundedH11Protocol, max_connections=self.settings.max_connections,
                                     request_seconds=self.settings.request_timeout_seconds,
                                     long_bodies=(PATH_PREFIX, stow.request_timeout_seconds) if stow.enabled else None)
        self.server = uvicorn.Server(uvicorn.Config(
            app, host=self.settings.host, port=self.settings.port, log_level="warning", access_log=False,
            lifespan="off", server_header=False, http=protocol,  # type: ignore[arg-type]
            timeout_keep_alive=KEEP_ALIVE_SECONDS, h11_max_incomplete_event_size=MAX_HEAD_BYTES, backlog=BACKLOG,
            **tls))
        self.thread = threading.Thread(target=self.server.run, name="web", daemon=True)
        self.log_filter = OncePerInterval(LOG_INTERVAL_SECONDS)

    def start(self, timeout: float = 15.0) -> None:
        for name in NOISY_LOGGERS:
            logging.getLogger(name).addFilter(self.log_filter)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise ConfigError(f"the web pages could not listen on {self.settings.url} (web.host, web.port)")
            time.sleep(0.05)
        log.info("web pages, /metrics and /readyz at %s", self.settings.url)

    def stop(self, timeout: float = 10.0) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=timeout)
        for name in NOISY_LOGGERS:
            logging.getLogger(name).removeFilter(self.log_filter)
