"""Readiness: can this node take a study and give back a result right now?

Each check answers for one part and names what is wrong, so that the HTTP 503 of
/readyz tells an admin (or a load balancer's log) where to look. Checks are cheap: two
read transactions, one small file written and removed, and a few attribute reads.

A node can be ready and still *degraded*: it takes studies in, but the results of a
flagged study have not reached the PACS (alerts.undelivered_after_seconds). That is not
a reason to send scanners elsewhere, so /readyz stays 200 unless
alerts.undelivered_http_status says otherwise; its detail gives counts and ages, never a
study's identifiers, since /readyz is open without the token.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from node.config import AlertsSection
from node.errors import IchNodeError
from storage.db import Database, utcnow
from storage.state import state_counts, undelivered_flagged
from storage.store import InstanceStore
from training.model.rule import POSITIVE_LABEL

__all__ = ["Check", "Liveness", "Readiness"]


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    degraded: bool = False  # ok, but an admin must act (results not delivered)


class Liveness:
    """When a loop last went round; a loop stuck in one study or dead goes stale."""

    def __init__(self) -> None:
        self._at = time.monotonic()

    def beat(self) -> None:
        self._at = time.monotonic()

    @property
    def age_seconds(self) -> float:
        return time.monotonic() - self._at


@dataclass
class Readiness:
    """The checks of one `serve` process. `worker` is None when analysis runs elsewhere
    (worker.enabled_in_serve = false); `scheduler_running` reports the housekeeping jobs."""

    database: Database
    store: InstanceStore
    min_free_mb: int
    model_loaded: bool
    model_configured: bool
    scheduler_running: Callable[[], bool]
    worker: Liveness | None
    worker_stale_seconds: float
    alerts: AlertsSection = field(default_factory=AlertsSection)

    def checks(self) -> list[Check]:
        return [self._database(), self._storage(), self._model(), self._scheduler(), self._worker(),
                self._deliveries()]

    def _deliveries(self) -> Check:
        after = self.alerts.undelivered_after_seconds
        now = utcnow()
        try:
            with self.database.read() as session:
                stuck = [(delivery.created_at, f"{delivery.destination} {delivery.kind} {delivery.state.value}")
                         for _, delivery in undelivered_flagged(session, POSITIVE_LABEL,
                                                                now - dt.timedelta(seconds=after))]
        except IchNodeError:  # the database check fails and names it
            return Check("deliveries", True, "not known: the database cannot be read")
        if not stuck:
            return Check("deliveries", True, f"no flagged study's results undelivered (alerts.undelivered_after_"
                                             f"seconds = {after:g})")
        since, what = min(stuck)
        count = f"{len(stuck)} flagged {'study' if len(stuck) == 1 else 'studies'}"
        return Check("deliveries", True, f"{count} with results not delivered: a delivery failed or pending more than "
                                         f"{after:g} s (the oldest for {(now - since).total_seconds():.0f} s: "
                                         f"{what}); the failures page lists them", degraded=True)

    def _database(self) -> Check:
        try:
            with self.database.read() as session:
                state_counts(session)
        except IchNodeError as exc:
            return Check("database", False, str(exc))
        return Check("database", True, self.database.shown)

    def _storage(self) -> Check:
        problem = self.store.refusal(self.min_free_mb)
        if problem is not None:
            return Check("storage", False, problem)
        free, inodes = self.store.free_mb(), self.store.free_inodes()
        return Check("storage", True, f"{free:.0f} MiB free" + (f", {inodes} inodes free" if inodes is not None else ""))

    def _model(self) -> Check:
        if self.model_loaded:
            return Check("model", True, "loaded")
        if not self.model_configured:
            return Check("model", True, "none configured (model.checkpoint): studies are stored, not analysed")
        return Check("model", False, "configured but not loaded")

    def _scheduler(self) -> Check:
        running = self.scheduler_running()
        return Check("scheduler", running, "running" if running else "stopped: studies are never marked ready")

    def _worker(self) -> Check:
        if self.worker is None:
            return Check("worker", True, "not in this process (worker.enabled_in_serve = false)")
        age = self.worker.age_seconds
        if age > self.worker_stale_seconds:
            return Check("worker", False, f"the analysis loop last went round {age:.0f} s ago "
                                          f"(more than worker.stale_after_seconds = {self.worker_stale_seconds:g})")
        return Check("worker", True, f"last went round {age:.1f} s ago")
