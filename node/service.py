"""Assembling and running the node: `ichnode serve` and `ichnode worker`.

`serve` = Storage SCP + completion job + one sending thread per destination and one per
webhook URL + one polling job per [[sources]] PACS (pull mode) (+ a worker thread unless
worker.enabled_in_serve is false). `worker` =
only the analysis loop, for more processes or GPU hosts sharing the database and the
storage folder. Any number of each may share one database and one storage folder: every
job of `serve` (completion, deliveries, notifications, retention, the start-up recovery
of result folders) claims each row it acts on, so it runs safely in every process at once.

Start-up checks what is cheap before what is slow: the listening address, TLS files, the
paths of the config (checkpoint, storage.root, database file, log.path: before any of them
is created), the database and the triage log are checked before the model is loaded, so
a typo costs a second, not a minute, and leaves nothing behind.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler

from node.commitment import Commitments
from node.config import Config, check_paths
from node.dashboard import Dashboard, ModelInfo, inputs_line
from node.delivery import Deliveries, senders
from node.errors import ConfigError, DatabaseMissing, StorageError
from node.health import Readiness
from node.history import TriageHistory
from node.ingest import Ingest
from node.notify import Notifier
from node.output import model_warnings
from node.pull import Puller
from node.scp import start_scp, tls_context
from node.stow_in import StowReceiver
from node.triagelog import TriageLog
from node.web import create_app
from node.webserver import WebServer
from node.worker import NO_CHECKPOINT, Worker, recover_results
from storage.db import Database, utcnow
from storage.state import claim_purge, claim_store_marker, mark_ready, record_purge, store_marker
from storage.store import MARKER_FILE, InstanceStore
from training.inference.predictor import Predictor

__all__ = ["Node", "complete_quiet_studies", "purge_delivered", "load_predictor", "open_database",
           "upgrade_database", "check_storage_root", "serve", "run_worker", "stop_within", "STOP_SECONDS"]

# SIGTERM to exit, whatever is in flight: systemd allows a unit 90 s before it kills it,
# and an admin restarting the node should not wait on a slow PACS or a long analysis.
STOP_SECONDS = 10.0

# Hosts whose clocks differ by more than this are warned about at start-up: quiet times and
# heartbeats written by one host are read by another.
CLOCK_TOLERANCE_SECONDS = 2.0

log = logging.getLogger(__name__)


def load_predictor(config: Config) -> Predictor | None:
    """The configured model, or None without a checkpoint. A checkpoint that cannot be
    loaded raises CheckpointError naming the file and the reason."""
    if config.model.checkpoint is None:
        return None
    model = config.model
    predictor = Predictor.from_checkpoint(model.checkpoint, device=model.device, batch_size=model.batch_size,
                                          backend=model.backend, mixed_precision=model.mixed_precision,
                                          gradcam_layer=config.explain.gradcam_layer)
    predictor.warm_up()
    return predictor


def open_database(config: Config, store: InstanceStore | None = None, *, upgrade: bool | None = None) -> Database:
    """The node's database. With `store` (serve, worker, db upgrade) a missing database is
    created, but only on a first start: when the store already holds received instances,
    a new empty database would silently forget them, so that is refused. An older schema
    is upgraded when `upgrade` (default storage.auto_upgrade, for serve and worker only)."""
    create = store is not None and not store.holds_instances()
    if upgrade is None:
        upgrade = store is not None and config.storage.auto_upgrade
    try:
        database = Database(config.storage.database_url, create=create, upgrade=upgrade)
    except DatabaseMissing as exc:
        if store is not None and store.holds_instances():
            raise DatabaseMissing(f"{exc}; storage.root {store.root} already holds received instances, so this "
                                  "is not a first start: restore the database, or move storage.root aside "
                                  "to start afresh") from exc
        raise
    if database.created:
        log.warning("created a new, empty database at %s (first start)", database.shown)
    if database.upgraded_from:
        log.warning("upgraded the schema of %s from %s to revision %s", database.shown, database.upgraded_from,
                    database.revision)
    return database


def upgrade_database(config: Config) -> Database:
    """`ichnode db upgrade`: bring the database to this release's schema (creating its
    tables on a first start)."""
    store = InstanceStore(config.storage.root)
    return open_database(config, store, upgrade=True)


def check_storage_root(database: Database, store: InstanceStore, *, wait_seconds: float = 10.0) -> None:
    """Refuse to start on a storage.root that is not the folder this database's files are
    in (another host's mount, an empty mount point, a typo): such a process would claim
    studies and deliveries whose files it cannot see and fail them for good. The first
    process on a new (or upgraded) database records a marker and writes it into its
    folder; every later one must find the same marker there."""
    with database.read() as session:
        recorded = store_marker(session)
    found = store.marker()
    if recorded is None:
        marker = found or secrets.token_hex(16)
        with database.write() as session:
            recorded = claim_store_marker(session, marker)
        if recorded == marker and found is None:
            store.write_marker(marker)
            found = marker
    deadline = time.monotonic() + wait_seconds
    while found is None and time.monotonic() < deadline:  # a process starting beside this one may be writing it
        time.sleep(0.2)
        found = store.marker()
    if found != recorded:
        what = "has no marker" if found is None else f"holds marker {found}"
        raise ConfigError(
            f"storage.root {store.root} is not the storage folder of database {database.shown}: the folder "
            f"{what} ({MARKER_FILE}), the database expects {recorded}. Mount the shared storage folder at "
            "storage.root (or correct the key); this process claims no work until then. Only if the old "
            f"folder is lost for good and this one replaces it, write {recorded} into {store.root / MARKER_FILE}")
    log.info("storage.root %s is the database's storage folder (marker %s)", store.root, recorded)


def _check_clock(database: Database) -> None:
    """Warn when this host's clock and the database server's disagree (several hosts)."""
    offset = database.clock_offset_seconds()
    if abs(offset) > CLOCK_TOLERANCE_SECONDS:
        log.warning("this host's clock is %.1f s %s the database server's: keep every host of the node in sync "
                    "(NTP); completion.stable_seconds and worker.stale_after_seconds are measured across hosts",
                    abs(offset), "ahead of" if offset > 0 else "behind")


def complete_quiet_studies(config: Config, database: Database, triage_log: TriageLog) -> int:
    """Mark studies quiet for completion.stable_seconds ready and log each."""
    with database.write() as session:
        ready = mark_ready(session, config.completion.stable_seconds, utcnow())
    for study in ready:
        triage_log.write("ready", study.study_instance_uid, study.accession_number,
                         instances=study.instances, series=study.series)
    return len(ready)


def purge_delivered(config: Config, database: Database, store: InstanceStore, triage_log: TriageLog) -> int:
    """Delete the received instances of studies whose results were all delivered more
    than storage.retention_days ago; the study rows and result series stay. Each study
    is locked while its files go, so processes purging at once never purge one twice; a
    crash midway leaves it to be purged again (deleting a file twice is harmless)."""
    cutoff = utcnow() - dt.timedelta(days=config.storage.retention_days)
    purged = 0
    while True:
        with database.write() as session:
            study = claim_purge(session, cutoff)
            if study is None:
                return purged
            for path in study.instance_paths:
                store.delete(path)
            record_purge(session, study.id, utcnow())
        purged += 1
        triage_log.write("purged", study.study_instance_uid, study.accession_number,
                         instances=len(study.instance_paths), retention_days=config.storage.retention_days)


def check_listen_address(host: str, port: int, section: str, *, service: str = "DICOM") -> None:
    """ConfigError when `host` does not resolve or `port` cannot be bound (keys named
    as `<section>.host` and `<section>.port`)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise ConfigError(f"{section}.host {host!r} cannot be resolved: {exc.strerror}") from exc
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {section}.host {host} {section}.port {port}: {exc.strerror}"
                              f" (is another node or {service} service using it?)") from exc


@dataclass
class Node:
    """Everything a node process holds, built once from the config."""

    config: Config
    database: Database
    store: InstanceStore
    triage_log: TriageLog
    predictor: Predictor | None

    @classmethod
    def build(cls, config: Config) -> "Node":
        check_paths(config)  # every path first: a wrong one leaves no empty store, database or log behind
        # Instances, results, database (with its WAL files) and log: the node's user only.
        os.umask(0o077)
        store = InstanceStore(config.storage.root)
        store.ensure()
        triage_log = TriageLog(config.log.path, include_patient_identifiers=config.log.include_patient_identifiers)
        try:
            triage_log.check()
        except OSError as exc:
            raise ConfigError(f"log.path {config.log.path} cannot be written: {exc.strerror or exc}") from exc
        database = open_database(config, store)
        check_storage_root(database, store)
        _check_clock(database)
        recover_results(database, store, config.worker.stale_after_seconds)
        predictor = load_predictor(config)
        _announce_model(config, predictor)
        return cls(config, database, store, triage_log, predictor)

    def worker(self, recorded: Callable[[], None] = lambda: None) -> Worker:
        return Worker(self.config, self.database, self.store, self.predictor, self.triage_log, recorded=recorded)


def _announce_model(config: Config, predictor: Predictor | None) -> None:
    if config.silent:
        log.warning("delivery.mode = \"silent\": a silent trial; studies are analysed and logged, but nothing is "
                    "sent to a PACS or a webhook")
    if predictor is None:
        if config.worker.enabled_in_serve:
            log.warning("%s: studies are received and stored but not analysed", NO_CHECKPOINT)
        else:
            log.info("no model in this process (model.checkpoint is empty, worker.enabled_in_serve = false): "
                     "`ichnode worker` processes on this database analyse the studies")
        return
    provenance = predictor.config.provenance
    log.info("model %s on %s with %s (trained on: %s)", predictor.config.architecture, predictor.device,
             predictor.forward.name, provenance.training_data)
    log.info("triage rule in force: %s", config.triage.describe(predictor.config.triage))
    log.info("the model supports: %s", predictor.config.scope.describe())
    inputs = inputs_line(predictor.config.inputs)
    (log.info if predictor.config.inputs is not None else log.warning)("out-of-distribution check: %s", inputs)
    if config.triage.abstain:
        log.info("triage.abstain: studies outside what the model supports are NOT TRIAGED, never flagged or cleared")
    else:
        log.warning("triage.abstain = false (silent trial): every study gets the model's raw verdict; what the scope "
                    "and out-of-distribution checks find is only logged")
    for warning in model_warnings(provenance):
        log.warning("%s: every result of this model says so", warning)


def _wait_for_signal(stop: threading.Event) -> None:
    def handler(signum, _frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(0.5):
        pass


def _exit_now(code: int) -> None:
    """End the process at once, its log lines written (atexit would join stuck threads)."""
    logging.shutdown()
    os._exit(code)


def stop_within(seconds: float, *, exit_process: Callable[[int], object] = _exit_now) -> threading.Thread:
    """Make sure a stopping process ends `seconds` from now. What still runs then (an
    analysis, a C-STORE to a PACS that stopped answering, a job waiting on a busy
    database) is cut off as a crash would cut it, which the node is built to recover
    from: its claims go stale and are taken again, nothing acknowledged is lost."""
    def cut() -> None:
        time.sleep(seconds)
        busy = sorted(t.name for t in threading.enumerate()
                      if t.is_alive() and t is not threading.current_thread() and t is not threading.main_thread())
        log.warning("still busy %g s after the stop began (%s); exiting: unfinished work stays claimed and is "
                    "taken again after the restart", seconds, ", ".join(busy) or "shutting down")
        exit_process(0)

    watch = threading.Thread(target=cut, name="stop-deadline", daemon=True)
    watch.start()
    return watch


def _join_by(deadline: float, threads: list[threading.Thread]) -> None:
    """Join `threads`, all together waiting until `deadline` (time.monotonic) at most."""
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))


class _DatabaseWatch:
    """Says once, even when nothing arrives, that the database file vanished under the
    node: from then on stores are refused and no study is claimed (Database.check)."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self.reported = False

    def __call__(self) -> None:
        try:
            self.database.check()
        except DatabaseMissing as exc:
            if not self.reported:
                log.error("%s; stores are answered 0xA700 and no study is analysed", exc)
            self.reported = True


def _through_outages(job: Callable[..., object]) -> Callable[..., None]:
    """A scheduled job that skips its turn while the database is unreachable (Database
    logs the outage once) instead of logging a traceback at every turn."""
    def run(*args: object) -> None:
        try:
            job(*args)
        except StorageError as exc:
            if not exc.retryable:
                raise

    run.__name__ = getattr(job, "__name__", "job")
    return run


def _complete(ingest: Ingest, config: Config, database: Database, triage_log: TriageLog) -> None:
    """The completion job: holds first, so that a study whose refusals ended a moment ago
    (the database back) is held before it can be judged quiet."""
    ingest.renew_holds()
    complete_quiet_studies(config, database, triage_log)


def _scheduler(node: Node, ingest: Ingest, deliveries: Deliveries, notifier: Notifier,
               commitments: Commitments) -> BackgroundScheduler:
    config = node.config
    scheduler = BackgroundScheduler(timezone="UTC")
    # A study that went quiet because this process was down (the scanner's association
    # cut, its re-send not yet begun) gets a whole quiet time from the moment the node
    # listens again, rather than being analysed half-received at start-up.
    first_check = dt.datetime.now(dt.timezone.utc) + dt.timedelta(seconds=config.completion.stable_seconds)
    scheduler.add_job(_through_outages(_complete), "interval", args=[ingest, config, node.database, node.triage_log],
                      seconds=config.completion.check_interval_seconds, max_instances=1, coalesce=True,
                      next_run_time=first_check)
    scheduler.add_job(_through_outages(ingest.renew_holds), "interval",
                      seconds=config.completion.check_interval_seconds, max_instances=1, coalesce=True)
    for orphans in (deliveries.fail_orphans, notifier.fail_orphans):
        scheduler.add_job(_through_outages(orphans), "interval", seconds=10, max_instances=1, coalesce=True)
    # Storage Commitment reports that never came: failed attempts, sent again after the back-off.
    scheduler.add_job(_through_outages(commitments.fail_overdue), "interval",
                      seconds=min(10.0, config.delivery.commitment_timeout_seconds), max_instances=1, coalesce=True)
    scheduler.add_job(_DatabaseWatch(node.database), "interval", seconds=5, max_instances=1, coalesce=True)
    for source in config.sources:  # pull mode: the first poll once the SCP listens (C-MOVE sends to it)
        scheduler.add_job(_through_outages(Puller(config, source, node.database, ingest).poll), "interval",
                          seconds=source.interval_seconds, max_instances=1, coalesce=True,
                          next_run_time=dt.datetime.now(dt.timezone.utc), name=f"pull {source.name}")
    if config.storage.retention_days > 0:
        scheduler.add_job(_through_outages(purge_delivered), "interval",
                          args=[config, node.database, node.store, node.triage_log],
                          minutes=10, max_instances=1, coalesce=True,
                          next_run_time=dt.datetime.now(dt.timezone.utc))
    return scheduler


def _web(node: Node, scheduler: BackgroundScheduler, worker: Worker | None, ingest: Ingest) -> WebServer:
    """The pages, /metrics and health checks, reading what every process of the node shares;
    STOW-RS receive into `ingest` too when dicomweb.enabled."""
    config = node.config
    dashboard = Dashboard(config, node.database, node.store,
                          TriageHistory(config.log.path, days=config.web.history_days),
                          ModelInfo.of(config, node.predictor))
    readiness = Readiness(node.database, node.store, config.storage.min_free_mb,
                          model_loaded=node.predictor is not None,
                          model_configured=config.model.checkpoint is not None,
                          scheduler_running=lambda: scheduler.running,
                          worker=worker.liveness if worker is not None else None,
                          worker_stale_seconds=config.worker.stale_after_seconds, alerts=config.alerts)
    stow = StowReceiver(config.dicomweb, config.web.token, ingest, config.storage.root) \
        if config.dicomweb.enabled else None
    return WebServer(config, create_app(config, dashboard, readiness, stow))


def serve(config: Config) -> None:
    """Run the node until SIGTERM/SIGINT."""
    check_listen_address(config.node.host, config.node.port, "node")
    if config.web.enabled:
        check_listen_address(config.web.host, config.web.port, "web", service="web")
    tls_context(config.node)  # unreadable TLS files stop start-up here, before the model loads
    node = Node.build(config)
    stop = threading.Event()
    commitments = Commitments(config, node.database, node.triage_log)
    deliveries = Deliveries(config, node.database, node.store, senders(config), node.triage_log,
                            commitments=commitments)
    notifier = Notifier(config, node.database, node.triage_log)
    ingest = Ingest(node.store, node.database, node.triage_log, min_free_mb=config.storage.min_free_mb,
                    reopen_failed=config.completion.reopen_failed,
                    resend_wait_seconds=config.completion.resend_wait_seconds,
                    stable_seconds=config.completion.stable_seconds)
    server = start_scp(config.node, ingest, commitments)
    scheduler = _scheduler(node, ingest, deliveries, notifier, commitments)
    scheduler.start()
    threads = deliveries.start(stop)
    notifier.start(stop)
    worker = None
    if config.worker.enabled_in_serve:
        def recorded() -> None:
            deliveries.wake()
            notifier.wake()

        worker = node.worker(recorded=recorded)
        threads.append(threading.Thread(target=worker.run_forever, args=[stop], name="worker"))
        threads[-1].start()
    web = _web(node, scheduler, worker, ingest) if config.web.enabled else None
    try:
        if web is not None:
            web.start()
        destinations = ", ".join(f"{d.name}={d.described}" for d in config.destinations) or "none"
        sources = ", ".join(f"{s.name} every {s.interval_seconds:g} s" for s in config.sources) or "none"
        log.info("ready: AE %s on %s:%d; storage %s; destinations: %s; polling: %s; dashboard: %s; STOW-RS: %s",
                 config.node.ae_title, config.node.host, config.node.port, config.storage.root, destinations, sources,
                 config.web.url if web is not None else "off (web.enabled = false)",
                 f"{config.web.url}dicomweb/studies" if web is not None and config.dicomweb.enabled
                 else "off (dicomweb.enabled = false)")
        _wait_for_signal(stop)
    finally:
        stop.set()
        stop_within(STOP_SECONDS)
        deadline = time.monotonic() + STOP_SECONDS - 1  # a second for the last log lines
        if web is not None:
            web.stop(timeout=max(0.0, deadline - time.monotonic()))
        server.shutdown()
        scheduler.shutdown(wait=False)  # a job waiting on the database is cut off at the deadline
        notifier.join(max(0.0, deadline - time.monotonic()))
        _join_by(deadline, threads)  # a delivery to a PACS that stopped answering is left to the deadline
        left = [thread.name for thread in threads if thread.is_alive()]
        if left:
            log.warning("still busy: %s; cut off at the stop deadline, their work stays claimed", ", ".join(left))
        log.info("stopped")


def run_worker(config: Config) -> None:
    """Run an analysis-only worker until SIGTERM/SIGINT."""
    if config.model.checkpoint is None:
        raise ConfigError(f"ichnode worker needs a model: {NO_CHECKPOINT} is empty")
    node = Node.build(config)
    stop = threading.Event()
    worker = node.worker()
    thread = threading.Thread(target=worker.run_forever, args=[stop], name="worker")
    thread.start()
    log.info("worker %s analysing studies from %s", worker.owner, node.database.shown)
    try:
        _wait_for_signal(stop)
    finally:
        stop.set()
        stop_within(STOP_SECONDS)
        thread.join(STOP_SECONDS - 1)
