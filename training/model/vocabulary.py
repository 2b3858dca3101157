"""Vendor vocabularies as tables: which body part, whether IV contrast, how sharp a kernel.

Scanners and sites write the same thing many ways: HEAD, BRAIN, SKULL, HEAD_NECK, KOPF or
nothing in BodyPartExamined; "CT HEAD W/O", "Head^Routine" or "Brain (Adult)" as a
description; FC21, UB, H30s or STANDARD as a soft-tissue kernel. The tables below map
those words to what the node needs to know. A word a table does not know decides nothing:
the image check of the head (training/model/scope.py) has the last word. Each entry has a
row in tests/test_vocabulary.py.
"""

from __future__ import annotations

import enum
import re

__all__ = ["Region", "BODY_PART_WORDS", "REGION_CODES", "CONTRAST_WORDS", "NON_CONTRAST_WORDS", "SHARP_KERNELS",
           "SOFT_KERNELS", "tokens", "region_of_body_part", "region_of_code", "regions_in_text", "contrast_words",
           "kernel_is_sharp"]


class Region(enum.StrEnum):
    """The body regions the node tells apart: the head, and the others a misrouted study brings."""

    HEAD = "head"
    NECK = "neck"
    CHEST = "chest"
    ABDOMEN = "abdomen"
    PELVIS = "pelvis"
    SPINE = "spine"
    HEART = "heart"
    EXTREMITY = "extremity"
    WHOLE_BODY = "whole body"


# BodyPartExamined values and description words (upper case, one token or joined with
# "_"), by region; English as DICOM PS3.16 Annex L lists them, then the vendors' and sites'
# own words in the languages scanners are set up in.
BODY_PART_WORDS: dict[str, Region] = {
    # The head: the defined term, its parts, and head-and-neck (the head is in it).
    "HEAD": Region.HEAD, "BRAIN": Region.HEAD, "SKULL": Region.HEAD, "CRANIUM": Region.HEAD,
    "CEREBRUM": Region.HEAD, "CEREBRAL": Region.HEAD, "CRANIAL": Region.HEAD, "HEADNECK": Region.HEAD,
    "HEAD_NECK": Region.HEAD, "HEAD_AND_NECK": Region.HEAD, "NEURO": Region.HEAD, "NEUROCRANIUM": Region.HEAD,
    "KOPF": Region.HEAD, "SCHAEDEL": Region.HEAD, "SCHÄDEL": Region.HEAD, "GEHIRN": Region.HEAD,
    "CCT": Region.HEAD, "CRANE": Region.HEAD, "TETE": Region.HEAD, "TÊTE": Region.HEAD, "CERVEAU": Region.HEAD,
    "CABEZA": Region.HEAD, "CRANEO": Region.HEAD, "CRÁNEO": Region.HEAD, "CEREBRO": Region.HEAD,
    "CRANIO": Region.HEAD, "CRÂNIO": Region.HEAD, "TESTA": Region.HEAD, "ENCEFALO": Region.HEAD,
    "HOOFD": Region.HEAD, "HERSENEN": Region.HEAD, "SCHEDEL": Region.HEAD, "HUVUD": Region.HEAD,
    "HJERNE": Region.HEAD, "HOVED": Region.HEAD, "GLOWA": Region.HEAD, "GŁOWA": Region.HEAD,
    # Other regions.
    "NECK": Region.NECK, "CSPINE": Region.SPINE, "SPINE": Region.SPINE, "TSPINE": Region.SPINE,
    "LSPINE": Region.SPINE, "LUMBAR": Region.SPINE, "THORACIC": Region.SPINE, "SACRUM": Region.SPINE,
    "CHEST": Region.CHEST, "THORAX": Region.CHEST, "LUNG": Region.CHEST, "LUNGS": Region.CHEST,
    "BREAST": Region.CHEST, "THORAX_ABDOMEN": Region.CHEST, "CHEST_ABDOMEN": Region.CHEST,
    "ABDOMEN": Region.ABDOMEN, "ABD": Region.ABDOMEN, "LIVER": Region.ABDOMEN, "KIDNEY": Region.ABDOMEN,
    "KIDNEYS": Region.ABDOMEN, "RENAL": Region.ABDOMEN, "PANCREAS": Region.ABDOMEN, "ABDOMENPELVIS": Region.ABDOMEN,
    "ABDOMEN_PELVIS": Region.ABDOMEN, "BAUCH": Region.ABDOMEN, "PELVIS": Region.PELVIS, "HIP": Region.PELVIS,
    "HEART": Region.HEART, "CARDIAC": Region.HEART, "CORONARY": Region.HEART, "AORTA": Region.HEART,
    "KNEE": Region.EXTREMITY, "SHOULDER": Region.EXTREMITY, "EXTREMITY": Region.EXTREMITY,
    "ANKLE": Region.EXTREMITY, "WRIST": Region.EXTREMITY, "ELBOW": Region.EXTREMITY, "FOOT": Region.EXTREMITY,
    "HAND": Region.EXTREMITY, "WHOLEBODY": Region.WHOLE_BODY, "WHOLE_BODY": Region.WHOLE_BODY,
}

# Anatomic Region Sequence codes (CodedBodyPart): SNOMED CT and the older SNOMED-RT codes
# (scheme SRT) that DICOM used before 2019, as (scheme, value).
REGION_CODES: dict[tuple[str, str], Region] = {
    ("SCT", "69536005"): Region.HEAD, ("SRT", "T-D1100"): Region.HEAD,
    ("SCT", "12738006"): Region.HEAD, ("SRT", "T-A0100"): Region.HEAD,  # brain
    ("SCT", "89546000"): Region.HEAD, ("SRT", "T-11100"): Region.HEAD,  # skull
    ("SCT", "774007"): Region.HEAD, ("SRT", "T-D1000"): Region.HEAD,  # head and neck
    ("SCT", "45048000"): Region.NECK, ("SRT", "T-D1600"): Region.NECK,
    ("SCT", "51185008"): Region.CHEST, ("SRT", "T-D3000"): Region.CHEST,  # thorax
    ("SCT", "818983003"): Region.ABDOMEN, ("SCT", "113345001"): Region.ABDOMEN, ("SRT", "T-D4000"): Region.ABDOMEN,
    ("SCT", "816092008"): Region.PELVIS, ("SCT", "12921003"): Region.PELVIS, ("SRT", "T-D6000"): Region.PELVIS,
    ("SCT", "421060004"): Region.SPINE, ("SRT", "T-D04FF"): Region.SPINE,
    ("SCT", "80891009"): Region.HEART, ("SRT", "T-32000"): Region.HEART,
    ("SCT", "38266002"): Region.WHOLE_BODY, ("SRT", "T-D0010"): Region.WHOLE_BODY,
}
_CODE_SCHEMES = {"SNM3": "SRT", "99SDM": "SRT"}  # older designators of the same codes

# Words and phrases of descriptions that say IV contrast was given, and those that say it
# was not ("W/O CONTRAST" names contrast only to deny it). Matched on tokens joined by one
# space, so "C+", "W/ CONTRAST", "Post_Contrast" and "postcontrast" all count.
CONTRAST_WORDS: tuple[str, ...] = (
    "CTA", "ANGIO", "ANGIOGRAM", "ANGIOGRAPHY", "PERFUSION", "VENOGRAM", "VENOGRAPHY", "C+", "CE",
    "W CONTRAST", "WITH CONTRAST", "W CON", "POST CONTRAST", "POSTCONTRAST", "CONTRAST ENHANCED", "CECT",
    "ARTERIAL", "PORTAL VENOUS", "MIT KM", "KONTRAST", "AVEC INJECTION", "CON CONTRASTE",
)
NON_CONTRAST_WORDS: tuple[str, ...] = (
    "W O", "WO", "WITHOUT", "NON CONTRAST", "NONCONTRAST", "NON CON", "NC", "NCCT", "PLAIN", "NATIVE", "NATIV",
    "OHNE KM", "SANS INJECTION", "SIN CONTRASTE", "PRE CONTRAST", "PRECONTRAST",
)

# Kernels and reconstruction words of sharp (bone, lung, detail) reconstructions, and of
# soft-tissue ones, across vendors. Siemens names sharpness by number after the letter
# (H30s soft brain, H70h or Hr60 bone); Canon/Toshiba by FC number (FC2x brain, FC3x bone,
# FC5x lung, FC8x bone); Philips by letter (UA-UC brain, D/E/YC-YF bone, L lung); GE by word.
SHARP_KERNELS: tuple[str, ...] = (
    r"BONE\w*", r"SHARP\w*", r"LUNG\w*", r"EDGE", r"DETAIL", r"ULTRA", r"HIGH ?RES\w*", r"HR",
    r"[HBJQIVY]?[HBJQ][rvf]?(5[5-9]|[6-9]\d)[a-z]?",  # Siemens H60s, Hr64, J70h, Br59, Qr59
    r"FC(3\d|5\d|8\d)",  # Canon / Toshiba
    r"Y[C-F]", r"D", r"E", r"L",  # Philips
)
SOFT_KERNELS: tuple[str, ...] = (
    r"SOFT\w*", r"STANDARD", r"STND", r"STD", r"BRAIN", r"HEAD", r"NEURO",
    r"[HBJQ][rv]?([1-4]\d|5[0-4])[a-z]?",  # Siemens H30s, Hr40, J40s
    r"FC(1\d|2\d|4\d)",  # Canon / Toshiba
    r"U[A-C]", r"A", r"B", r"C",  # Philips
)
_SHARP = re.compile(r"^(?:" + "|".join(SHARP_KERNELS) + r")$", re.IGNORECASE)
_SOFT = re.compile(r"^(?:" + "|".join(SOFT_KERNELS) + r")$", re.IGNORECASE)
_SPLIT = re.compile(r"[^A-Za-z0-9+ÄÖÜäöüÉÈÊÁÍÓÚÂéèêáíóúâŁł]+")
_CAMEL = re.compile(r"(?<=[a-z])(?=[A-Z])")


def tokens(description: str) -> list[str]:
    """A description as upper-case words: split at anything but letters, digits and "+"
    (so "C+" stays a word), and between camel-case words ("HeadRoutine", "CT_HEAD_WO",
    "Head^Routine")."""
    words = []
    for part in _SPLIT.split(description):
        for word in _CAMEL.split(part):
            if word:
                words.append(word.upper())
    return words


def region_of_body_part(body_part: str) -> Region | None:
    """The region a BodyPartExamined value names; None when the table does not know it."""
    word = body_part.strip().upper().replace(" ", "_").replace("-", "_")
    return BODY_PART_WORDS.get(word) or BODY_PART_WORDS.get(word.replace("_", ""))


def region_of_code(scheme: str, code: str) -> Region | None:
    """The region an Anatomic Region Sequence code names; None when unknown."""
    scheme = scheme.strip().upper()
    return REGION_CODES.get((_CODE_SCHEMES.get(scheme, scheme), code.strip()))


def regions_in_text(description: str) -> set[Region]:
    """Every region a description names, word by word ("CT HEAD/NECK" names two)."""
    found = set()
    for word in tokens(description):
        region = region_of_body_part(word)
        if region is not None:
            found.add(region)
    return found


def _has_phrase(words: list[str], phrases: tuple[str, ...]) -> str | None:
    joined = f" {' '.join(words)} "
    return next((phrase for phrase in phrases if f" {phrase} " in joined), None)


def contrast_words(description: str) -> str | None:
    """The phrase of a description that says IV contrast was given, or None (also when the
    description says it was not, as in "CT HEAD W/O CONTRAST")."""
    words = tokens(description)
    if _has_phrase(words, NON_CONTRAST_WORDS):
        return None
    return _has_phrase(words, CONTRAST_WORDS)


def kernel_is_sharp(kernel: str) -> bool | None:
    """True for a sharp (bone, lung) kernel, False for a soft-tissue one, None when the
    tables do not know it. Any word of a multi-word kernel ("BONEPLUS", "FC30 AIDR") counts."""
    verdicts = []
    for word in tokens(kernel) or [kernel.strip()]:
        if _SHARP.match(word):
            verdicts.append(True)
        elif _SOFT.match(word):
            verdicts.append(False)
    if not verdicts:
        return None
    return any(verdicts)
