"""The node's configuration: one TOML file → frozen dataclasses, validated at start-up.

Unknown keys and bad values are errors naming the key (`node.port`, `destinations[1].host`).
Every relative path (model.checkpoint, storage.root, an SQLite storage.database_url,
log.path, the node.tls_* files) is taken relative to the folder of the config file, so
the node behaves the same whatever directory it is started from. `check_paths` then
checks, before `serve` or `worker` creates anything, that what must exist does and that
what they create can be made. The documented keys are a contract that scripts and docs
rely on: add keys freely, rename none.
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import os
import re
import urllib.parse
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.errors import ConfigError
from storage.db import DESTINATION_NAME_LENGTH, anchor_sqlite_url, sqlite_file
from training.configfile import anchor_paths, read_toml, section_from_table
from training.inference.settings import Backend, Device
from training.model.layers import GradcamLayer
from training.model.rule import TriageRule

__all__ = [
    "ENV_VAR",
    "NodeSection",
    "StorageSection",
    "CompletionSection",
    "WorkerSection",
    "ModelSection",
    "RuleSource",
    "TriageSection",
    "ExplainSection",
    "KosFor",
    "ResultKind",
    "OutputSection",
    "DeliveryMode",
    "DeliverySection",
    "LogSection",
    "WebSection",
    "DicomwebSection",
    "AlertsSection",
    "HttpAuth",
    "DicomwebPeer",
    "DestinationKind",
    "Destination",
    "SourceKind",
    "Retrieve",
    "Source",
    "NotifyOn",
    "ChatFormat",
    "NotifyTarget",
    "redact_url",
    "Config",
    "load_config",
    "parse_config",
    "check_paths",
    "config_path",
]

ENV_VAR = "ICHNODE_CONFIG"
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
DEFAULT_PATH = Path("config.toml")


def _ae_title(key: str, value: str) -> None:
    if not 1 <= len(value.strip()) <= 16 or "\\" in value or not value.isascii():
        raise ConfigError(f"{key} must be 1-16 ASCII characters without '\\', got {value!r}")


def _port(key: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise ConfigError(f"{key} must be a port number 1-65535, got {value}")


def _positive(key: str, value: float) -> None:
    if not value > 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


@dataclass(frozen=True)
class NodeSection:
    """The DICOM service: who the node is and who may talk to it."""

    ae_title: str = "ICHNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    allowed_calling_aets: tuple[str, ...] = ()
    max_associations: int = 10
    # 0 = no limit; large PDUs move CT faster (71 → 86 images/s on loopback, docs/performance.md).
    maximum_pdu_size: int = 0
    # ARTIM: from TCP connect (and TLS handshake) to a complete A-ASSOCIATE-RQ; slower peers are dropped.
    acse_timeout_seconds: float = 10.0
    # An established association that sends nothing for this long (mid-PDU included) is aborted.
    network_timeout_seconds: float = 60.0
    # Connections still negotiating do not count in max_associations; they have their own
    # budget, in all and per remote IP address, and are closed at once beyond it.
    max_pending_associations: int = 64
    max_pending_per_address: int = 10
    # DICOM TLS: certificate and key (PEM) turn it on; CA certificates make client
    # certificates required and checked against them.
    tls_certificate: Path | None = None
    tls_private_key: Path | None = None
    tls_ca_certificates: Path | None = None

    def validate(self) -> None:
        _ae_title("node.ae_title", self.ae_title)
        if (self.tls_certificate is None) != (self.tls_private_key is None):
            raise ConfigError("node.tls_certificate and node.tls_private_key must be set together")
        if self.tls_ca_certificates is not None and self.tls_certificate is None:
            raise ConfigError("node.tls_ca_certificates needs node.tls_certificate and node.tls_private_key")
        for key in ("tls_certificate", "tls_private_key", "tls_ca_certificates"):
            path = getattr(self, key)
            if path is not None and not path.is_file():
                raise ConfigError(f"node.{key}: {path} is not a file")
        _port("node.port", self.port)
        if not self.host.strip():
            raise ConfigError("node.host must not be empty (0.0.0.0 listens on every interface)")
        for i, aet in enumerate(self.allowed_calling_aets):
            _ae_title(f"node.allowed_calling_aets[{i}]", aet)
        _positive("node.max_associations", self.max_associations)
        _positive("node.acse_timeout_seconds", self.acse_timeout_seconds)
        _positive("node.network_timeout_seconds", self.network_timeout_seconds)
        _positive("node.max_pending_associations", self.max_pending_associations)
        _positive("node.max_pending_per_address", self.max_pending_per_address)
        if self.maximum_pdu_size < 0:
            raise ConfigError(f"node.maximum_pdu_size must be ≥ 0, got {self.maximum_pdu_size}")


@dataclass(frozen=True)
class StorageSection:
    root: Path = Path("var/store")
    database_url: str = "sqlite:///var/node.db"
    # Below this much free space on the disk of `root`, stores are refused with 0xA700.
    min_free_mb: int = 1024
    # Delete the received instances of studies delivered this many days ago; 0 keeps them.
    retention_days: float = 0.0
    # serve and worker upgrade an older schema at start-up; false: they refuse to start
    # until `ichnode db upgrade` has run (sites with several hosts upgrade once, all stopped).
    auto_upgrade: bool = True

    def validate(self) -> None:
        if self.min_free_mb < 0:
            raise ConfigError(f"storage.min_free_mb must be ≥ 0, got {self.min_free_mb}")
        if self.retention_days < 0:
            raise ConfigError(f"storage.retention_days must be ≥ 0, got {self.retention_days}")
        if "://" not in self.database_url:
            raise ConfigError(
                f"storage.database_url must be an SQLAlchemy URL such as "
                f"sqlite:///var/node.db, got {self.database_url!r}"
            )


@dataclass(frozen=True)
class CompletionSection:
    stable_seconds: float = 30.0
    check_interval_seconds: float = 1.0
    # Any instance received for a failed study, even one already stored (a re-send),
    # re-opens it; false: only a CT image not seen before does (as for a done study).
    reopen_failed: bool = False
    # A study whose association was still open when its serve process died waits this
    # long for the sender to send it again before it may be ready.
    resend_wait_seconds: float = 300.0

    def validate(self) -> None:
        _positive("completion.stable_seconds", self.stable_seconds)
        _positive("completion.check_interval_seconds", self.check_interval_seconds)
        _positive("completion.resend_wait_seconds", self.resend_wait_seconds)


@dataclass(frozen=True)
class WorkerSection:
    """Analysis workers, inside `serve` and as `ichnode worker`."""

    enabled_in_serve: bool = True
    poll_seconds: float = 1.0
    heartbeat_seconds: float = 10.0
    # A processing study whose heartbeat is older than this is re-queued.
    stale_after_seconds: float = 120.0
    min_slices: int = 10
    # More unreadable slices than this share of the series fail the study: a verdict that
    # did not see them could miss a bleed.
    max_unusable_fraction: float = 0.1
    # Claims of a study whose worker died before it is failed; an analysis that raises
    # fails at once (unless the disk or database failed), so this counts only deaths.
    max_attempts: int = 3
    # A study whose analysis failed for a reason that may pass (disk full, database busy)
    # waits this long before it is tried again, doubling up to retry_max_seconds.
    retry_initial_seconds: float = 10.0
    retry_max_seconds: float = 300.0

    def validate(self) -> None:
        _positive("worker.poll_seconds", self.poll_seconds)
        _positive("worker.heartbeat_seconds", self.heartbeat_seconds)
        if self.stale_after_seconds <= 2 * self.heartbeat_seconds:
            raise ConfigError(
                "worker.stale_after_seconds must exceed twice worker.heartbeat_seconds, "
                f"got {self.stale_after_seconds} and {self.heartbeat_seconds}"
            )
        _positive("worker.min_slices", self.min_slices)
        if not 0 <= self.max_unusable_fraction < 1:
            raise ConfigError(f"worker.max_unusable_fraction must be in [0, 1), got {self.max_unusable_fraction}")
        _positive("worker.max_attempts", self.max_attempts)
        _positive("worker.retry_initial_seconds", self.retry_initial_seconds)
        if self.retry_max_seconds < self.retry_initial_seconds:
            raise ConfigError("worker.retry_max_seconds must be ≥ worker.retry_initial_seconds")


@dataclass(frozen=True)
class ModelSection:
    """The checkpoint and how it runs; device and backend check themselves when parsed."""

    checkpoint: Path | None = None  # None: receive and store, analyse nothing
    device: Device = Device("auto")
    batch_size: int = 8
    backend: Backend = Backend.AUTO
    mixed_precision: bool = True  # fp16 autocast on CUDA

    def validate(self) -> None:
        _positive("model.batch_size", self.batch_size)


class RuleSource(enum.StrEnum):
    """Where the patient rule in force comes from."""

    CHECKPOINT = "checkpoint"  # the operating point the checkpoint recommends
    CONFIG = "config"  # the [triage] keys


@dataclass(frozen=True)
class TriageSection:
    """The patient rule: the checkpoint's recommended operating point, or these keys."""

    source: RuleSource = RuleSource.CHECKPOINT
    # Used when source = "config"; the paper's rule by default.
    slice_threshold: float = 0.8
    positive_fraction: float = 0.05
    min_positive_slices: int = 1
    # A study outside the checkpoint's scope or training inputs gets NOT TRIAGED, never a
    # verdict; false (a silent trial only) gives the raw verdict and logs what was found.
    abstain: bool = True

    def __post_init__(self) -> None:
        self.configured_rule  # a bad value raises ValueError naming its key

    @property
    def configured_rule(self) -> TriageRule:
        return TriageRule(self.slice_threshold, self.positive_fraction, self.min_positive_slices)

    def validate(self) -> None:
        if self.source == RuleSource.CHECKPOINT and self.configured_rule != TriageRule():
            raise ConfigError("the [triage] rule keys are set but triage.source is \"checkpoint\", which would "
                              "ignore them: set source = \"config\" to use them, or remove them")

    def rule_for(self, checkpoint_rule: TriageRule) -> TriageRule:
        """The rule in force with a checkpoint that recommends `checkpoint_rule`."""
        return checkpoint_rule if self.source == RuleSource.CHECKPOINT else self.configured_rule

    def describe(self, checkpoint_rule: TriageRule | None) -> str:
        """The rule in force in words, and where it comes from."""
        if self.source == RuleSource.CHECKPOINT and checkpoint_rule is None:
            return "the checkpoint's recommended rule (no checkpoint loaded)"
        rule = self.rule_for(checkpoint_rule) if checkpoint_rule is not None else self.configured_rule
        where = "the checkpoint's recommended operating point" if self.source == RuleSource.CHECKPOINT \
            else "the [triage] keys of the node's config"
        return (f"slice P(ICH) > {rule.slice_threshold:g}; study positive when at least max("
                f"{rule.min_positive_slices}, ceil({rule.positive_fraction:g} × slices)) slices are (from {where})")


@dataclass(frozen=True)
class ExplainSection:
    key_slices: int = 3
    aug_smooth: bool = False
    gradcam_layer: GradcamLayer = GradcamLayer.AUTO  # whether the checkpoint's model has it: at start-up

    def validate(self) -> None:
        if not 1 <= self.key_slices <= 20:
            raise ConfigError(f"explain.key_slices must be 1-20, got {self.key_slices}")


class ResultKind(enum.StrEnum):
    """The object sets a result can send (output.objects); here, not beside the builders in
    node.output, so that reading the config loads no imaging library."""

    SC = "sc"  # Secondary Capture: key-slice pictures with Grad-CAM, and the summary
    SR = "sr"  # Comprehensive 3D SR, TID 1500 (IHE AI Results)
    KOS = "kos"  # Key Object Selection of the key slices


class KosFor(enum.StrEnum):
    """Which studies get a Key Object Selection (output.kos_for)."""

    FLAGGED = "flagged"  # only flagged studies: a KOS marks slices worth a look, so a cleared study has none
    ALL = "all"  # every triaged study, its most suspicious slices whatever the verdict


@dataclass(frozen=True)
class OutputSection:
    """What goes back into the study: which object sets, numbered and signed how."""

    objects: tuple[ResultKind, ...] = (ResultKind.SC, ResultKind.SR, ResultKind.KOS)
    kos_for: KosFor = KosFor.FLAGGED  # which triaged studies get the KOS: flagged ones, or all
    # The first analysis's series are numbered from here (SC, SR, KOS), later ones count up.
    series_number: int = 9900
    manufacturer: str = "ichnode"
    institution_name: str = ""
    # The node as the SR's device observer; empty: a UID derived from node.ae_title and the host.
    device_uid: str = ""

    def validate(self) -> None:
        if not self.objects:
            raise ConfigError("output.objects must name at least one of sc, sr, kos")
        if len(set(self.objects)) != len(self.objects):
            raise ConfigError(f"output.objects names an object set twice: {[str(o) for o in self.objects]}")
        if not 1 <= self.series_number <= 99000:
            raise ConfigError(f"output.series_number must be 1-99000, got {self.series_number}")
        if self.device_uid and not (_UID.fullmatch(self.device_uid) and len(self.device_uid) <= 64):
            raise ConfigError(f"output.device_uid must be a DICOM UID (digits and dots, at most 64), "
                              f"got {self.device_uid!r}")


class DeliveryMode(enum.StrEnum):
    """Whether results leave the node."""

    SEND = "send"  # to every [[destinations]] PACS and [[notify]] webhook
    # A silent trial: every study is analysed, its result series written and every event
    # logged, but nothing is sent to a PACS or a webhook, so that a site can compare the
    # node with its radiologists for weeks before anyone sees a flag.
    SILENT = "silent"


@dataclass(frozen=True)
class DeliverySection:
    mode: DeliveryMode = DeliveryMode.SEND
    max_attempts: int = 8
    initial_backoff_seconds: float = 10.0
    max_backoff_seconds: float = 900.0
    timeout_seconds: float = 30.0
    calling_ae_title: str = ""  # empty: node.ae_title
    # A destination with commitment = true that has not reported within this long after the
    # C-STOREs: a failed attempt, sent again after the back-off.
    commitment_timeout_seconds: float = 600.0

    def validate(self) -> None:
        _positive("delivery.max_attempts", self.max_attempts)
        _positive("delivery.initial_backoff_seconds", self.initial_backoff_seconds)
        if self.max_backoff_seconds < self.initial_backoff_seconds:
            raise ConfigError("delivery.max_backoff_seconds must be ≥ initial_backoff_seconds")
        _positive("delivery.timeout_seconds", self.timeout_seconds)
        _positive("delivery.commitment_timeout_seconds", self.commitment_timeout_seconds)
        if self.calling_ae_title:
            _ae_title("delivery.calling_ae_title", self.calling_ae_title)


@dataclass(frozen=True)
class LogSection:
    path: Path = Path("var/triage.log")
    # Off by default: the triage log carries no patient name, ID or birth date.
    include_patient_identifiers: bool = False

    def validate(self) -> None:
        pass


@dataclass(frozen=True)
class WebSection:
    """The admin pages, /metrics, /healthz and /readyz that `ichnode serve` serves over HTTP."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 8080
    # Needed for every state-changing request (retry) and, when host is not a loopback
    # address, for every page and /metrics too (bearer token or the login form).
    token: str = ""
    # HTTPS with node.tls_certificate and node.tls_private_key (or put a TLS proxy in front).
    tls: bool = False
    refresh_seconds: int = 15  # pages reload themselves this often; 0: never
    history_days: int = 30  # the model page's window (studies per day, positive rate, scores)
    # A sign-in lasts this long at most, and ends sooner after this long without a request.
    session_hours: float = 12.0
    session_idle_minutes: float = 60.0
    # Open HTTP connections; more are answered 503 and closed at once, so that the pages
    # never hold more than this many descriptors (docs/monitoring.md, the descriptor budget).
    max_connections: int = 64
    # A connection must complete each request (head and body) this long after it opened or
    # after its previous answer; one that is slower, or idle, is closed.
    request_timeout_seconds: float = 10.0

    @property
    def loopback(self) -> bool:
        """Whether only this machine can reach the pages."""
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}/"

    def validate(self) -> None:
        _port("web.port", self.port)
        if not self.host.strip():
            raise ConfigError("web.host must not be empty (127.0.0.1 keeps the pages on this machine)")
        if self.token and (len(self.token) < 16 or not self.token.isascii() or not self.token.isprintable()):
            raise ConfigError("web.token must be at least 16 printable ASCII characters "
                              "(for example from `openssl rand -hex 24`)")
        if self.enabled and not self.loopback and not self.token:
            raise ConfigError(f"web.host {self.host} lets other machines reach the node's pages: set web.token "
                              "(at least 16 characters), or bind web.host to 127.0.0.1")
        if self.refresh_seconds < 0:
            raise ConfigError(f"web.refresh_seconds must be ≥ 0, got {self.refresh_seconds}")
        if not 1 <= self.history_days <= 366:
            raise ConfigError(f"web.history_days must be 1-366, got {self.history_days}")
        _positive("web.session_hours", self.session_hours)
        _positive("web.session_idle_minutes", self.session_idle_minutes)
        _positive("web.max_connections", self.max_connections)
        _positive("web.request_timeout_seconds", self.request_timeout_seconds)


@dataclass(frozen=True)
class DicomwebSection:
    """STOW-RS receive: studies POSTed to /dicomweb/studies on the web server."""

    enabled: bool = False
    # The bearer token STOW-RS clients send; when empty, web.token protects it instead.
    token: str = ""
    # A request body larger than this is refused (413) before or while it arrives.
    max_request_mb: int = 2048
    # One instance (one part of the body) larger than this is refused as a failed part.
    max_instance_mb: int = 256
    # A STOW-RS request has this long to arrive whole, instead of web.request_timeout_seconds.
    request_timeout_seconds: float = 600.0

    def validate(self) -> None:
        if self.token and (len(self.token) < 16 or not self.token.isascii() or not self.token.isprintable()):
            raise ConfigError("dicomweb.token must be at least 16 printable ASCII characters "
                              "(for example from `openssl rand -hex 24`)")
        _positive("dicomweb.max_request_mb", self.max_request_mb)
        _positive("dicomweb.max_instance_mb", self.max_instance_mb)
        if self.max_instance_mb > self.max_request_mb:
            raise ConfigError(f"dicomweb.max_instance_mb ({self.max_instance_mb}) must not exceed "
                              f"dicomweb.max_request_mb ({self.max_request_mb})")
        _positive("dicomweb.request_timeout_seconds", self.request_timeout_seconds)


@dataclass(frozen=True)
class AlertsSection:
    """When a flagged study's results not reaching the PACS makes the node degraded."""

    # A flagged (SUSPECTED) study is undelivered when a delivery of it failed, or has been
    # pending this long: a red banner on every page, and /readyz says "degraded".
    undelivered_after_seconds: float = 600.0
    # The HTTP status /readyz answers while degraded: 200 keeps a load balancer sending
    # studies here (the node still takes them in); 503 makes the probe fail.
    undelivered_http_status: int = 200

    def validate(self) -> None:
        _positive("alerts.undelivered_after_seconds", self.undelivered_after_seconds)
        if self.undelivered_http_status not in (200, 503):
            raise ConfigError(f"alerts.undelivered_http_status must be 200 or 503, got {self.undelivered_http_status}")


class HttpAuth(enum.StrEnum):
    """How the node proves itself to a DICOMweb peer; the secret lives in a credentials file."""

    NONE = "none"
    BASIC = "basic"  # credentials file: one line, user:password
    BEARER = "bearer"  # credentials file: one line, the token


@dataclass(frozen=True)
class DicomwebPeer:
    """Where a DICOMweb peer is and how to sign in to it: the part of a DICOMweb
    destination or source that `node.dicomweb` needs to open a client."""

    url: str  # the service root, e.g. https://pacs.example.org/dicom-web
    auth: HttpAuth = HttpAuth.NONE
    credentials_file: Path | None = None  # read at each connection: rotate it without a restart
    timeout_seconds: float = 30.0  # connect, and each read of an answer

    def validate(self, key: str) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{key}.url must be an http:// or https:// URL with a host, got {self.url!r}")
        if parts.username or parts.password:
            raise ConfigError(f"{key}.url must not hold a user or password: set {key}.auth and put them in "
                              f"{key}.credentials_file")
        try:
            parts.port  # reading it checks it
        except ValueError:
            raise ConfigError(f"{key}.url has a port that is not a number 1-65535") from None
        if self.auth != HttpAuth.NONE and self.credentials_file is None:
            raise ConfigError(f"{key}.auth = \"{self.auth}\" needs {key}.credentials_file (a file holding "
                              f"{'user:password' if self.auth == HttpAuth.BASIC else 'the token'} on one line)")
        if self.auth == HttpAuth.NONE and self.credentials_file is not None:
            raise ConfigError(f"{key}.credentials_file is set but {key}.auth is \"none\": set auth to "
                              "\"basic\" or \"bearer\", or remove the file")
        _positive(f"{key}.timeout_seconds", self.timeout_seconds)


class DestinationKind(enum.StrEnum):
    """How results reach a destination."""

    DIMSE = "dimse"  # C-STORE to ae_title@host:port
    DICOMWEB = "dicomweb"  # STOW-RS to url


# Keys only one kind uses: set on a destination of the other kind, they are an error.
_DIMSE_ONLY = ("ae_title", "host", "port", "commitment")
_DICOMWEB_ONLY = ("url", "auth", "credentials_file", "timeout_seconds")


@dataclass(frozen=True)
class Destination:
    """A PACS (or archive) results are sent to: by C-STORE (kind "dimse": ae_title, host,
    port) or by STOW-RS (kind "dicomweb": url, auth, credentials_file, timeout_seconds)."""

    name: str
    # kind = "dimse" (first, so that Destination(name, ae_title, host, port) reads as before)
    ae_title: str = ""
    host: str = ""
    port: int = 0
    kind: DestinationKind = DestinationKind.DIMSE
    # kind = "dicomweb" (see DicomwebPeer)
    url: str = ""
    auth: HttpAuth = HttpAuth.NONE
    credentials_file: Path | None = None
    timeout_seconds: float | None = None  # None: delivery.timeout_seconds
    # kind = "dimse" only. Storage Commitment: after the C-STOREs the node asks the destination
    # to commit them (N-ACTION) and counts the result delivered only when its N-EVENT-REPORT says so.
    commitment: bool = False

    def validate(self, key: str) -> None:
        if not self.name.strip():
            raise ConfigError(f"{key}.name must not be empty")
        if len(self.name) > DESTINATION_NAME_LENGTH:
            raise ConfigError(f"{key}.name must be at most {DESTINATION_NAME_LENGTH} characters, got {self.name!r}")
        if self.kind == DestinationKind.DIMSE:
            self._refuse_keys(key, _DICOMWEB_ONLY)
            self._validate_dimse(key)
        else:
            self._refuse_keys(key, _DIMSE_ONLY)
            self._validate_dicomweb(key)

    def _refuse_keys(self, key: str, names: tuple[str, ...]) -> None:
        """ConfigError naming the first of `names` set although this kind does not use it."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        for name in names:
            if getattr(self, name) != defaults[name]:
                wanted = "dicomweb" if name in _DICOMWEB_ONLY else "dimse"
                raise ConfigError(f"{key}.{name} is for kind = \"{wanted}\" destinations, but {key}.kind is "
                                  f"\"{self.kind}\": remove it, or set kind = \"{wanted}\"")

    def _validate_dimse(self, key: str) -> None:
        missing = [name for name in ("ae_title", "host", "port") if not getattr(self, name)]
        if missing:
            raise ConfigError(f"{key}.{missing[0]} is missing or empty: a kind = \"dimse\" destination needs "
                              "ae_title, host and port (1-65535)")
        _ae_title(f"{key}.ae_title", self.ae_title)
        _port(f"{key}.port", self.port)
        if not self.host.strip():
            raise ConfigError(f"{key}.host must not be empty")

    def _validate_dicomweb(self, key: str) -> None:
        if not self.url:
            raise ConfigError(f"{key}.url is missing: a kind = \"dicomweb\" destination needs the DICOMweb "
                              "service root, e.g. https://pacs.example.org/dicom-web")
        self.peer.validate(key)

    @property
    def peer(self) -> DicomwebPeer:
        """The DICOMweb peer a kind = "dicomweb" destination names."""
        timeout = {} if self.timeout_seconds is None else {"timeout_seconds": self.timeout_seconds}
        return DicomwebPeer(url=self.url, auth=self.auth, credentials_file=self.credentials_file, **timeout)

    @property
    def described(self) -> str:
        """Where results go, for logs, pages and `ichnode status`: AET@host:port, or the
        URL without user, query or fragment (never a secret)."""
        if self.kind == DestinationKind.DIMSE:
            return f"{self.ae_title}@{self.host}:{self.port}"
        return _without_secrets(self.url)


class SourceKind(enum.StrEnum):
    """How a [[sources]] PACS is asked for new head CT."""

    QIDO = "qido"  # QIDO-RS queries, WADO-RS retrieval (DICOMweb)
    CFIND = "cfind"  # C-FIND queries, C-MOVE or C-GET retrieval (DIMSE)


class Retrieve(enum.StrEnum):
    """How a C-FIND source hands over what matched."""

    CMOVE = "cmove"  # the PACS sends it to node.ae_title, which it must know (host and port)
    CGET = "cget"  # the node fetches it on its own association: the PACS needs to know nothing


# A source's name is recorded as the calling AE title of what it pulls (16 characters).
SOURCE_NAME_LENGTH = 16


@dataclass(frozen=True)
class Source:
    """A PACS the node polls for new head CT (pull mode, node.pull), for sites whose
    scanners cannot forward to it."""

    name: str
    kind: SourceKind
    interval_seconds: float = 60.0
    # Each poll looks back to the start of the last successful one less this much: a study
    # that reaches the PACS later than its StudyDate/StudyTime by more is not seen.
    overlap_seconds: float = 3600.0
    lookback_hours: float = 24.0  # how far back the first poll looks
    # Case-insensitive: a substring of StudyDescription or SeriesDescription, or a pattern
    # with * and ?; alternatives separated by |. Empty: any.
    description: str = ""
    body_part: str = ""  # BodyPartExamined, matched as description is; empty: any (a series without one too)
    # A series is pulled once the PACS has reported the same number of instances in it for
    # this long (0: at once), so a series still arriving is not analysed half there.
    settle_seconds: float = 30.0
    timeout_seconds: float = 30.0
    # kind = "qido"
    url: str = ""
    auth: HttpAuth = HttpAuth.NONE
    credentials_file: Path | None = None
    # kind = "cfind"
    ae_title: str = ""
    host: str = ""
    port: int = 0
    retrieve: Retrieve | None = None  # cfind only; default cmove

    @property
    def peer(self) -> DicomwebPeer:
        return DicomwebPeer(self.url, self.auth, self.credentials_file, self.timeout_seconds)

    @property
    def retrieval(self) -> Retrieve:
        return self.retrieve or Retrieve.CMOVE

    def validate(self, key: str) -> None:
        if not self.name.strip():
            raise ConfigError(f"{key}.name must not be empty")
        if len(self.name) > SOURCE_NAME_LENGTH or not self.name.isascii() or "\\" in self.name:
            raise ConfigError(f"{key}.name must be at most {SOURCE_NAME_LENGTH} ASCII characters (it is recorded as "
                              f"the calling AE title of what the node pulls), got {self.name!r}")
        for name in ("interval_seconds", "lookback_hours", "timeout_seconds"):
            _positive(f"{key}.{name}", getattr(self, name))
        for name in ("overlap_seconds", "settle_seconds"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{key}.{name} must be ≥ 0, got {getattr(self, name)}")
        dicomweb = {"url": self.url != "", "auth": self.auth != HttpAuth.NONE,
                    "credentials_file": self.credentials_file is not None}
        dimse = {"ae_title": self.ae_title != "", "host": self.host != "", "port": self.port != 0,
                 "retrieve": self.retrieve is not None}
        forbidden = dimse if self.kind == SourceKind.QIDO else dicomweb
        for name, given in forbidden.items():
            if given:
                raise ConfigError(f"{key}.{name} is not a key of a kind = \"{self.kind}\" source")
        if self.kind == SourceKind.QIDO:
            if not self.url:
                raise ConfigError(f"{key}.url is required for kind = \"qido\" (the DICOMweb root, "
                                  "e.g. https://pacs.example.org/dicom-web)")
            self.peer.validate(key)
            return
        for name in ("ae_title", "host", "port"):
            if not dimse[name]:
                raise ConfigError(f"{key}.{name} is required for kind = \"cfind\"")
        _ae_title(f"{key}.ae_title", self.ae_title)
        if not self.host.strip():
            raise ConfigError(f"{key}.host must not be empty")
        _port(f"{key}.port", self.port)


class NotifyOn(enum.StrEnum):
    """Which outcomes a [[notify]] webhook hears about."""

    POSITIVE = "positive"  # studies flagged SUSPECTED - PRIORITY
    ALL = "all"  # every outcome: each analysed study (NOT TRIAGED included) and each failure
    FAILED = "failed"  # studies that could not be analysed


class ChatFormat(enum.StrEnum):
    """How a webhook's `text` line is escaped, so that text from DICOM headers shows as
    text and formats, links or mentions nothing."""

    AUTO = "auto"  # slack for hooks.slack.com, markdown for any other host
    SLACK = "slack"  # &, < and > as &amp; &lt; &gt; (Slack's own rule; <!channel> is then text)
    TEAMS = "teams"  # as markdown
    MARKDOWN = "markdown"  # Markdown's control characters escaped, @mentions broken (Mattermost, Teams, …)
    PLAIN = "plain"  # as it is: for a receiver that reads the JSON and renders nothing


@dataclass(frozen=True)
class NotifyTarget:
    """A webhook that gets a JSON message (with a `text` line chat tools display)."""

    url: str
    on: NotifyOn = NotifyOn.POSITIVE
    format: ChatFormat = ChatFormat.AUTO
    # The whole POST, connect to answer: a receiver that trickles its answer is cut off.
    timeout_seconds: float = 10.0

    def validate(self, key: str) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"{key}.url must be an http:// or https:// URL with a host (the value is not shown: "
                              "a webhook URL holds its secret)")
        try:
            parts.port  # reading it checks it
        except ValueError:
            raise ConfigError(f"{key}.url has a port that is not a number 1-65535") from None
        _positive(f"{key}.timeout_seconds", self.timeout_seconds)


def redact_url(url: str) -> str:
    """scheme://host[:port]/… — how a webhook URL is shown anywhere (log, pages, API,
    `ichnode status`, errors): Slack, Teams and Mattermost carry the secret in the path
    or the query."""
    return f"{_origin(urllib.parse.urlsplit(url))}/…"


def _without_secrets(url: str) -> str:
    """scheme://host[:port]/path — a DICOMweb service root as shown anywhere: a user,
    password, query or fragment is left out (a query can carry an access key)."""
    parts = urllib.parse.urlsplit(url)
    return f"{_origin(parts)}{parts.path}"


def _origin(parts: urllib.parse.SplitResult) -> str:
    """scheme://host[:port] of a URL, without user or password; a port that is not a
    number is shown as none."""
    host = parts.hostname or "?"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{f'[{host}]' if ':' in host else host}{port}"


@dataclass(frozen=True)
class Config:
    node: NodeSection = field(default_factory=NodeSection)
    storage: StorageSection = field(default_factory=StorageSection)
    completion: CompletionSection = field(default_factory=CompletionSection)
    worker: WorkerSection = field(default_factory=WorkerSection)
    model: ModelSection = field(default_factory=ModelSection)
    triage: TriageSection = field(default_factory=TriageSection)  # the patient-level rule and its source
    explain: ExplainSection = field(default_factory=ExplainSection)
    output: OutputSection = field(default_factory=OutputSection)
    delivery: DeliverySection = field(default_factory=DeliverySection)
    log: LogSection = field(default_factory=LogSection)
    web: WebSection = field(default_factory=WebSection)
    dicomweb: DicomwebSection = field(default_factory=DicomwebSection)  # STOW-RS receive on the web server
    alerts: AlertsSection = field(default_factory=AlertsSection)
    destinations: tuple[Destination, ...] = ()
    sources: tuple[Source, ...] = ()  # PACS the node polls (pull mode)
    notify: tuple[NotifyTarget, ...] = ()
    source: Path | None = None  # the file it came from

    def validate(self) -> None:
        for section in (self.node, self.storage, self.completion, self.worker, self.model, self.triage,
                        self.explain, self.output, self.delivery, self.log, self.web, self.dicomweb, self.alerts):
            section.validate()
        if self.dicomweb.enabled and not self.web.enabled:
            raise ConfigError("dicomweb.enabled needs web.enabled: STOW-RS is served by the node's web server")
        if self.dicomweb.enabled and not (self.dicomweb.token or self.web.token):
            raise ConfigError("dicomweb.enabled needs dicomweb.token or web.token (at least 16 characters): "
                              "STOW-RS clients must present one as a bearer token")
        if self.web.enabled and self.web.tls and self.node.tls_certificate is None:
            raise ConfigError("web.tls uses node.tls_certificate and node.tls_private_key: set them, or put a "
                              "TLS proxy in front of the pages and leave web.tls false")
        if self.web.enabled and self.web.port == self.node.port:
            raise ConfigError(f"web.port and node.port are both {self.node.port}: the pages need a port of their own")
        names = [d.name for d in self.destinations]
        for i, destination in enumerate(self.destinations):
            destination.validate(f"destinations[{i}]")
        duplicates = {n for n in names if names.count(n) > 1}
        if duplicates:
            raise ConfigError(f"destinations: names must be unique, repeated: {sorted(duplicates)}")
        for i, target in enumerate(self.notify):
            target.validate(f"notify[{i}]")
        for i, pacs in enumerate(self.sources):
            pacs.validate(f"sources[{i}]")
        sources = [s.name for s in self.sources]
        repeated = {n for n in sources if sources.count(n) > 1}
        if repeated:
            raise ConfigError(f"sources: names must be unique, repeated: {sorted(repeated)}")
        if not self.triage.abstain and not self.silent:
            raise ConfigError("triage.abstain = false gives verdicts on studies the model does not support (another "
                              "body part, contrast, inputs unlike its training data) and would send them to the PACS: "
                              "it is allowed only in a silent trial (delivery.mode = \"silent\")")

    @property
    def calling_ae_title(self) -> str:
        return self.delivery.calling_ae_title or self.node.ae_title

    @property
    def silent(self) -> bool:
        return self.delivery.mode == DeliveryMode.SILENT

    @property
    def sending_to(self) -> tuple[Destination, ...]:
        """The destinations new results are queued for: none in a silent trial."""
        return () if self.silent else self.destinations

    @property
    def notifying(self) -> tuple[NotifyTarget, ...]:
        """The webhooks told of new outcomes: none in a silent trial."""
        return () if self.silent else self.notify


def parse_config(data: dict[str, Any], base: Path, source: Path | None = None) -> Config:
    """Build and validate a Config from parsed TOML; paths relative to `base`."""
    arrays = {"destinations": Destination, "notify": NotifyTarget, "sources": Source}  # [[name]] tables
    sections = {f.name for f in dataclasses.fields(Config)} - set(arrays) - {"source"}
    unknown = sorted(set(data) - sections - set(arrays))
    if unknown:
        raise ConfigError(
            f"unknown section [{unknown[0]}]; known: {', '.join(sorted(sections | set(arrays)))}"
        )
    hints = typing.get_type_hints(Config)
    values: dict[str, Any] = {
        name: anchor_paths(section_from_table(hints[name], name, data.get(name, {})), base)
        for name in sections
    }
    for name, kind in arrays.items():
        tables = data.get(name, [])
        if not isinstance(tables, list):
            raise ConfigError(f"{name} must be written as [[{name}]] tables")
        values[name] = tuple(anchor_paths(section_from_table(kind, f"{name}[{i}]", t), base)
                             for i, t in enumerate(tables))
    values["storage"] = dataclasses.replace(
        values["storage"], database_url=_anchor_sqlite(values["storage"].database_url, base)
    )
    config = Config(**values, source=source)
    config.validate()
    return config


def _anchor_sqlite(url: str, base: Path) -> str:
    try:
        return anchor_sqlite_url(url, base)
    except ValueError as exc:
        raise ConfigError(f"storage.database_url {url!r} is not an SQLAlchemy URL: {exc}") from None


def _relative_hint(config: Config, path: Path) -> str:
    """Where a relative path was looked for, when `path` lies in the config file's folder."""
    if config.source is None:
        return ""
    folder = config.source.resolve().parent
    return f" (relative paths are taken from the config file's folder {folder})" if path.is_relative_to(folder) else ""


def _can_create(config: Config, key: str, path: Path, *, folder: bool) -> None:
    """ConfigError unless `path` is a writable folder (or file), or can be made as one."""
    hint = _relative_hint(config, path)
    if path.exists():
        if path.is_dir() != folder:
            raise ConfigError(f"{key} {path} is {'not ' if folder else ''}a folder{hint}")
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{key} {path} cannot be written by this user{hint}")
        return
    parent = next(p for p in path.parents if p.exists())
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{key} {path} cannot be created: {parent} is not a folder this user may write in{hint}")


def check_paths(config: Config) -> None:
    """What `serve` and `worker` read and create, checked before they create anything, so
    that a wrong path leaves no empty database, store or log behind: the checkpoint exists,
    storage.root, an SQLite database and log.path are, or can be made, where configured; and
    each destination's credentials file can be read (its content is read at each send)."""
    checkpoint = config.model.checkpoint
    if checkpoint is not None and not checkpoint.is_file():
        what = "is not a file" if checkpoint.exists() else "does not exist"
        raise ConfigError(f"model.checkpoint {checkpoint} {what}{_relative_hint(config, checkpoint)}")
    _can_create(config, "storage.root", config.storage.root, folder=True)
    database = sqlite_file(config.storage.database_url)
    if database is not None:
        _can_create(config, "storage.database_url", database, folder=False)
    _can_create(config, "log.path", config.log.path, folder=False)
    for i, destination in enumerate(config.destinations):
        secret = destination.credentials_file
        if secret is not None and not (secret.is_file() and os.access(secret, os.R_OK)):
            what = "cannot be read by this user" if secret.is_file() else "does not exist"
            raise ConfigError(f"destinations[{i}].credentials_file {secret} {what}{_relative_hint(config, secret)}")


def config_path(explicit: str | Path | None) -> Path:
    """--config, else $ICHNODE_CONFIG, else ./config.toml."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(ENV_VAR) or DEFAULT_PATH)


def load_config(path: str | Path | None = None) -> Config:
    """Read, check and return the configuration; ConfigError names the file and key."""
    path = config_path(path)
    data = read_toml(path, f" (use --config PATH or set {ENV_VAR})")
    try:
        return parse_config(data, path.resolve().parent, source=path)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
