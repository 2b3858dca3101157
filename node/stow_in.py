"""STOW-RS receive (PS3.18 10.5): studies POSTed to /dicomweb/studies on the web server.

Each part of a `multipart/related; type="application/dicom"` body goes through the same
durable ingest as a C-STORE (`Ingest.receive`: fsync and a database row before the
answer), recorded with the calling AE title "STOW-RS".

Memory stays bounded whatever a client sends. The token is checked before the body is
read. A declared Content-Length over dicomweb.max_request_mb is refused (413) unread; a
chunked body is read no further than that. The body streams to a private file (0600)
inside storage.root, so on the store's file system, removed when the request is answered.
That file is then parsed twice, a chunk at a time: once to check that it is well-formed
multipart (400 otherwise, nothing stored) and to size its parts, once to ingest them, with
one part in memory at a time (collected, then copied once into the bytes the ingest
writes: at most twice dicomweb.max_instance_mb). A part over dicomweb.max_instance_mb is
never read into memory: it is a failed part (0xA700), and the other parts of the request
are still stored.

The answer is PS3.18's: a DICOM JSON object with a Referenced SOP Sequence for the stored
instances and a Failed SOP Sequence, with the C-STORE status as Failure Reason, for the
refused ones; HTTP 200 when all were stored, 202 when some were, 409 when none was.
"""

from __future__ import annotations

import hmac
import io
import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from node.config import DicomwebSection
from node.ingest import Ingest, Status
from training.model import attributes as attr

__all__ = ["CALLING_AET", "PATH_PREFIX", "StowReceiver"]

log = logging.getLogger(__name__)
CALLING_AET = "STOW-RS"  # what the database records as the sender of an instance that came this way
PATH_PREFIX = "/dicomweb/"
READ_CHUNK = 1 << 20  # how much of the spooled body is parsed at a time
DICOM_JSON = "application/dicom+json"


class Malformed(ValueError):
    """The body is not the multipart it says it is: answered 400, nothing stored."""


@dataclass
class Part:
    """One part of the body as the first pass found it."""

    size: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    """What became of one part: stored (status 0) or refused with a C-STORE status."""

    status: int
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    reason: str = ""  # why it was refused, for the log


def _feed(path: Path, boundary: bytes, callbacks: dict[str, Callable]) -> bool:
    """Run the body in `path` through a multipart parser; whether it reached the closing
    delimiter. Malformed when the parser finds it is not multipart with this boundary."""
    ended = []
    parser = MultipartParser(boundary, {**callbacks, "on_end": lambda: ended.append(True)})
    try:
        with path.open("rb") as body:
            while chunk := body.read(READ_CHUNK):
                parser.write(chunk)
        parser.finalize()
    except MultipartParseError as exc:
        raise Malformed(f"the body is not multipart/related with the boundary of its Content-Type: {exc}") from None
    return bool(ended)


def scan(path: Path, boundary: bytes) -> list[Part]:
    """The parts of the body (size and headers), or Malformed."""
    parts: list[Part] = []
    header: list[bytes] = [b"", b""]

    def on_header_end() -> None:
        parts[-1].headers[header[0].decode("latin-1").strip().lower()] = header[1].decode("latin-1").strip()
        header[:] = [b"", b""]

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1].size += end - start

    complete = _feed(path, boundary, {
        "on_part_begin": lambda: parts.append(Part()),
        "on_header_field": lambda data, start, end: header.__setitem__(0, header[0] + data[start:end]),
        "on_header_value": lambda data, start, end: header.__setitem__(1, header[1] + data[start:end]),
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
    })
    if not complete:
        raise Malformed("the body ends before the closing boundary delimiter")
    if not parts:
        raise Malformed("the body has no parts")
    return parts


def each_part(path: Path, boundary: bytes, parts: list[Part], max_bytes: int,
              handle: Callable[[int, bytes | None], None]) -> None:
    """Call `handle(index, data)` for each part in order as the parser finishes it; data
    is None for a part larger than `max_bytes`, which is never held."""
    current = [-1]
    data = bytearray()

    def on_part_data(chunk: bytes, start: int, end: int) -> None:
        if parts[current[0]].size <= max_bytes:
            data.extend(chunk[start:end])

    def on_part_end() -> None:
        index = current[0]
        handle(index, bytes(data) if parts[index].size <= max_bytes else None)
        data.clear()

    _feed(path, boundary, {"on_part_begin": lambda: current.__setitem__(0, current[0] + 1),
                           "on_part_data": on_part_data, "on_part_end": on_part_end})


def _unread(text: str, status_code: int, **headers: str) -> Response:
    """A refusal answered before the body is read: the connection is closed after it, so
    that the client's upload stops instead of being read and thrown away."""
    return PlainTextResponse(text, status_code=status_code, headers={"connection": "close", **headers})


def _boundary(content_type: str) -> bytes | Response:
    """The boundary of a STOW-RS request's Content-Type, or the answer refusing it."""
    kind, options = parse_options_header(content_type)
    media_type = options.get(b"type", b"").decode("latin-1").strip().lower()
    if kind != b"multipart/related" or media_type != "application/dicom":
        return _unread('STOW-RS here takes Content-Type: multipart/related; type="application/dicom"; '
                       f"got {content_type[:200]!r}", 415)
    boundary = options.get(b"boundary", b"")
    if not boundary:
        return _unread("the Content-Type has no boundary parameter", 400)
    return boundary


class StowReceiver:
    """The STOW-RS endpoint: checks the token, spools the body, stores its parts, answers."""

    def __init__(self, settings: DicomwebSection, web_token: str, ingest: Ingest, spool_folder: Path) -> None:
        self.settings = settings
        self.token = settings.token or web_token
        self.token_key = "dicomweb.token" if settings.token else "web.token"
        self.ingest = ingest
        self.spool_folder = spool_folder
        self.max_request = settings.max_request_mb * 2**20
        self.max_instance = settings.max_instance_mb * 2**20

    async def store(self, request: Request) -> Response:
        client = request.client.host if request.client else "?"
        if not self._authorised(request):
            log.warning("refused a STOW-RS request from %s: no valid bearer token", client)
            return _unread(f"STOW-RS needs the token ({self.token_key}) as Authorization: Bearer …", 401,
                           **{"www-authenticate": "Bearer"})
        boundary = _boundary(request.headers.get("content-type", ""))
        if isinstance(boundary, Response):
            return boundary
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_request):
            return self._too_large(client)
        try:
            fd, name = tempfile.mkstemp(prefix=".stow-", suffix=".partial", dir=self.spool_folder)  # mode 0600
        except OSError as exc:
            return self._cannot_spool(client, exc)
        spool = Path(name)
        try:
            with open(fd, "wb", buffering=READ_CHUNK) as body:
                received = 0
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > self.max_request:
                        return self._too_large(client)
                    body.write(chunk)
            study_uid = request.path_params.get("study", "")
            outcomes = await run_in_threadpool(self._store_parts, spool, boundary, study_uid)
        except ClientDisconnect:
            log.warning("a STOW-RS request from %s ended before its body arrived whole: nothing stored", client)
            return PlainTextResponse("the request body did not arrive whole", status_code=400)
        except Malformed as exc:
            log.warning("refused a STOW-RS request from %s: %s", client, exc)
            return PlainTextResponse(str(exc), status_code=400)
        except OSError as exc:  # writing or reading the spool file
            return self._cannot_spool(client, exc)
        finally:
            spool.unlink(missing_ok=True)
        return self._answer(outcomes, client)

    def _authorised(self, request: Request) -> bool:
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        return bool(self.token) and scheme.lower() == "bearer" and \
            hmac.compare_digest(given.strip().encode(), self.token.encode())

    def _cannot_spool(self, client: str, exc: OSError) -> Response:
        """503 for a body that could not be spooled (a full or unwritable storage.root)."""
        log.error("a STOW-RS request from %s could not be spooled in storage.root %s: %s", client,
                  self.spool_folder, exc.strerror or exc)
        return _unread(f"the node could not spool the request body: {exc.strerror or exc}; send it again later", 503)

    def _too_large(self, client: str) -> Response:
        log.warning("refused a STOW-RS request from %s: body over dicomweb.max_request_mb (%d MiB)", client,
                    self.settings.max_request_mb)
        return _unread(f"a STOW-RS request body may be at most {self.settings.max_request_mb} MiB "
                       "(dicomweb.max_request_mb)", 413)

    def _store_parts(self, spool: Path, boundary: bytes, study_uid: str) -> list[Outcome]:
        parts = scan(spool, boundary)
        outcomes: list[Outcome] = []
        each_part(spool, boundary, parts, self.max_instance,
                  lambda index, data: outcomes.append(self._store_part(parts[index], data, study_uid)))
        return outcomes

    def _store_part(self, part: Part, data: bytes | None, study_uid: str) -> Outcome:
        """One part through the ingest; a part that cannot be stored is an Outcome, never an error."""
        if data is None:
            return Outcome(Status.OUT_OF_RESOURCES, reason=f"larger than dicomweb.max_instance_mb "
                                                           f"({self.settings.max_instance_mb} MiB)")
        content_type = part.headers.get("content-type", "application/dicom").split(";")[0].strip().lower()
        if content_type != "application/dicom":
            return Outcome(Status.CANNOT_UNDERSTAND, reason=f"a part of type {content_type[:80]!r}")
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
            transfer_syntax = str(ds.file_meta.TransferSyntaxUID)
        except Exception:  # pydicom raises many types for what is not a DICOM file
            return Outcome(Status.CANNOT_UNDERSTAND, reason="not a DICOM file (PS3.10 preamble, DICM and file "
                                                            "meta with a transfer syntax)")
        sop_class, sop_instance = attr.uid(ds, "SOPClassUID"), attr.uid(ds, "SOPInstanceUID")
        if study_uid and attr.uid(ds, "StudyInstanceUID") != study_uid:
            return Outcome(Status.DATASET_MISMATCH, sop_class, sop_instance, reason="of another study than the URL's")
        status = self.ingest.receive(ds, data, calling_aet=CALLING_AET, transfer_syntax_uid=transfer_syntax)
        return Outcome(status, sop_class, sop_instance, reason="" if status == Status.SUCCESS else "refused by ingest")

    def _answer(self, outcomes: list[Outcome], client: str) -> Response:
        stored = [o for o in outcomes if o.status == Status.SUCCESS]
        failed = [o for o in outcomes if o.status != Status.SUCCESS]
        reasons = sorted({f"{o.reason} (0x{o.status:04X})" for o in failed})
        log.info("STOW-RS from %s: %d stored, %d refused%s", client, len(stored), len(failed),
                 f": {'; '.join(reasons)}" if reasons else "")
        answer = Dataset()
        if stored:
            answer.ReferencedSOPSequence = [_reference(o) for o in stored]
        if failed:
            answer.FailedSOPSequence = [_reference(o, failure=o.status) for o in failed]
        code = 409 if not stored else 202 if failed else 200
        return JSONResponse(answer.to_json_dict(), status_code=code, media_type=DICOM_JSON)


def _reference(outcome: Outcome, *, failure: int | None = None) -> Dataset:
    """An item of the Referenced or Failed SOP Sequence (the UIDs left out when unknown)."""
    item = Dataset()
    if outcome.sop_class_uid:
        item.ReferencedSOPClassUID = outcome.sop_class_uid
    if outcome.sop_instance_uid:
        item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    if failure is not None:
        item.FailureReason = failure
    return item

