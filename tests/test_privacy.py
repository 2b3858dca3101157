"""node.privacy: what libraries quote when they refuse a header value never reaches a reason."""

from __future__ import annotations

import pytest

from node.privacy import REDACTED, redact


@pytest.mark.parametrize(("text", "gone"), [
    ("ValueError: Invalid value for VR DA: '19800231'", "19800231"),
    ('ValueError: value "Doe^Jane" is too long', "Doe^Jane"),
    ("TypeError: PatientName Doe^Jane^^Dr is not allowed", "Doe^Jane"),
    ("born 1980-02-03, seen 20240418", "1980-02-03"),
    ("born 1980-02-03, seen 20240418", "20240418"),
])
def test_quoted_values_names_and_dates_are_redacted(text: str, gone: str) -> None:
    redacted = redact(text)
    assert gone not in redacted and REDACTED in redacted


@pytest.mark.parametrize("text", [
    "InvalidInstance: series 1.2.20240418.3: only 3 of 40 slices are usable, fewer than worker.min_slices = 10",
    "KeyError: 'SliceThickness'",
])
def test_what_names_no_patient_is_kept(text: str) -> None:
    assert redact(text) == text
