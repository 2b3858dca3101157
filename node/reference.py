"""What a result copies from the analysed series: patient, study, equipment and series
identity, each value valid for its VR or empty.

Real scanner data lacks Type 2 attributes (an anonymiser removed PatientBirthDate), holds
values its VR does not allow (PatientSex "MALE", StudyTime "25:61", a 20-character
AccessionNumber) or names a character set nobody knows. highdicom refuses such values, and
a result that copied them would fail validation at the PACS. The result builders
therefore never see the received dataset: `result_reference` gives them a new one with
only the attributes results copy, read through `training.model.attributes`. A Type 2
attribute that is absent or invalid is present and empty, as the IODs require; a Type 3
one is left out.
"""

from __future__ import annotations

import datetime as dt
import re

import highdicom as hd
from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.valuerep import validate_value

from training.model import attributes as attr

__all__ = ["COPIED", "result_reference"]

# (keyword, VR, type): the attributes a result copies. Type 1 ones the node has checked
# on receipt (the UIDs); Type 2 ones are always present, empty when unknown.
COPIED: tuple[tuple[str, str, str], ...] = (
    # Patient
    ("PatientName", "PN", "2"), ("PatientID", "LO", "2"), ("IssuerOfPatientID", "LO", "3"),
    ("PatientBirthDate", "DA", "2"), ("PatientSex", "CS", "2"),
    # General Study
    ("StudyInstanceUID", "UI", "1"), ("StudyDate", "DA", "2"), ("StudyTime", "TM", "2"),
    ("ReferringPhysicianName", "PN", "2"), ("StudyID", "SH", "2"), ("AccessionNumber", "SH", "2"),
    ("StudyDescription", "LO", "3"),
    # The analysed series and its equipment: the results cite its images, and the SC names
    # the scanner as the equipment that acquired them.
    ("SeriesInstanceUID", "UI", "1"), ("Modality", "CS", "1"), ("SeriesNumber", "IS", "3"),
    ("FrameOfReferenceUID", "UI", "3"), ("Manufacturer", "LO", "3"), ("ManufacturerModelName", "LO", "3"),
    ("DeviceSerialNumber", "LO", "3"), ("SoftwareVersions", "LO", "3"), ("InstitutionName", "LO", "3"),
    ("StationName", "SH", "3"), ("Rows", "US", "3"), ("Columns", "US", "3"),
)
_SEXES = {"M", "F", "O"}
_TIME = re.compile(r"^([01]\d|2[0-3])([0-5]\d([0-5]\d|60)?)?(\.\d{1,6})?$")
_UID = re.compile(r"^(0|[1-9]\d*)(\.(0|[1-9]\d*))*$")
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x0c\x0e-\x1a\x1c-\x1f\x7f]")  # ESC (1b) starts ISO 2022 escapes
UTF8 = "ISO_IR 192"
_EXTENSION = "ISO 2022 IR "
_WRITABLE = {term.value for term in hd.enum.SpecificCharacterSetValues}
# Code-extension terms of single-byte repertoires: the only ones allowed first of several.
_SINGLE_BYTE_EXTENSIONS = {f"{_EXTENSION}{n}" for n in ("6", "100", "101", "109", "110", "144", "127", "126", "138",
                                                          "148", "203", "166", "13")}


def _valid(vr: str, value: str) -> bool:
    """Whether `value` (one value, as text) is allowed for `vr`."""
    if vr == "DA":
        try:
            dt.datetime.strptime(value, "%Y%m%d")
        except ValueError:
            return False
        return len(value) == 8
    if vr == "TM":
        return bool(_TIME.match(value))
    if vr == "UI":
        return len(value) <= 64 and bool(_UID.match(value))
    if vr in ("US", "IS"):
        return value.lstrip("-").isdigit() and (vr == "IS" or 0 <= int(value) < 65536)
    if _CONTROL.search(value):
        return False
    try:
        validate_value(vr, value, pydicom_config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _copied(source: Dataset, keyword: str, vr: str) -> str | list[str] | None:
    """The source's value if every part is valid for `vr`; None otherwise."""
    if vr == "UI":
        found = attr.uid(source, keyword)
    elif vr in ("US", "IS"):
        number = attr.integer(source, keyword)
        found = "" if number is None else str(number)
    else:
        found = attr.text(source, keyword)
    if not found:
        return None
    parts = found.split("\\") if vr in ("LO", "CS") and keyword == "SoftwareVersions" else [found]
    if not all(_valid(vr, part) for part in parts):
        return None
    if "\ufffd" in found:  # bytes its character set cannot decode: a re-encoded copy would be another name
        return None
    if keyword == "PatientSex" and found not in _SEXES:
        return None
    return parts if len(parts) > 1 else parts[0]


def _character_set(source: Dataset) -> str | list[str]:
    """The source's SpecificCharacterSet where highdicom can write it (one term without
    code extensions, or several that all use them, the first single-byte); the same
    repertoire without extensions for a lone "ISO 2022 IR n"; UTF-8 otherwise (an unknown
    term, Korean), which encodes whatever pydicom decoded."""
    terms = [t.strip() for t in attr.text(source, "SpecificCharacterSet").split("\\")]
    if terms == [""]:
        return ""
    if len(terms) == 1:
        term = terms[0]
        if term.startswith(_EXTENSION):
            number = term[len(_EXTENSION):]
            term = "" if number == "6" else f"ISO_IR {number}"
        return term if term == "" or term in _WRITABLE else UTF8
    first, *others = terms
    terms = [first or f"{_EXTENSION}6", *others]  # highdicom names the default repertoire
    if terms[0] in _SINGLE_BYTE_EXTENSIONS and all(t.startswith(_EXTENSION) and t in _WRITABLE for t in terms):
        return terms
    return UTF8


def result_reference(source: Dataset) -> Dataset:
    """A dataset of the attributes results copy from `source`, each valid for its VR;
    Type 2 ones present and empty when `source` has no valid value."""
    reference = Dataset()
    character_set = _character_set(source)
    if character_set:
        reference.SpecificCharacterSet = character_set
    for keyword, vr, kind in COPIED:
        found = _copied(source, keyword, vr)
        if found is not None:
            setattr(reference, keyword, int(found) if vr in ("US", "IS") else found)  # type: ignore[arg-type]
        elif kind == "2":
            setattr(reference, keyword, "")
    return reference
