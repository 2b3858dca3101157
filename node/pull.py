"""Pull mode: the node asks a PACS for new head CT itself, for sites whose scanners
cannot forward to it.

Each [[sources]] PACS is polled every `interval_seconds` by QIDO-RS (DICOMweb) or C-FIND
(DIMSE): studies with CT in them (ModalitiesInStudy) since the last successful poll's
start less `overlap_seconds`, then their CT series (Modality), kept when they pass the
source's description and body-part filters. Each series not pulled before is retrieved
by WADO-RS, C-MOVE to node.ae_title or C-GET into the same durable ingest as a C-STORE
(`Ingest.receive`), so completion, analysis and delivery treat it as if it had been
sent. The `pulled_series` table makes each series pulled once, however many polls or
sources see it: a study is never analysed twice because it was seen twice.

A poll that fails (the PACS down, a refused query or retrieval) logs one WARNING naming
the source, leaves the window where it was, and is tried again at the next interval.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import io
import logging
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import requests
from dicomweb_client import DICOMwebClient
from pydicom.dataset import Dataset
from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.sop_class import (
    CTImageStorage,
    EnhancedCTImageStorage,
    LegacyConvertedEnhancedCTImageStorage,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.config import Config, Retrieve, Source, SourceKind
from node.dicomweb import open_client
from node.errors import ConfigError, PullError, StorageError
from node.ingest import Ingest, Status
from node.lease import KeepAlive, claimant_id
from storage.db import Database, utcnow
from storage.pull import ReportedSeries, claim_poll, finish_poll, record_pulled, renew_poll, series_due
from training.model import attributes as attr

__all__ = ["FoundSeries", "matches", "selected", "Puller"]

log = logging.getLogger(__name__)

# What a series of head CT may be stored as; a C-GET offers the node's SCP role for these.
_CT_STORAGE = (CTImageStorage, EnhancedCTImageStorage, LegacyConvertedEnhancedCTImageStorage)
_PENDING = (0xFF00, 0xFF01)
# WADO-RS: the instances as the PACS stores them (the node stores any transfer syntax).
_AS_STORED = (("application/dicom", "*"),)
_PAGE = 100  # QIDO-RS answers asked for at a time


@dataclass(frozen=True)
class FoundSeries:
    """A CT series in the window, as the PACS described it."""

    study_instance_uid: str
    series_instance_uid: str
    instances: int | None  # NumberOfSeriesRelatedInstances, when the PACS says
    study_description: str = ""
    series_description: str = ""
    body_part: str = ""

    @property
    def reported(self) -> ReportedSeries:
        return ReportedSeries(self.study_instance_uid, self.series_instance_uid, self.instances)


def matches(pattern: str, value: str) -> bool:
    """Case-insensitive: any of the `|`-separated alternatives is a substring of `value`, or,
    holding * or ?, matches it whole (fnmatch). An empty pattern matches anything."""
    if not pattern.strip():
        return True
    value = value.casefold()
    for alternative in (a.strip().casefold() for a in pattern.split("|")):
        if not alternative:
            continue
        if any(c in alternative for c in "*?"):
            if fnmatch.fnmatchcase(value, alternative):
                return True
        elif alternative in value:
            return True
    return False


def selected(source: Source, series: FoundSeries) -> bool:
    """Whether a CT series passes the source's filters: description on the study's or the
    series' description, body_part on BodyPartExamined."""
    described = matches(source.description, series.study_description) or \
        matches(source.description, series.series_description)
    return described and matches(source.body_part, series.body_part)


def _local(moment: dt.datetime) -> dt.datetime:
    """A naive UTC time as this host's local wall time: StudyDate and StudyTime are the
    scanner's local time, assumed to be this host's zone."""
    return moment.replace(tzinfo=dt.timezone.utc).astimezone().replace(tzinfo=None)


def _study_time(ds: Dataset) -> dt.datetime | None:
    """StudyDate + StudyTime (HH, HHMM, HHMMSS, fractions ignored); the date's end when it
    has no time, None without a date."""
    day = attr.date(ds, "StudyDate")
    if day is None:
        return None
    digits = attr.text(ds, "StudyTime").split(".")[0].replace(":", "")
    if not digits.isdigit() or len(digits) % 2 or len(digits) > 6:
        return dt.datetime.combine(day, dt.time.max)
    hour, minute, second = (int(digits[i:i + 2]) if len(digits) > i else 0 for i in (0, 2, 4))
    try:
        return dt.datetime.combine(day, dt.time(hour, minute, min(second, 59)))
    except ValueError:
        return dt.datetime.combine(day, dt.time.max)


def _in_window(study: Dataset, since_local: dt.datetime) -> bool:
    """The PACS matched the date range; this checks the time too. A study without a date
    is kept (the pulled_series table still pulls it once)."""
    when = _study_time(study)
    return when is None or when >= since_local


def _found(study: Dataset, series: Dataset) -> FoundSeries:
    return FoundSeries(
        study_instance_uid=attr.uid(study, "StudyInstanceUID"),
        series_instance_uid=attr.uid(series, "SeriesInstanceUID"),
        instances=attr.integer(series, "NumberOfSeriesRelatedInstances"),
        study_description=attr.text(study, "StudyDescription"),
        series_description=attr.text(series, "SeriesDescription"),
        body_part=attr.text(series, "BodyPartExamined"),
    )


def _study_query(since_local: dt.datetime) -> dict[str, str]:
    return {"ModalitiesInStudy": "CT", "StudyDate": f"{since_local:%Y%m%d}-"}


class _Dicomweb:
    """QIDO-RS to find, WADO-RS to retrieve; every call through node.dicomweb."""

    def __init__(self, source: Source, key: str) -> None:
        self.source, self.key = source, key

    def _client(self) -> DICOMwebClient:
        try:
            return open_client(self.source.peer, self.key)
        except ConfigError as exc:  # a credentials file gone or emptied since start-up
            raise PullError(str(exc)) from exc

    def find(self, since_local: dt.datetime) -> list[FoundSeries]:
        client = self._client()
        found = []
        try:
            studies = _paged(lambda offset: client.search_for_studies(
                search_filters=_study_query(since_local), fields=["StudyDate", "StudyTime", "StudyDescription"],
                limit=_PAGE, offset=offset), "StudyInstanceUID")
            for study in studies:
                if not _in_window(study, since_local):
                    continue
                study_uid = attr.uid(study, "StudyInstanceUID")
                series = _paged(lambda offset: client.search_for_series(
                    study_instance_uid=study_uid, search_filters={"Modality": "CT"},
                    fields=["SeriesDescription", "BodyPartExamined", "NumberOfSeriesRelatedInstances"],
                    limit=_PAGE, offset=offset), "SeriesInstanceUID")
                found += [_found(study, item) for item in series]
        except (requests.RequestException, ValueError) as exc:
            raise PullError(f"QIDO-RS query to {self.source.url} failed: {_said(exc)}") from exc
        return found

    def retrieve(self, series: FoundSeries, store: Callable[[Dataset, bytes, str], int]) -> int:
        client = self._client()
        count = 0
        try:
            for ds in client.iter_series(series.study_instance_uid, series.series_instance_uid,
                                         media_types=_AS_STORED):
                encoded = io.BytesIO()
                ds.save_as(encoded, enforce_file_format=True)
                _stored(store(ds, encoded.getvalue(), str(ds.file_meta.TransferSyntaxUID)), ds, series)
                count += 1
        except (requests.RequestException, ValueError) as exc:
            raise PullError(f"WADO-RS retrieval of series {series.series_instance_uid} from {self.source.url} "
                            f"failed after {count} instances: {_said(exc)}") from exc
        return count


def _paged(search: Callable[[int], list[dict]], key: str) -> list[Dataset]:
    """Every answer of a QIDO-RS search, page after page (a server may cut an answer at its
    own limit); ends at a short page, or at a page with nothing new, as a server that
    ignores `offset` answers (dicomweb-client's own get_remaining would loop forever)."""
    answers: dict[str, Dataset] = {}
    while True:
        page = [Dataset.from_json(item) for item in search(len(answers))]
        new = {attr.uid(ds, key): ds for ds in page if attr.uid(ds, key) not in answers}
        answers.update(new)
        if len(page) < _PAGE or not new:
            return list(answers.values())


def _said(exc: Exception) -> str:
    """An HTTP error with its status and reason; any other as it is."""
    response = getattr(exc, "response", None)
    if response is not None:
        return f"HTTP {response.status_code} {response.reason}"
    return f"{type(exc).__name__}: {exc}"


def _stored(status: int, ds: Dataset, series: FoundSeries) -> None:
    """PullError unless the ingest stored the instance: the series is then pulled again."""
    if status != Status.SUCCESS:
        raise PullError(f"instance {attr.uid(ds, 'SOPInstanceUID')} of series {series.series_instance_uid} was not "
                        f"stored (status 0x{status:04X}); the series is pulled again at the next poll")


class _Dimse:
    """C-FIND to find, C-MOVE to node.ae_title or C-GET to retrieve; one association each."""

    def __init__(self, source: Source, calling_ae_title: str, move_destination: str) -> None:
        self.source = source
        self.calling_ae_title = calling_ae_title
        self.move_destination = move_destination
        self.where = f"{source.ae_title}@{source.host}:{source.port}"

    def _associate(self, contexts: tuple[str, ...], *, roles: list | None = None,
                   handlers: list | None = None) -> Association:
        ae = AE(ae_title=self.calling_ae_title)
        ae.connection_timeout = ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.source.timeout_seconds
        for context in contexts:
            ae.add_requested_context(context)
        for storage in (_CT_STORAGE if roles else ()):
            ae.add_requested_context(storage, ALL_TRANSFER_SYNTAXES)
        assoc = ae.associate(self.source.host, self.source.port, ae_title=self.source.ae_title,
                             ext_neg=roles or [], evt_handlers=handlers or [])
        if not assoc.is_established:
            what = "rejected the association" if assoc.is_rejected else \
                f"could not be reached or did not accept an association within {self.source.timeout_seconds:g} s"
            raise PullError(f"{self.where} {what}")
        return assoc

    def _responses(self, responses: Iterator, what: str) -> Iterator[tuple[Dataset, Dataset | None]]:
        """Each (status, identifier) answer; PullError for no answer or a failure status."""
        for status, identifier in responses:
            code = getattr(status, "Status", None)
            if code is None:
                raise PullError(f"{self.where} did not answer the {what} within {self.source.timeout_seconds:g} s "
                                "(or ended the association)")
            if code not in (*_PENDING, 0x0000):
                raise PullError(f"{self.where} refused the {what}: status 0x{code:04X}")
            yield status, identifier

    def _find(self, assoc: Association, query: Dataset) -> list[Dataset]:
        responses = assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind)
        return [identifier for status, identifier in self._responses(responses, "C-FIND")
                if status.Status in _PENDING and identifier is not None]

    def find(self, since_local: dt.datetime) -> list[FoundSeries]:
        assoc = self._associate((StudyRootQueryRetrieveInformationModelFind,))
        found = []
        try:
            study_query = _query("STUDY", StudyInstanceUID="", StudyTime="", StudyDescription="",
                                 **_study_query(since_local))
            for study in self._find(assoc, study_query):
                if not _in_window(study, since_local):
                    continue
                series_query = _query("SERIES", StudyInstanceUID=attr.uid(study, "StudyInstanceUID"),
                                      SeriesInstanceUID="", Modality="CT", SeriesDescription="",
                                      BodyPartExamined="", NumberOfSeriesRelatedInstances="")
                found += [_found(study, series) for series in self._find(assoc, series_query)]
        except (OSError, RuntimeError, ValueError) as exc:  # connection lost, undecodable answer
            raise PullError(f"C-FIND to {self.where} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        return found

    def retrieve(self, series: FoundSeries, store: Callable[[Dataset, bytes, str], int]) -> int:
        query = _query("SERIES", StudyInstanceUID=series.study_instance_uid,
                       SeriesInstanceUID=series.series_instance_uid)
        refused: list[str] = []
        if self.source.retrieval == Retrieve.CMOVE:
            assoc = self._associate((StudyRootQueryRetrieveInformationModelMove,))
            responses = assoc.send_c_move(query, self.move_destination, StudyRootQueryRetrieveInformationModelMove)
            what = f"C-MOVE of series {series.series_instance_uid} to {self.move_destination}"
        else:
            def on_store(event: Event) -> int:
                status = store(event.dataset, event.encoded_dataset(), str(event.context.transfer_syntax))
                if status != Status.SUCCESS:
                    refused.append(f"0x{status:04X}")
                return status

            assoc = self._associate((StudyRootQueryRetrieveInformationModelGet,),
                                    roles=[build_role(c, scp_role=True) for c in _CT_STORAGE],
                                    handlers=[(evt.EVT_C_STORE, on_store)])
            responses = assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet)
            what = f"C-GET of series {series.series_instance_uid}"
        try:
            final = None
            for status, _ in self._responses(responses, what):
                final = status
        except (OSError, RuntimeError, ValueError) as exc:
            raise PullError(f"{what} from {self.where} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            if assoc.is_established:
                assoc.release()
        failed = attr.integer(final, "NumberOfFailedSuboperations") if final is not None else None
        if refused or failed:
            raise PullError(f"{what} from {self.where}: {failed or len(refused)} instances not stored"
                            f"{' (the node answered ' + ', '.join(sorted(set(refused))) + ')' if refused else ''}")
        return (attr.integer(final, "NumberOfCompletedSuboperations") or 0) if final is not None else 0


def _query(level: str, **keys: str) -> Dataset:
    query = Dataset()
    query.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(query, keyword, value)
    return query


class Puller:
    """Polls one source and pulls what is new into the ingest (one per [[sources]] table;
    `poll` is the scheduled job). Processes sharing the database take turns: a poll is
    claimed in `source_polls`, kept alive while it runs, and skipped while another holds it."""

    def __init__(self, config: Config, source: Source, database: Database, ingest: Ingest,
                 owner: str | None = None) -> None:
        index = config.sources.index(source)
        self.source = source
        self.database = database
        self.ingest = ingest
        self.owner = owner or claimant_id()
        self.heartbeat_seconds = config.worker.heartbeat_seconds
        self.stale_after = dt.timedelta(seconds=config.worker.stale_after_seconds)
        self.client = _Dicomweb(source, f"sources[{index}]") if source.kind == SourceKind.QIDO else \
            _Dimse(source, config.calling_ae_title, config.node.ae_title)

    def poll(self) -> int:
        """One poll; returns how many series it pulled. A failure is logged once, here."""
        started = utcnow()
        with self.database.write() as session:
            claimed, last = claim_poll(session, self.source.name, self.owner, started, started + self.stale_after)
        if not claimed:
            return 0
        since = started - dt.timedelta(hours=self.source.lookback_hours) if last is None else \
            last - dt.timedelta(seconds=self.source.overlap_seconds)
        error, pulled = None, 0
        try:
            with KeepAlive(self._renew, self.heartbeat_seconds, f"source {self.source.name} poll"):
                pulled = self._pull(since)
        except PullError as exc:
            error = str(exc)
        except StorageError:
            raise  # the database is away: the job skips its turn (service._through_outages)
        except Exception as exc:  # an answer the DICOM or HTTP libraries could not take apart
            error = f"{type(exc).__name__}: {exc}"
        with self.database.write() as session:
            finish_poll(session, self.source.name, self.owner, started, utcnow(), error)
        if error is not None:
            log.warning("source %s: poll failed, tried again in %g s with the same window (studies since %s UTC): %s",
                        self.source.name, self.source.interval_seconds, f"{since:%Y-%m-%d %H:%M:%S}", error)
        return pulled

    def _renew(self) -> bool:
        with self.database.write() as session:
            return renew_poll(session, self.source.name, self.owner, utcnow() + self.stale_after)

    def _pull(self, since: dt.datetime) -> int:
        # An answer without its UIDs names nothing that could be retrieved.
        found = [s for s in self.client.find(_local(since))
                 if s.study_instance_uid and s.series_instance_uid and selected(self.source, s)]
        with self.database.write() as session:
            due = series_due(session, self.source.name, [s.reported for s in found], utcnow(),
                             self.source.settle_seconds)
        failures = []
        for series in due:
            try:
                instances = self._retrieve(series)
            except PullError as exc:
                failures.append(str(exc))
                continue
            with self.database.write() as session:
                record_pulled(session, series.series_instance_uid, max(instances, series.instances or 0), utcnow())
            log.info("source %s: pulled series %s of study %s (%d instances)", self.source.name,
                     series.series_instance_uid, series.study_instance_uid, instances)
        if failures:
            raise PullError(f"{len(failures)} of {len(due)} series not pulled; first: {failures[0]}")
        return len(due)

    def _retrieve(self, series: FoundSeries) -> int:
        """Retrieve one series; its study is held while it arrives, as an open association
        holds what it sends. C-MOVE's instances arrive through the SCP, which holds them."""
        token: Hashable = object()

        def store(ds: Dataset, encoded: bytes, transfer_syntax_uid: str) -> int:
            return self.ingest.receive(ds, encoded, calling_aet=self.source.name,
                                       transfer_syntax_uid=transfer_syntax_uid, association=token)

        try:
            return self.client.retrieve(series, store)
        finally:
            self.ingest.association_ended(token)
