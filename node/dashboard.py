"""What an admin sees: the queue, one study, the failures, the model over time; and what
an admin may do about it: retry failed sends, re-analyse studies.

The web pages, /metrics and `ichnode status --json` all read through here, so a figure
on a page, in Prometheus and in a script is the same query; the web pages' buttons and
`ichnode retry` / `ichnode reanalyse` make the same change. Views are plain frozen
dataclasses (`as_json` turns one into JSON-ready data). Nothing here shows a patient's
name, ID or birth date unless `log.include_patient_identifiers` is set, and a webhook URL
(whose path is often its secret) is shown as its scheme and host only.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import io
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
from PIL import Image

from node.config import Config, redact_url
from node.errors import InvalidInstance
from node.history import Analysis, Day, TriageHistory
from node.triagelog import PATIENT_KEYS, LogReader, TriageLog, describe
from storage.db import Database, Delivery, Notification, Study, StudyState, utcnow
from storage.state import (
    QueueFigures,
    ReanalyseOutcome,
    Reanalysis,
    failed_outgoing,
    failed_studies,
    failed_study_uids,
    find_studies,
    outgoing_of,
    queue_figures,
    reanalyse_study,
    retry_failed,
    state_counts,
    study_by_uid,
    undelivered_flagged,
)
from storage.store import InstanceStore
from training.model.inputs import InputProfile
from training.model.rule import NEGATIVE_LABEL, POSITIVE_LABEL
from training.model.scope import NOT_TRIAGED_LABEL

if TYPE_CHECKING:  # `ichnode status` reads the queue without loading torch
    from training.inference.predictor import Predictor

__all__ = ["VerdictFilter", "QueueFilter", "ModelInfo", "StudyName", "Undelivered", "Dashboard", "as_json",
           "inputs_line", "REANALYSIS_TEXTS", "reanalysis_line"]

log = logging.getLogger(__name__)
_IMAGE_NAME = re.compile(r"sc-[0-9]{4}")


class VerdictFilter(enum.StrEnum):
    POSITIVE = "positive"
    NEGATIVE = "negative"
    NOT_TRIAGED = "not_triaged"  # outside what the model supports: no verdict
    NONE = "none"  # not analysed (yet)


@dataclass(frozen=True)
class QueueFilter:
    """Which studies the queue lists; built from a page's query string, checked here."""

    state: StudyState | None = None
    verdict: VerdictFilter | None = None
    limit: int = 50

    @classmethod
    def parse(cls, state: str | None, verdict: str | None, limit: str | int | None = None) -> "QueueFilter":
        """ValueError naming the parameter and the values it takes."""
        try:
            chosen_state = StudyState(state) if state else None
        except ValueError:
            raise ValueError(f"state must be one of {', '.join(s.value for s in StudyState)}, "
                             f"got {state!r}") from None
        try:
            chosen_verdict = VerdictFilter(verdict) if verdict else None
        except ValueError:
            raise ValueError(f"verdict must be one of {', '.join(VerdictFilter)}, got {verdict!r}") from None
        try:
            count = int(limit) if limit not in (None, "") else 50
        except ValueError:
            raise ValueError(f"limit must be a whole number, got {limit!r}") from None
        if not 1 <= count <= 1000:
            raise ValueError(f"limit must be 1-1000, got {count}")
        return cls(chosen_state, chosen_verdict, count)


def inputs_line(profile: InputProfile | None) -> str:
    """The out-of-distribution check in words, for start-up and the model page."""
    if profile is None:
        return ("none: the checkpoint describes no training inputs, so studies unlike them cannot be recognised "
                "(write one with `ichnode fit-ood`)")
    return profile.describe()


@dataclass(frozen=True)
class ModelInfo:
    """The checkpoint in force and what it says about itself."""

    checkpoint: str | None
    loaded: bool
    architecture: str | None = None
    training_data: str | None = None
    description: str | None = None
    created: str | None = None
    code_version: str | None = None
    metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    device: str | None = None
    backend: str | None = None
    warnings: tuple[str, ...] = ()
    rule: str = ""
    scope: str = ""  # what the checkpoint supports
    inputs: str = ""  # its out-of-distribution profile, or why there is none
    abstain: bool = True

    @classmethod
    def of(cls, config: Config, predictor: Predictor | None) -> "ModelInfo":
        checkpoint = str(config.model.checkpoint) if config.model.checkpoint else None
        rule = config.triage.describe(predictor.config.triage if predictor is not None else None)
        if predictor is None:
            return cls(checkpoint, False, rule=rule, abstain=config.triage.abstain)
        from node.output import model_warnings  # the imaging libraries: loaded with the model anyway

        model = predictor.config
        provenance = model.provenance
        return cls(checkpoint, True, model.architecture, provenance.training_data, provenance.description,
                   provenance.created, provenance.code_version, dict(provenance.metrics), str(predictor.device),
                   predictor.forward.name, tuple(model_warnings(provenance)), rule, model.scope.describe(),
                   inputs_line(model.inputs), config.triage.abstain)


@dataclass(frozen=True)
class OutgoingRow:
    """One delivery or notification, as a page lists it."""

    target: str  # destination name, or the webhook's scheme and host
    kind: str  # sc / sr / kos, or "webhook"
    state: str
    attempts: int
    last_error: str | None
    created_at: dt.datetime
    sent_at: dt.datetime | None  # when the C-STOREs (or the POST) ended
    next_attempt_at: dt.datetime | None
    # Storage Commitment: when the destination reported every object committed (None
    # without commitment; state "committing" while its report is awaited).
    committed_at: dt.datetime | None = None

    @classmethod
    def of(cls, row: Delivery | Notification) -> "OutgoingRow":
        error = row.last_error
        committed_at = None
        if isinstance(row, Delivery):
            target, kind, committed_at = row.destination, row.kind, row.committed_at
        else:
            target, kind = redact_url(row.url), "webhook"
            error = error and error.replace(row.url, target)  # recorded by a release that did not redact it
        waiting = row.state.value == "pending"
        return cls(target, kind, row.state.value, row.attempts, error, row.created_at, row.sent_at,
                   row.next_attempt_at if waiting else None, committed_at)


@dataclass(frozen=True)
class StudyName:
    """How a person tells a study apart: its accession number, or else its date, modality,
    description and the end of its UID (the pages show no patient name)."""

    study_instance_uid: str
    accession_number: str
    study_date: str  # DICOM DA (YYYYMMDD) as received; "" when the study had none
    modality: str
    study_description: str
    received_at: dt.datetime

    @classmethod
    def of(cls, study: Study) -> "StudyName":
        return cls(study.study_instance_uid, study.accession_number, study.study_date, study.modality,
                   study.study_description, study.first_received_at)

    @property
    def short_uid(self) -> str:
        """The UID's last digits: UIDs of one site share a long root and differ at the end."""
        uid = self.study_instance_uid
        return uid if len(uid) <= 14 else "…" + uid[-12:]

    @property
    def date(self) -> str:
        """StudyDate as YYYY-MM-DD, or the day it was received when it has none (or a malformed one)."""
        try:
            return dt.datetime.strptime(self.study_date, "%Y%m%d").date().isoformat()
        except ValueError:
            return f"received {self.received_at.date().isoformat()}"

    @property
    def text(self) -> str:
        if self.accession_number:
            return self.accession_number
        return " · ".join(p for p in (self.date, self.modality, self.study_description, self.short_uid) if p)


@dataclass(frozen=True)
class StudyRow:
    study_instance_uid: str
    accession_number: str
    state: str
    received_at: dt.datetime
    last_received_at: dt.datetime
    updated_at: dt.datetime
    instances: int
    verdict: str | None
    positive: bool
    study_score: float | None
    analyses: int
    attempts: int
    last_error: str | None
    timings_s: dict[str, float]  # of the latest analysis, from the triage log (last history days)
    deliveries: tuple[OutgoingRow, ...]
    notifications: tuple[OutgoingRow, ...]
    name: StudyName
    undelivered: bool  # flagged, and a delivery failed or is pending too long (alerts.undelivered_after_seconds)

    @classmethod
    def of(cls, study: Study, latest: Analysis | None, deliveries: list[Delivery],
           notifications: list[Notification], *, undelivered: bool = False) -> "StudyRow":
        return cls(study.study_instance_uid, study.accession_number, study.state.value, study.first_received_at,
                   study.last_received_at, study.updated_at, study.instance_count, study.verdict,
                   study.verdict == POSITIVE_LABEL, study.study_score, study.analyses, study.attempts,
                   study.last_error, dict(latest.timings) if latest else {},
                   tuple(OutgoingRow.of(d) for d in deliveries), tuple(OutgoingRow.of(n) for n in notifications),
                   StudyName.of(study), undelivered)


@dataclass(frozen=True)
class QueueView:
    generated_at: dt.datetime
    studies_by_state: dict[str, int]
    deliveries_by_state: dict[str, int]
    notifications_by_state: dict[str, int]
    figures: QueueFigures
    filter: QueueFilter
    studies: tuple[StudyRow, ...]


@dataclass(frozen=True)
class TimelineEvent:
    time: str
    event: str
    text: str
    fields: dict[str, Any]


@dataclass(frozen=True)
class StudyView:
    study: StudyRow
    purged_at: dt.datetime | None
    result_series_uid: str | None
    analysis: dict[str, Any] | None  # the latest `analysed` event: series chosen, passed over, slices left out
    timeline: tuple[TimelineEvent, ...]
    images: tuple[str, ...]  # names of the Secondary Capture pictures the node sent (sc-0001, …)


@dataclass(frozen=True)
class FailureRow:
    study_instance_uid: str
    accession_number: str
    outgoing: OutgoingRow
    name: StudyName
    verdict: str | None  # the study's latest verdict: a failed delivery of a flagged one is urgent
    positive: bool

    @classmethod
    def of(cls, outgoing: Delivery | Notification, study: Study) -> "FailureRow":
        return cls(study.study_instance_uid, study.accession_number, OutgoingRow.of(outgoing), StudyName.of(study),
                   study.verdict, study.verdict == POSITIVE_LABEL)


@dataclass(frozen=True)
class Undelivered:
    """A flagged study whose results have not reached the PACS: the banner on every page."""

    name: StudyName
    delivery: OutgoingRow  # its oldest undelivered delivery (created_at: when its result was made)


@dataclass(frozen=True)
class FailuresView:
    studies: tuple[StudyRow, ...]
    deliveries: tuple[FailureRow, ...]
    notifications: tuple[FailureRow, ...]


@dataclass(frozen=True)
class ModelView:
    model: ModelInfo
    days: tuple[Day, ...]
    scores: tuple[float, ...]  # study scores of the window's analyses that were triaged
    history_days: int

    @property
    def totals(self) -> Day:
        """The window's days added up: the headline and the table count the same studies."""
        return Day(self.days[-1].date, sum(d.analyses for d in self.days), sum(d.positives for d in self.days),
                   sum(d.not_triaged for d in self.days), sum(d.failed for d in self.days))


class Dashboard:
    """The node's state as the pages and /metrics show it: one database, one triage log."""

    def __init__(self, config: Config, database: Database, store: InstanceStore, history: TriageHistory,
                 model: ModelInfo) -> None:
        self.config = config
        self.database = database
        self.store = store
        self.history = history
        self.model_info = model
        self.triage_log = TriageLog(config.log.path,
                                    include_patient_identifiers=config.log.include_patient_identifiers)

    def queue(self, chosen: QueueFilter = QueueFilter()) -> QueueView:
        latest = self.history.refresh().latest()
        with self.database.read() as session:
            studies, deliveries, notifications = state_counts(session)
            figures = queue_figures(session, utcnow())
            found = find_studies(session, limit=chosen.limit, state=chosen.state,
                                 verdict={VerdictFilter.POSITIVE: POSITIVE_LABEL,
                                          VerdictFilter.NEGATIVE: NEGATIVE_LABEL,
                                          VerdictFilter.NOT_TRIAGED: NOT_TRIAGED_LABEL}.get(chosen.verdict),
                                 unanalysed=chosen.verdict == VerdictFilter.NONE)
            outgoing, notified = outgoing_of(session, [s.id for s in found])
            stuck = {s.id for s, _ in undelivered_flagged(session, POSITIVE_LABEL, self._pending_before())}
            rows = tuple(StudyRow.of(s, latest.get(s.study_instance_uid), outgoing[s.id], notified[s.id],
                                     undelivered=s.id in stuck) for s in found)
        return QueueView(utcnow(), studies, deliveries, notifications, figures, chosen, rows)

    def study(self, study_instance_uid: str) -> StudyView | None:
        latest = self.history.refresh().latest()
        with self.database.read() as session:
            study = study_by_uid(session, study_instance_uid)
            if study is None:
                return None
            outgoing, notified = outgoing_of(session, [study.id])
            row = StudyRow.of(study, latest.get(study_instance_uid), outgoing[study.id], notified[study.id],
                              undelivered=any(s.id == study.id for s, _ in undelivered_flagged(
                                  session, POSITIVE_LABEL, self._pending_before())))
            purged_at, result_series = study.purged_at, study.result_series_uid
        events = [_redacted(e) for e in LogReader(self.config.log.path).read_study(study_instance_uid)]
        analysed = [e for e in events if e.get("event") == "analysed"]
        timeline = tuple(TimelineEvent(str(e.get("time", "")), str(e.get("event", "")), describe(e), self._shown(e))
                         for e in events)
        return StudyView(row, purged_at, result_series, self._shown(analysed[-1]) if analysed else None,
                         timeline, self._images(study_instance_uid, result_series))

    def _pending_before(self) -> dt.datetime:
        """A flagged study's delivery queued before this and still pending is overdue."""
        return utcnow() - dt.timedelta(seconds=self.config.alerts.undelivered_after_seconds)

    def undelivered(self) -> tuple[Undelivered, ...]:
        """Flagged studies whose results have not reached the PACS: a delivery failed, or has
        been pending longer than alerts.undelivered_after_seconds. /readyz counts the same."""
        with self.database.read() as session:
            return tuple(Undelivered(StudyName.of(study), OutgoingRow.of(delivery))
                         for study, delivery in undelivered_flagged(session, POSITIVE_LABEL, self._pending_before()))

    def _shown(self, event: dict) -> dict[str, Any]:
        """An event's fields as a page may show them."""
        shown = {k: v for k, v in event.items() if k not in ("time", "event", "study_instance_uid")}
        if not self.config.log.include_patient_identifiers:
            for key in PATIENT_KEYS:
                shown.pop(key, None)
        return shown

    def _result_folder(self, study_instance_uid: str, result_series_uid: str | None) -> Path | None:
        if not result_series_uid:
            return None
        try:
            return self.store.absolute(self.store.result_folder(study_instance_uid, result_series_uid))
        except InvalidInstance:  # a UID that is not one names no folder
            return None

    def _images(self, study_instance_uid: str, result_series_uid: str | None) -> tuple[str, ...]:
        folder = self._result_folder(study_instance_uid, result_series_uid)
        if folder is None or not folder.is_dir():
            return ()
        return tuple(sorted(p.stem for p in folder.glob("sc-*.dcm") if _IMAGE_NAME.fullmatch(p.stem)))

    def image_png(self, study_instance_uid: str, name: str) -> bytes | None:
        """A Secondary Capture picture of the study's latest result as PNG, or None."""
        if not _IMAGE_NAME.fullmatch(name):
            return None
        with self.database.read() as session:
            study = study_by_uid(session, study_instance_uid)
            result_series = study.result_series_uid if study is not None else None
        folder = self._result_folder(study_instance_uid, result_series)
        if folder is None or not (folder / f"{name}.dcm").is_file():
            return None
        pixels = pydicom.dcmread(folder / f"{name}.dcm").pixel_array
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(pixels, dtype=np.uint8)).save(buffer, format="PNG")
        return buffer.getvalue()

    def failures(self, limit: int = 100) -> FailuresView:
        with self.database.read() as session:
            studies = failed_studies(session, limit)
            deliveries, notifications = failed_outgoing(session, limit)
            return FailuresView(
                tuple(StudyRow.of(s, None, [], []) for s in studies),
                tuple(FailureRow.of(d, s) for d, s in deliveries),
                tuple(FailureRow.of(n, s) for n, s in notifications),
            )

    def retry(self) -> tuple[int, int]:
        """What `ichnode retry` does: failed deliveries and notifications pending again."""
        with self.database.write() as session:
            return retry_failed(session, utcnow())

    def reanalyse(self, study_instance_uids: Sequence[str], by: str) -> list[ReanalyseOutcome]:
        """What `ichnode reanalyse` and the Re-analyse buttons do: each done or failed study
        back in the queue, logged with who asked (`by`: cli or web)."""
        with self.database.write() as session:
            outcomes = [reanalyse_study(session, uid, utcnow()) for uid in study_instance_uids]
        self._log_reanalyses(outcomes, by)
        return outcomes

    def reanalyse_failed(self, by: str) -> list[ReanalyseOutcome]:
        """Every failed study back in the queue (`ichnode reanalyse --failed`)."""
        with self.database.write() as session:
            outcomes = [reanalyse_study(session, uid, utcnow()) for uid in failed_study_uids(session)]
        self._log_reanalyses(outcomes, by)
        return outcomes

    def _log_reanalyses(self, outcomes: list[ReanalyseOutcome], by: str) -> None:
        for outcome in outcomes:
            if outcome.outcome != Reanalysis.QUEUED:
                continue
            uid, was = outcome.study_instance_uid, outcome.state.value
            log.info("study %s queued to be analysed again (it was %s), asked from the %s", uid, was, by)
            try:
                self.triage_log.write("reanalyse", uid, outcome.accession_number, by=by, previous_state=was)
            except OSError as exc:
                log.error("study %s queued to be analysed again, but its triage log event was not written: %s",
                          uid, exc)

    def model(self) -> ModelView:
        snapshot = self.history.refresh()
        count = self.config.web.history_days
        days = tuple(snapshot.days(utcnow().date(), count))
        # The scores of the days the table lists, so that the plot and the table count alike.
        scores = tuple(a.study_score for a in snapshot.recent
                       if a.study_score is not None and a.time.date() >= days[0].date)
        return ModelView(self.model_info, days, scores, count)


# What a re-analysis request did, in words: `ichnode reanalyse` and the pages say the same.
REANALYSIS_TEXTS = {
    Reanalysis.QUEUED: "queued to be analysed again; new result series follow the earlier ones",
    Reanalysis.BUSY: "left alone: it is in the queue and will be analysed anyway",
    Reanalysis.NOTHING_LEFT: "left alone: its received instances were deleted (storage.retention_days), so there "
                             "is nothing to analyse; send the study again to have it analysed",
}


def reanalysis_line(outcome: ReanalyseOutcome) -> str:
    """One study's outcome of a re-analysis request, for the CLI."""
    uid = outcome.study_instance_uid
    if outcome.state is None:
        return f"no study {uid} on this node: check the StudyInstanceUID (`ichnode status` lists the latest studies)"
    named = f"study {uid}" + (f" (accession {outcome.accession_number})" if outcome.accession_number else "")
    return f"{named}: {outcome.state.value}, {REANALYSIS_TEXTS[outcome.outcome]}"


def _redacted(event: dict) -> dict:
    """An event with its webhook URL as redact_url shows it, in the reason too: the
    triage log of a release that did not redact it holds it whole."""
    if "url" not in event:
        return event
    url = str(event["url"])
    shown = {**event, "url": redact_url(url)}
    if "reason" in event:
        shown["reason"] = str(event["reason"]).replace(url, shown["url"])
    return shown


def as_json(view: Any) -> Any:
    """A view as JSON-ready data: dataclasses as objects, times as ISO text (UTC, 'Z')."""
    if dataclasses.is_dataclass(view) and not isinstance(view, type):
        return {f.name: as_json(getattr(view, f.name)) for f in dataclasses.fields(view)}
    if isinstance(view, dt.datetime):
        return view.isoformat(timespec="seconds") + "Z"
    if isinstance(view, dt.date):
        return view.isoformat()
    if isinstance(view, enum.Enum):
        return view.value
    if isinstance(view, dict):
        return {str(k): as_json(v) for k, v in view.items()}
    if isinstance(view, (list, tuple)):
        return [as_json(v) for v in view]
    return view
