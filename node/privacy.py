"""Keeping patient data out of reasons and library warnings.

An error raised inside pydicom or highdicom may quote the header value it refused — a
birth date, a name. Such texts become a failed study's reason, which reaches the triage
log, the webhooks and the web pages, none of which may name a patient (unless
`log.include_patient_identifiers`). `redact` removes what could be a quoted value; the
worker applies it to every reason it did not write itself and to library warnings.
"""

from __future__ import annotations

import re

from pydicom.datadict import tag_for_keyword

__all__ = ["REDACTED", "redact"]

REDACTED = "…"
# A quoted value ('…', "…", `…`), a PN with components (Doe^Jane), and dates (19800203,
# 1980-02-03): what libraries quote when they refuse a value.
_QUOTED = re.compile(r"""'[^']*'|"[^"]*"|`[^`]*`""")
_PERSON_NAME = re.compile(r"\b[^\s^=]+(\^[^\s^=]*)+")
_DATE = re.compile(r"(?<![\d.])(1[89]|20)\d{2}-?(0\d|1[0-2])-?[0-3]\d(?![\d.])")  # not inside a UID


def _unless_keyword(match: re.Match[str]) -> str:
    """A quoted DICOM keyword ('SliceThickness') names an attribute, not a patient: kept."""
    return match.group(0) if tag_for_keyword(match.group(0)[1:-1]) is not None else REDACTED


def redact(text: str) -> str:
    """`text` without quoted values (but for DICOM keywords), person names in DICOM form
    and dates."""
    text = _QUOTED.sub(_unless_keyword, text)
    text = _PERSON_NAME.sub(REDACTED, text)
    return _DATE.sub(REDACTED, text)
