"""Claims that stay alive while their work runs.

A study being analysed and a delivery or notification being sent are each claimed in the
shared database by one process (`claimant_id`). While the work runs, `KeepAlive` renews
the claim from a background thread every `worker.heartbeat_seconds`; a claim not renewed
for `worker.stale_after_seconds` is taken over by another process, so a process that
dies or hangs delays its work, and loses none.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from typing import Protocol, TypeVar

__all__ = ["claimant_id", "KeepAlive", "work_claimed"]

log = logging.getLogger(__name__)


def claimant_id() -> str:
    """host:pid:random — unique across hosts and restarts; it names the holder of a claim."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


class KeepAlive:
    """Calls `renew` every `every` seconds until the block ends; `renew` returns False when
    the claim is no longer ours (taken over), and renewing stops. `what` names the work
    in log messages."""

    def __init__(self, renew: Callable[[], bool], every: float, what: str) -> None:
        self._renew, self._every, self._what = renew, every, what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"keepalive {what}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not self._renew():
                    log.warning("%s: the claim was taken over by another process", self._what)
                    return
            except Exception as exc:  # the database may be briefly unavailable: try again next time
                log.warning("%s: renewing the claim failed: %s", self._what, exc)

    def __enter__(self) -> "KeepAlive":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Claimed(Protocol):
    id: int
    taken_from: str | None  # the holder whose claim went stale, when this one took it over


C = TypeVar("C", bound=_Claimed)


def work_claimed(claim: Callable[[], C | None], renew: Callable[[int], bool], attempt: Callable[[C], None], *,
                 every: float, what: str, limit: int) -> int:
    """Claim an item (`claim` runs its own transaction), `attempt` it while its claim is
    kept alive, and again while any is due, at most `limit`; returns how many."""
    attempted = 0
    while attempted < limit:
        item = claim()
        if item is None:
            break
        if item.taken_from:
            log.warning("%s %d: taken over from %s, which stopped renewing its claim", what, item.id, item.taken_from)
        with KeepAlive(lambda: renew(item.id), every, f"{what} {item.id}"):
            attempt(item)
        attempted += 1
    return attempted
