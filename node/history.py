"""What the triage log says over time, for the web pages and /metrics.

The log is the one record every process of a node writes to (serve, workers, on any host
sharing the folder), so it, not this process's memory, is where analyses, deliveries and
their timings are counted. `TriageHistory.refresh()` reads only what was appended since
the last call; totals cover the whole log, per-study and per-day figures the last
`days` days, so memory stays bounded however long the node runs.
"""

from __future__ import annotations

import bisect
import collections
import datetime as dt
import threading
from dataclasses import dataclass, field
from pathlib import Path

from node.triagelog import LogReader

__all__ = ["STAGE_BUCKETS", "Analysis", "StageHistogram", "Day", "HistorySnapshot", "TriageHistory"]

# Upper bounds (seconds) of the analysis-stage histogram: a CPU study takes seconds, a
# large one on a busy host a minute or more.
STAGE_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class Analysis:
    """One `analysed` event, reduced to what the pages plot and list."""

    time: dt.datetime  # UTC, naive like the database's timestamps
    study_instance_uid: str
    positive: bool
    study_score: float | None  # None: not triaged (no verdict, so no score)
    timings: dict[str, float]

    @property
    def triaged(self) -> bool:
        return self.study_score is not None


@dataclass
class StageHistogram:
    """Cumulative-ready bucket counts of one stage's seconds (Prometheus histogram)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(STAGE_BUCKETS) + 1))  # last: > every bound
    total: float = 0.0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(STAGE_BUCKETS, seconds)] += 1
        self.total += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True)
class Day:
    date: dt.date
    analyses: int
    positives: int
    not_triaged: int = 0
    failed: int = 0  # analyses that ended in failure (no result): counted apart from `analyses`

    @property
    def studies(self) -> int:
        """Every analysis that ended, with a result or failed."""
        return self.analyses + self.failed

    @property
    def positive_rate(self) -> float | None:
        """Positives among the studies given a verdict."""
        triaged = self.analyses - self.not_triaged
        return self.positives / triaged if triaged else None

    @property
    def not_triaged_rate(self) -> float | None:
        """The share the model did not answer for: a rise says the inputs changed."""
        return self.not_triaged / self.analyses if self.analyses else None


@dataclass(frozen=True)
class HistorySnapshot:
    """A consistent copy of the figures, safe to use while the log is read further."""

    events: dict[str, int]  # every event ever logged, by kind
    analyses: dict[str, int]  # positive / negative / not_triaged
    deliveries: dict[tuple[str, str], int]  # (destination, "sent" | "attempt_failed")
    notifications: dict[str, int]  # "sent" | "attempt_failed"
    stages: dict[str, StageHistogram]
    recent: list[Analysis]  # the last `days` days, oldest first
    unreadable_lines: int
    recent_failures: list[dt.datetime] = field(default_factory=list)  # `failed` events of the last `days` days

    def days(self, today: dt.date, count: int) -> list[Day]:
        """Analyses, positives, studies not triaged and failures per UTC day, for the `count`
        days up to `today` (empty days too)."""
        per_day: dict[dt.date, list[int]] = {today - dt.timedelta(days=i): [0, 0, 0, 0] for i in range(count)}
        for analysis in self.recent:
            tally = per_day.get(analysis.time.date())
            if tally is not None:
                tally[0] += 1
                tally[1] += analysis.positive
                tally[2] += not analysis.triaged
        for when in self.recent_failures:
            tally = per_day.get(when.date())
            if tally is not None:
                tally[3] += 1
        return [Day(date, *per_day[date]) for date in sorted(per_day)]

    def latest(self) -> dict[str, Analysis]:
        """Each study's latest analysis within the window."""
        return {analysis.study_instance_uid: analysis for analysis in self.recent}


class TriageHistory:
    """The triage log, read incrementally; thread-safe."""

    def __init__(self, path: Path, *, days: int = 30) -> None:
        self.path = Path(path)
        self.days = days
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self._reader = LogReader(self.path)
        self._events: collections.Counter[str] = collections.Counter()
        self._analyses: collections.Counter[str] = collections.Counter()
        self._deliveries: collections.Counter[tuple[str, str]] = collections.Counter()
        self._notifications: collections.Counter[str] = collections.Counter()
        self._stages: dict[str, StageHistogram] = {}
        self._recent: collections.deque[Analysis] = collections.deque()
        self._recent_failures: collections.deque[dt.datetime] = collections.deque()

    def refresh(self, now: dt.datetime | None = None) -> HistorySnapshot:
        """Read what was appended and return the figures. A log that shrank (moved aside
        and started again) is read afresh from its start."""
        with self._lock:
            try:
                if self.path.stat().st_size < self._reader.offset:
                    self._reset()
            except FileNotFoundError:
                self._reset()
            for event in self._reader.read_new():
                self._count(event)
            cutoff = (now or _utcnow()) - dt.timedelta(days=self.days)
            while self._recent and self._recent[0].time < cutoff:
                self._recent.popleft()
            while self._recent_failures and self._recent_failures[0] < cutoff:
                self._recent_failures.popleft()
            return HistorySnapshot(
                events=dict(self._events), analyses=dict(self._analyses), deliveries=dict(self._deliveries),
                notifications=dict(self._notifications),
                stages={k: StageHistogram(list(v.counts), v.total) for k, v in self._stages.items()},
                recent=list(self._recent), unreadable_lines=self._reader.skipped,
                recent_failures=list(self._recent_failures),
            )

    def _count(self, event: dict) -> None:
        kind = str(event.get("event", ""))
        self._events[kind] += 1
        if kind in ("delivered", "delivery_failed"):
            outcome = "sent" if kind == "delivered" else "attempt_failed"
            self._deliveries[(str(event.get("destination", "")), outcome)] += 1
        elif kind in ("notified", "notify_failed"):
            self._notifications["sent" if kind == "notified" else "attempt_failed"] += 1
        elif kind == "analysed":
            self._analysed(event)
        elif kind == "failed" and (when := _parse_time(event.get("time"))) is not None:
            bisect.insort(self._recent_failures, when)  # processes' lines may come out of order

    def _analysed(self, event: dict) -> None:
        positive, triaged = bool(event.get("positive")), event.get("triaged", True) is not False
        self._analyses["not_triaged" if not triaged else "positive" if positive else "negative"] += 1
        timings = {str(k): float(v) for k, v in (event.get("timings_s") or {}).items()
                   if isinstance(v, (int, float))}
        for stage, seconds in timings.items():
            self._stages.setdefault(stage, StageHistogram()).add(seconds)
        when = _parse_time(event.get("time"))
        score = event.get("study_score")
        if when is None or (triaged and not isinstance(score, (int, float))):
            return
        analysis = Analysis(when, str(event.get("study_instance_uid", "")), positive,
                            float(score) if triaged else None, timings)
        if self._recent and when < self._recent[-1].time:  # two processes' lines out of order
            bisect.insort(self._recent, analysis, key=lambda a: a.time)
        else:
            self._recent.append(analysis)


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


def _parse_time(value: object) -> dt.datetime | None:
    """The log's ISO time as naive UTC, or None when missing or malformed."""
    try:
        parsed = dt.datetime.fromisoformat(str(value))
    except ValueError:
        return None
    if parsed.tzinfo is not None:
        parsed = parsed.astimezone(dt.timezone.utc).replace(tzinfo=None)
    return parsed
