"""Sending results to a DICOMweb destination by STOW-RS (PS3.18 10.5), as a `Sender`.

One POST per delivery carries its objects as multipart/related; type="application/dicom",
encoded by dicomweb-client. Every way the destination can fail to take them all becomes a
DeliveryError, which `node.delivery.Deliveries` retries with the same back-off, failure
pages and exactly-once bookkeeping as a C-STORE: the destination unreachable or slower
than its timeout, an HTTP error answer (credentials refused included), instances listed
in the answer's Failed SOP Sequence, or instances missing from its Referenced SOP
Sequence. Messages name the destination by `Destination.described`, never a secret.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pydicom
import requests
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pynetdicom.status import STORAGE_SERVICE_CLASS_STATUS

from node.config import Destination
from node.dicomweb import open_client
from node.errors import ConfigError, DeliveryError
from training.model import attributes as attr

__all__ = ["DicomwebSender"]

_ERRNO = re.compile(r"\[(?:Errno -?\d+|SSL: [A-Z_]+)\] [^'\")(]*")


def _failure_reason(code: object) -> str:
    """A FailureReason (0008,1197) as 0xA700 (Refused: Out of Resources)."""
    if not isinstance(code, int):
        return "no reason given"
    category, meaning = STORAGE_SERVICE_CLASS_STATUS.get(code, ("", "unknown status"))
    return f"0x{code:04X} ({f'{category}: ' if category else ''}{meaning})"


def _failed_parts(answer: Dataset) -> list[str]:
    """Each instance the answer's Failed SOP Sequence lists, with its reason."""
    return [f"{attr.uid(item, 'ReferencedSOPInstanceUID') or '?'}: "
            f"{_failure_reason(attr.integer(item, 'FailureReason'))}"
            for item in attr.items(answer, "FailedSOPSequence")]


def _answer_of(response: requests.Response) -> Dataset:
    """The DICOM JSON body of an error answer (a 409 lists what failed), or an empty
    dataset when it has none or it cannot be read."""
    if "json" not in response.headers.get("Content-Type", ""):
        return Dataset()
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):  # not JSON, or not DICOM JSON
        return Dataset()


class DicomwebSender:
    """STOW-RS user agent: one POST per delivery, bounded by the destination's timeout
    (its own `timeout_seconds`, else `delivery.timeout_seconds`) for the connection and
    each read of the answer."""

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds

    def send(self, destination: Destination, files: list[Path], *, priority_high: bool) -> None:
        # STOW-RS has no priority; a flagged study's results are still claimed first.
        where = f"{destination.name} ({destination.described})"
        datasets = [self._read(where, path) for path in files]
        peer = destination.peer
        if destination.timeout_seconds is None:
            peer = dataclasses.replace(peer, timeout_seconds=self.timeout_seconds)
        try:
            client = open_client(peer, f"destination {destination.name}")
        except ConfigError as exc:  # the credentials file vanished or went bad since start-up
            raise DeliveryError(f"{where}: {exc}") from None
        try:
            answer = client.store_instances(datasets)
        except requests.HTTPError as exc:
            raise DeliveryError(self._refused(where, exc.response)) from None
        except (requests.Timeout, requests.ConnectionError) as exc:
            if isinstance(exc, requests.Timeout) or "timed out" in str(exc):  # a send that blocked is "aborted"
                raise DeliveryError(f"{where} did not answer the STOW-RS request within "
                                    f"{peer.timeout_seconds:g} s") from None
            raise DeliveryError(f"{where} could not be reached ({_cause(exc)})") from None
        except (requests.RequestException, ValueError, KeyError) as exc:  # an answer that cannot be read
            raise DeliveryError(f"{where} answered the STOW-RS request with something unreadable: "
                                f"{type(exc).__name__}") from None
        self._check(where, answer, datasets)

    @staticmethod
    def _read(where: str, path: Path) -> Dataset:
        try:
            return pydicom.dcmread(path)
        except (OSError, InvalidDicomError) as exc:
            raise DeliveryError(f"{where}: result {path.name} cannot be read: {exc}") from exc

    @staticmethod
    def _refused(where: str, response: requests.Response | None) -> str:
        """What an HTTP error answer means, in words."""
        if response is None:
            return f"{where} answered the STOW-RS request with an HTTP error"
        code = response.status_code
        if code in (401, 403):
            return f"{where}: the destination refused the node's credentials (HTTP {code})"
        failed = _failed_parts(_answer_of(response))
        if failed:
            return f"{where} stored none of the results (HTTP {code}), refused: {'; '.join(failed)}"
        return f"{where} answered the STOW-RS request with HTTP {code} {response.reason or ''}".rstrip()

    @staticmethod
    def _check(where: str, answer: Dataset, datasets: list[Dataset]) -> None:
        """A 200 or 202 stores the results only if nothing failed and every instance sent
        is referenced (PS3.18 10.5.3)."""
        failed = _failed_parts(answer)
        if failed:
            raise DeliveryError(f"{where} refused part of the results: {'; '.join(failed)}")
        stored = {attr.uid(item, "ReferencedSOPInstanceUID") for item in attr.items(answer, "ReferencedSOPSequence")}
        missing = [uid for uid in (attr.uid(ds, "SOPInstanceUID") for ds in datasets) if uid not in stored]
        if missing:
            raise DeliveryError(f"{where} did not confirm {len(missing)} of {len(datasets)} instances "
                                f"(not in its Referenced SOP Sequence), first {missing[0]}")


def _cause(exc: requests.ConnectionError) -> str:
    """Why the connection failed ("[Errno 111] Connection refused", "[SSL:
    CERTIFICATE_VERIFY_FAILED] certificate verify failed: …"), without the URL and pool
    details requests wraps around it."""
    found = _ERRNO.search(str(exc))
    return found.group(0).strip() if found else type(exc).__name__
