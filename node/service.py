"""Assembling and running the node: `ichnode serve` and `ichnode worker`.

`serve` = Storage SCP + completion job + delivery job (+ a worker thread unless
worker.enabled_in_serve is false). `worker` = only the analysis loop, for more processes
or GPU hosts sharing the database and the storage folder.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import signal
import threading
from dataclasses import dataclass

from apscheduler.schedulers.background import BackgroundScheduler
from sqlalchemy import distinct, func, select
from sqlalchemy.orm import sessionmaker

from node.config import Config
from node.delivery import DicomSender, Sender, deliver_due
from node.errors import ConfigError
from node.ingest import Ingest
from node.output import model_warnings
from node.scp import start_scp
from node.triagelog import TriageLog
from node.worker import NO_CHECKPOINT, Analyzer, Worker
from storage.db import Instance, make_engine, make_sessionmaker, utcnow
from storage.state import mark_ready, purge_candidates, record_purge
from storage.store import InstanceStore
from training.predictor import Predictor

__all__ = ["Node", "complete_quiet_studies", "load_predictor", "serve", "run_worker"]

log = logging.getLogger(__name__)


def load_predictor(config: Config) -> Predictor | None:
    """The configured model, or None without a checkpoint. A checkpoint that cannot be
    loaded raises CheckpointError naming the file and the reason."""
    if config.model.checkpoint is None:
        return None
    model = config.model
    return Predictor.from_checkpoint(model.checkpoint, device=model.device, batch_size=model.batch_size,
                                     backend=model.backend, mixed_precision=model.mixed_precision,
                                     gradcam_layer=config.explain.gradcam_layer)


def complete_quiet_studies(config: Config, sessions: sessionmaker, triage_log: TriageLog) -> int:
    """Mark studies quiet for completion.stable_seconds ready and log each."""
    with sessions() as session:
        ready = mark_ready(session, config.completion.stable_seconds, utcnow())
        session.commit()
        for study in ready:
            series = session.scalar(
                select(func.count(distinct(Instance.series_instance_uid))).where(Instance.study_id == study.id)
            )
            triage_log.write("ready", study.study_instance_uid, study.accession_number,
                             instances=study.instance_count, series=series)
    return len(ready)


def purge_delivered(config: Config, sessions: sessionmaker, store: InstanceStore, triage_log: TriageLog) -> int:
    """Delete the received instances of studies whose results were all delivered more
    than storage.retention_days ago; the study rows and result series stay."""
    cutoff = utcnow() - dt.timedelta(days=config.storage.retention_days)
    with sessions() as session:
        studies = purge_candidates(session, cutoff)
        session.commit()
    for study_id, uid, accession, paths in studies:
        for path in paths:
            store.delete(path)
        with sessions() as session:
            record_purge(session, study_id, utcnow())
        triage_log.write("purged", uid, accession, instances=len(paths),
                         retention_days=config.storage.retention_days)
    return len(studies)


@dataclass
class Node:
    """Everything a node process holds, built once from the config."""

    config: Config
    sessions: sessionmaker
    store: InstanceStore
    triage_log: TriageLog
    predictor: Predictor | None

    @classmethod
    def build(cls, config: Config) -> "Node":
        # Instances, results, database (with its WAL files) and log: the node's user only.
        os.umask(0o077)
        store = InstanceStore(config.storage.root)
        store.ensure()
        sessions = make_sessionmaker(make_engine(config.storage.database_url))
        triage_log = TriageLog(config.log.path, include_patient_identifiers=config.log.include_patient_identifiers)
        return cls(config, sessions, store, triage_log, load_predictor(config))

    def worker(self) -> Worker:
        analyzer = Analyzer(self.predictor, self.config, self.store) if self.predictor else None
        return Worker(self.config, self.sessions, self.store, analyzer, self.triage_log)


def _wait_for_signal(stop: threading.Event) -> None:
    def handler(signum, _frame) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    while not stop.wait(0.5):
        pass


def serve(config: Config, *, sender: Sender | None = None, stop: threading.Event | None = None) -> None:
    """Run the node until SIGTERM/SIGINT (or `stop` is set)."""
    node = Node.build(config)
    stop = stop or threading.Event()
    sender = sender or DicomSender(config.calling_ae_title, config.delivery.timeout_seconds)
    if node.predictor is None:
        log.warning("%s: studies are received and stored but not analysed", NO_CHECKPOINT)
    else:
        provenance = node.predictor.config.provenance
        log.info("model %s on %s with %s (trained on: %s)", node.predictor.config.architecture,
                 node.predictor.device, node.predictor.forward.name, provenance.training_data)
        for warning in model_warnings(provenance):
            log.warning("%s: every result of this model says so", warning)
    ingest = Ingest(node.store, node.sessions, node.triage_log, min_free_mb=config.storage.min_free_mb)
    server = start_scp(config.node, ingest)
    scheduler = BackgroundScheduler(timezone="UTC")
    scheduler.add_job(complete_quiet_studies, "interval", args=[config, node.sessions, node.triage_log],
                      seconds=config.completion.check_interval_seconds, max_instances=1, coalesce=True)
    scheduler.add_job(deliver_due, "interval", args=[config, node.sessions, node.store, sender, node.triage_log],
                      seconds=1.0, max_instances=1, coalesce=True)
    if config.storage.retention_days > 0:
        scheduler.add_job(purge_delivered, "interval", args=[config, node.sessions, node.store, node.triage_log],
                          minutes=10, max_instances=1, coalesce=True, next_run_time=dt.datetime.now(dt.timezone.utc))
    scheduler.start()
    threads = []
    if config.worker.enabled_in_serve:
        threads.append(threading.Thread(target=node.worker().run_forever, args=[stop], name="worker"))
        threads[-1].start()
    destinations = ", ".join(f"{d.name}={d.ae_title}@{d.host}:{d.port}" for d in config.destinations) or "none"
    log.info("ready: AE %s on %s:%d; storage %s; destinations: %s", config.node.ae_title,
             config.node.host, config.node.port, config.storage.root, destinations)
    try:
        _wait_for_signal(stop)
    finally:
        stop.set()
        server.shutdown()
        scheduler.shutdown(wait=True)
        for thread in threads:
            thread.join()
        log.info("stopped")


def run_worker(config: Config, *, stop: threading.Event | None = None) -> None:
    """Run an analysis-only worker until SIGTERM/SIGINT."""
    node = Node.build(config)
    if node.predictor is None:
        raise ConfigError(f"ichnode worker needs a model: {NO_CHECKPOINT} is empty")
    stop = stop or threading.Event()
    worker = node.worker()
    thread = threading.Thread(target=worker.run_forever, args=[stop], name="worker")
    thread.start()
    log.info("worker %s analysing studies from %s", worker.owner, config.storage.database_url)
    try:
        _wait_for_signal(stop)
    finally:
        stop.set()
        thread.join()
