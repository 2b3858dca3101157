"""/metrics: the node in the Prometheus text format.

Figures are read when Prometheus scrapes, from the database and the triage log that every
process of the node shares, so one scrape of any `serve` process sees the whole node
(workers on other hosts included) and nothing is lost when a process restarts. Counters
come from the log (they restart from zero only if the log is moved aside, which
Prometheus treats as a counter reset); gauges from the database and the disk.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from node.dashboard import Dashboard
from node.history import STAGE_BUCKETS, StageHistogram
from storage.db import utcnow
from storage.state import queue_figures, state_counts

__all__ = ["NodeCollector", "registry"]


class NodeCollector(Collector):
    def __init__(self, dashboard: Dashboard) -> None:
        self.dashboard = dashboard

    def collect(self) -> Iterator[Metric]:
        dashboard = self.dashboard
        history = dashboard.history.refresh()
        with dashboard.database.read() as session:
            studies, deliveries, notifications = state_counts(session)
            figures = queue_figures(session, utcnow())

        yield _counter("ichnode_instances_received", "Distinct instances stored (a re-sent copy is not counted "
                       "again), every process of the node", figures.instances_stored)
        yield _by_label(GaugeMetricFamily, "ichnode_studies", "Studies by state", "state", studies)
        yield _by_label(CounterMetricFamily, "ichnode_analyses", "Analyses recorded in the triage log, by verdict",
                        "verdict", {"positive": 0, "negative": 0, "not_triaged": 0} | history.analyses)
        yield _stage_histogram(history.stages)
        yield _by_label(GaugeMetricFamily, "ichnode_deliveries", "Deliveries (one result object set for one "
                        "destination) by state", "state", deliveries)
        attempts = CounterMetricFamily("ichnode_delivery_attempts", "Delivery attempts by destination and outcome",
                                       labels=["destination", "outcome"])
        for (destination, outcome), count in sorted(history.deliveries.items()):
            attempts.add_metric([destination, outcome], count)
        yield attempts
        yield _by_label(GaugeMetricFamily, "ichnode_notifications", "Webhook notifications by state", "state",
                        notifications)
        yield _by_label(CounterMetricFamily, "ichnode_notification_attempts", "Notification attempts by outcome",
                        "outcome", {"sent": 0, "attempt_failed": 0} | history.notifications)
        yield _by_label(GaugeMetricFamily, "ichnode_queue_depth", "Work waiting, by queue", "queue",
                        {"analysis": figures.waiting, "delivery": figures.deliveries_pending,
                         "notification": figures.notifications_pending})
        yield _gauge("ichnode_oldest_waiting_study_age_seconds", "How long the longest-waiting ready study has "
                     "been quiet; 0 when none waits", figures.oldest_waiting_seconds)
        free = dashboard.store.free_mb() * 2**20
        yield _gauge("ichnode_storage_free_bytes", "Free space on the disk of storage.root", free)
        yield _gauge("ichnode_storage_min_free_bytes", "storage.min_free_mb: below it stores are refused",
                     dashboard.config.storage.min_free_mb * 2**20)
        yield _counter("ichnode_triage_log_unreadable_lines", "Triage log lines that are not JSON events "
                       "(torn by a crash or a full disk)", history.unreadable_lines)
        model = dashboard.model_info
        info = InfoMetricFamily("ichnode_model", "The checkpoint in force and what it was trained on")
        info.add_metric([], {"checkpoint": model.checkpoint or "", "architecture": model.architecture or "",
                             "training_data": model.training_data or "", "device": model.device or "",
                             "backend": model.backend or ""})
        yield info
        yield _gauge("ichnode_model_loaded", "1 when a model is loaded, 0 when none is configured",
                     1.0 if model.loaded else 0.0)


def registry(dashboard: Dashboard) -> CollectorRegistry:
    """A registry of the node's figures alone (no process or Python metrics of the library's
    default registry: they would describe only the process that happens to be scraped)."""
    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(NodeCollector(dashboard))
    return collectors


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=value)


def _by_label(kind: type, name: str, documentation: str, label: str, values: dict[str, int]) -> Metric:
    family = kind(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _stage_histogram(stages: dict[str, StageHistogram]) -> HistogramMetricFamily:
    family = HistogramMetricFamily("ichnode_analysis_stage_seconds", "Seconds each analysis spent in each stage",
                                   labels=["stage"])
    for stage, histogram in sorted(stages.items()):
        cumulative, buckets = 0, []
        for bound, count in zip([*map(str, STAGE_BUCKETS), "+Inf"], histogram.counts):
            cumulative += count
            buckets.append((bound, cumulative))
        family.add_metric([stage], buckets, histogram.total)
    return family
