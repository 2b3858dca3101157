"""The node's log: one line per record on stderr (what systemd's journal keeps), for the
long-running commands and `ichnode db upgrade`.

Libraries speak through it too, one line each and at WARNING or above: Python warnings
(torch's deprecations, pydicom's notes on a malformed value) as `py.warnings` records,
all but deprecations with quoted values, names and dates redacted, because a header value
in them may name a patient (pydicom's own record of the same warning is left out: it is
not redacted); Alembic only
when something is wrong (its per-revision chatter is left out: the node logs the
upgrade itself); and none of pynetdicom's lines about a failed association request the
node made, because the node logs its own line for each failed send, naming the
destination and the reason.
"""

from __future__ import annotations

import logging
import sys
import warnings
from typing import TextIO

from node.privacy import redact

__all__ = ["setup_logging", "LOG_FORMAT"]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Warnings about code, not data: the only ones whose text cannot quote a header value.
_ABOUT_CODE = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)

# Loggers that speak too much below WARNING: each request's whole URL (a webhook's
# secret) for httpx, every job run for apscheduler, every PDU for pynetdicom, every
# revision's docstring for Alembic, every STOW-RS request and connection for
# dicomweb_client and urllib3 (under requests).
_QUIET = ("pynetdicom", "apscheduler", "httpx", "alembic", "dicomweb_client", "urllib3")

# What pynetdicom logs at ERROR when an association the node requested fails (pynetdicom
# 3.0: transport.py, acse.py's requestor negotiation, association.py's waits for a
# response), and what a failed STOW-RS request logs. The senders raise DeliveryError for
# each of these and the node logs that.
_SEND_ATTEMPT_LINES = {
    "pynetdicom.transport": ("Association request failed: unable to connect", "TCP Initialisation Error"),
    "pynetdicom.acse": ("No accepted presentation contexts", "Association Rejected", "Result: ", "Reason: ",
                        "Received an invalid A-ASSOCIATE response", "Aborting Association", "Association Aborted",
                        "ACSE timeout reached while waiting for response to association request"),
    "pynetdicom.association": ("Connection closed while waiting for DIMSE message",
                               "DIMSE timeout reached while waiting for message response"),
    # dicomweb-client's retry wrapper logs each failed STOW-RS request with its traceback;
    # node.stow_out raises DeliveryError for it, logged by the node in one line.
    "retrying": ("Attempts: ",),
}


class _OneLine(logging.Formatter):
    """A record's message on one line, so that a multi-line library message cannot pass
    for several records (or hide one); tracebacks keep their lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return " ".join(super().formatMessage(record).split("\n"))


def _kept(record: logging.LogRecord) -> bool:
    """False for a record the node's log leaves out: a failed send's pynetdicom lines, and
    pydicom's record of a warning it also issues (pydicom.misc.warn_and_log)."""
    if record.name == "pydicom" and record.funcName == "warn_and_log":
        return False
    prefixes = _SEND_ATTEMPT_LINES.get(record.name)
    return prefixes is None or not record.getMessage().startswith(prefixes)


def _log_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file: TextIO | None = None, line: str | None = None) -> None:
    """warnings.showwarning for the node: one WARNING record, redacted unless it is about code."""
    text = " ".join(str(message).split())
    if not issubclass(category, _ABOUT_CODE):
        text = redact(text)
    logging.getLogger("py.warnings").warning("%s: %s (%s:%d)", category.__name__, text, filename, lineno)


def setup_logging(level: int = logging.INFO, stream: TextIO | None = None) -> None:
    """Send the node's records and the libraries' warnings to `stream` (stderr), one line each."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_OneLine(LOG_FORMAT))
    handler.addFilter(_kept)
    logging.basicConfig(level=level, handlers=[handler])
    for name in _QUIET:
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.showwarning = _log_warning
