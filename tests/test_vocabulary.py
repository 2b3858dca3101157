"""training.model.vocabulary: one test row per table entry, and the vendor styles of
descriptions and kernels the tables are for."""

from __future__ import annotations

import pytest

from training.model.vocabulary import (
    BODY_PART_WORDS,
    CONTRAST_WORDS,
    NON_CONTRAST_WORDS,
    REGION_CODES,
    Region,
    contrast_words,
    kernel_is_sharp,
    region_of_body_part,
    region_of_code,
    regions_in_text,
    tokens,
)


@pytest.mark.parametrize(("word", "region"), sorted(BODY_PART_WORDS.items()))
def test_every_body_part_word_maps_to_its_region(word: str, region: Region) -> None:
    assert region_of_body_part(word) == region
    assert region_of_body_part(f" {word.lower()} ") == region  # padding and case do not matter


@pytest.mark.parametrize(("code", "region"), sorted(REGION_CODES.items()))
def test_every_anatomic_region_code_maps_to_its_region(code: tuple[str, str], region: Region) -> None:
    assert region_of_code(*code) == region


@pytest.mark.parametrize("phrase", CONTRAST_WORDS)
def test_every_contrast_phrase_says_contrast(phrase: str) -> None:
    assert contrast_words(f"CT HEAD {phrase}") == phrase


@pytest.mark.parametrize("phrase", NON_CONTRAST_WORDS)
def test_every_non_contrast_phrase_overrules_the_word_contrast(phrase: str) -> None:
    assert contrast_words(f"CT HEAD {phrase} WITH CONTRAST CTA") is None


@pytest.mark.parametrize(("body_part", "region"), [
    ("HEAD", Region.HEAD), ("Brain", Region.HEAD), ("HEAD_NECK", Region.HEAD), ("HEAD-NECK", Region.HEAD),
    ("HEADNECK", Region.HEAD), ("Schädel", Region.HEAD), ("CRANIUM", Region.HEAD), ("CHEST", Region.CHEST),
    ("ABDOMENPELVIS", Region.ABDOMEN), ("C SPINE", Region.SPINE), ("CSPINE", Region.SPINE), ("PHANTOM", None), ("", None),
])
def test_body_part_values_as_scanners_write_them(body_part: str, region: Region | None) -> None:
    assert region_of_body_part(body_part) == region


@pytest.mark.parametrize(("description", "regions"), [
    ("CT HEAD WO CONTRAST", {Region.HEAD}),  # GE
    ("Head^01_HeadRoutine (Adult)", {Region.HEAD}),  # Siemens StudyDescription
    ("HeadSeq 5.0 H30s", {Region.HEAD}),  # Siemens camel case
    ("Brain (Adult) 5mm", {Region.HEAD}),  # Philips
    ("CT_HEAD_ROUTINE", {Region.HEAD}),
    ("Kopf nativ", {Region.HEAD}),
    ("CHEST/ABDOMEN 5mm", {Region.CHEST, Region.ABDOMEN}),
    ("Thorax^ThoraxRoutine", {Region.CHEST}),
    ("5mm STND", set()),
])
def test_regions_named_in_vendor_descriptions(description: str, regions: set[Region]) -> None:
    assert regions_in_text(description) == regions


@pytest.mark.parametrize(("description", "contrast"), [
    ("CT HEAD W/O CONTRAST", None), ("CT HEAD WO", None), ("Head nativ", None), ("NCCT HEAD", None),
    ("CTA HEAD NECK", "CTA"), ("Head C+ 5mm", "C+"), ("HEAD W/ CONTRAST", "W CONTRAST"),
    ("Post_Contrast Brain", "POST CONTRAST"), ("HEAD 4mm H30s (enhanced conversion)", None),
])
def test_contrast_in_vendor_descriptions(description: str, contrast: str | None) -> None:
    assert contrast_words(description) == contrast


@pytest.mark.parametrize(("kernel", "sharp"), [
    ("STANDARD", False), ("SOFT", False), ("BONE", True), ("BONEPLUS", True), ("LUNG", True), ("EDGE", True),  # GE
    ("H30s", False), ("H31s", False), ("Hr38", False), ("J40s", False), ("H70h", True), ("Hr64", True),  # Siemens
    ("Br59", True), ("Qr59", True), ("J70h", True), ("Hr38\\3", False),
    ("FC21", False), ("FC26", False), ("FC30", True), ("FC52", True), ("FC81", True), ("FC26 AIDR 3D", False),  # Canon
    ("UB", False), ("UC", False), ("B", False), ("D", True), ("E", True), ("YC", True), ("L", True),  # Philips
    ("", None), ("XYZ42", None),
])
def test_kernels_of_each_vendor(kernel: str, sharp: bool | None) -> None:
    assert kernel_is_sharp(kernel) is sharp


def test_tokens_split_vendor_punctuation_and_camel_case() -> None:
    assert tokens("Head^01_HeadRoutine (Adult) C+") == ["HEAD", "01", "HEAD", "ROUTINE", "ADULT", "C+"]
