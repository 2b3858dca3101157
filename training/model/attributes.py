"""The one reader of DICOM attributes outside the pixel data.

Anonymised, older and vendor-written files routinely lack Type 2 and Type 3 attributes,
leave them empty or hold values their VR does not allow (an InstanceNumber of "abc", a
PatientSex of "MALE"). pydicom returns such values as raw strings, or raises while
converting them. Every function here answers absent, empty and malformed alike (None or
an empty value) and never raises, so no header value can turn into a code error; the
callers decide what an unknown value means. `number_or_error` is the one exception, for
values whose misreading would change the image (RescaleSlope): absent is None, malformed
raises `MalformedAttribute`.

Like highdicom's `_module_utils` and pydicom's `Dataset.get`, nothing else in the project
reads `ds.SomeAttribute` of a received instance directly.
"""

from __future__ import annotations

import datetime as dt
import math
import warnings
from collections.abc import Iterable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

__all__ = ["MalformedAttribute", "value", "text", "words", "number", "number_or_error", "integer", "numbers",
           "items", "first_item", "date", "uid"]


class MalformedAttribute(ValueError):
    """A value present but not readable as its VR says (only `number_or_error` raises it)."""


def value(ds: Dataset, keyword: str) -> Any:
    """The attribute's value as pydicom converts it, or None when absent, empty or not
    convertible. pydicom's own warnings about invalid values are not passed on: they quote
    the value, which may be a patient's name or birth date."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = ds.get(keyword)
    except Exception:  # pydicom raises several types for values it cannot convert
        return None
    if found is None or (isinstance(found, (str, bytes, list, MultiValue, Sequence)) and len(found) == 0):
        return None
    return found


def _values(found: Any) -> list[Any]:
    if isinstance(found, (list, MultiValue, tuple)):
        return list(found)
    return [found]


def text(ds: Dataset, keyword: str) -> str:
    """The value as one stripped string (several values joined with a backslash, as DICOM
    writes them); "" when absent, empty or unreadable."""
    found = value(ds, keyword)
    if found is None or isinstance(found, Sequence):
        return ""
    try:
        return "\\".join(str(v) for v in _values(found)).strip()
    except Exception:
        return ""


def words(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """Each value, stripped and upper-case (ImageType, FrameType); () when unknown."""
    found = value(ds, keyword)
    if found is None or isinstance(found, Sequence):
        return ()
    try:
        return tuple(str(v).strip().upper() for v in _values(found))
    except Exception:
        return ()


def _float(raw: Any) -> float | None:
    try:
        number_ = float(raw)
    except (TypeError, ValueError, OverflowError):
        return None
    return number_ if math.isfinite(number_) else None


def number(ds: Dataset, keyword: str) -> float | None:
    """The first value as a finite float; None when absent, empty or not a number."""
    found = value(ds, keyword)
    if found is None or isinstance(found, Sequence):
        return None
    return _float(_values(found)[0])


def number_or_error(ds: Dataset, keyword: str) -> float | None:
    """The first value as a float (infinity and NaN included, for the caller to refuse by
    name); None when absent or empty; MalformedAttribute when a value is there but is not
    a number."""
    found = value(ds, keyword)
    if found is None:
        if _raw_present(ds, keyword):
            raise MalformedAttribute(f"{keyword} cannot be read as a number")
        return None
    try:
        return float(_values(found)[0])
    except (TypeError, ValueError, OverflowError) as exc:
        raise MalformedAttribute(f"{keyword} {str(found)[:32]!r} is not a number") from exc


def _raw_present(ds: Dataset, keyword: str) -> bool:
    """Whether the element holds anything but padding (a value pydicom failed to convert)."""
    try:
        raw = ds.get_item(keyword)
        raw = getattr(raw, "value", None)
    except Exception:
        return False
    if isinstance(raw, bytes):
        return bool(raw.strip(b" \x00"))
    return bool(str(raw or "").strip())


def integer(ds: Dataset, keyword: str) -> int | None:
    """The first value as an int (a whole decimal such as "12.0" counts); None otherwise."""
    found = number(ds, keyword)
    if found is None or not found.is_integer():
        return None
    return int(found)


def numbers(ds: Dataset, keyword: str, count: int) -> tuple[float, ...] | None:
    """Exactly `count` finite floats (ImagePositionPatient: 3); None otherwise."""
    found = value(ds, keyword)
    if found is None or isinstance(found, Sequence):
        return None
    parsed = [_float(v) for v in _values(found)]
    if len(parsed) != count or any(v is None for v in parsed):
        return None
    return tuple(parsed)  # type: ignore[arg-type]


def items(ds: Dataset, keyword: str) -> list[Dataset]:
    """The items of a sequence; [] when absent, empty or not a sequence."""
    found = value(ds, keyword)
    if not isinstance(found, Sequence):
        return []
    return [item for item in found if isinstance(item, Dataset)]


def first_item(datasets: Iterable[Dataset | None], *path: str) -> Dataset | None:
    """The first item found by following sequence keywords `path` from each dataset in
    turn (a frame's own functional groups, then the shared ones); None when none has it."""
    for ds in datasets:
        current: Dataset | None = ds
        for keyword in path:
            found = items(current, keyword) if current is not None else []
            current = found[0] if found else None
        if current is not None:
            return current
    return None


def date(ds: Dataset, keyword: str) -> dt.date | None:
    """A DA value as a date; None when absent or not a real calendar date (19800231)."""
    found = text(ds, keyword)
    try:
        return dt.datetime.strptime(found[:8], "%Y%m%d").date() if len(found) >= 8 else None
    except ValueError:
        return None


def uid(ds: Dataset, keyword: str) -> str:
    """A UI value without its padding; "" when absent or unreadable."""
    return text(ds, keyword).rstrip("\x00").strip()
