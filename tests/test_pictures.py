"""The pictures read at a glance: heat only inside the skull, a negative study's map scaled
by its probability, and a font that has every character the pictures burn in."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from node import render
from node.render import PANEL_SIZE, font, heat_overlay, key_slice_image, shown_heat
from training.model.preprocess import PreprocessSpec, hu_to_input, mask_to_input
from training.model.scope import intracranial_mask
from tests.phantoms import rendered_bleed
from training.phantom import SUBTYPES

REPO = Path(__file__).resolve().parent.parent
# Every module whose strings end up burned into a picture: the renderer, the verdict and
# warning texts, the facts, the scope and input-check reasons, the series choice.
PICTURE_TEXT_MODULES = ["node/render.py", "node/output.py", "node/analysis.py", "training/model/scope.py",
                        "training/model/inputs.py", "training/model/checkpoint.py", "training/model/rule.py",
                        "training/model/series.py"]


def _disc(size: int, radius: float) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return (x - size / 2) ** 2 + (y - size / 2) ** 2 < radius ** 2


def _head(size: int = 256) -> np.ndarray:
    """HU of a round head: scalp, an 8-pixel skull, brain, and an air cell closed in bone."""
    y, x = np.mgrid[:size, :size]
    r = np.hypot(x - size / 2, y - size / 2)
    hu = np.full((size, size), -1000.0)
    hu[r < 110] = 40.0  # scalp
    hu[r < 104] = 1200.0  # skull
    hu[r < 96] = 35.0  # brain
    hu[(np.hypot(x - size / 2, y - 40) < 9)] = 1200.0  # a bony sinus wall…
    hu[(np.hypot(x - size / 2, y - 40) < 6)] = -900.0  # …around air
    return hu


# --- the heat a key slice shows -------------------------------------------------------


def test_a_negative_studys_heat_is_at_most_p_times_the_flagged_one_and_none_outside_the_skull() -> None:
    rng = np.random.default_rng(0)
    cam, mask, p = rng.random((64, 64)).astype(np.float32), _disc(64, 20), 0.08
    flagged = shown_heat(cam, mask, probability=p, positive=True)
    calm = shown_heat(cam, mask, probability=p, positive=False)
    assert np.all(calm <= p * flagged + 1e-7)
    assert np.array_equal(flagged[mask], cam[mask])  # a flagged study's map is as computed, inside the mask
    assert not flagged[~mask].any() and not calm[~mask].any()


def test_the_overlay_colours_nothing_where_there_is_no_heat() -> None:
    rng = np.random.default_rng(1)
    gray, mask = rng.random((64, 64)).astype(np.float32), _disc(64, 20)
    overlay = heat_overlay(gray, shown_heat(rng.random((64, 64)), mask, probability=0.9, positive=True))
    plain = (np.repeat(gray[..., None], 3, axis=2) * 255).round().astype(np.uint8)
    assert np.array_equal(overlay[~mask], plain[~mask])
    assert not np.array_equal(overlay[mask], plain[mask])


def test_a_key_slice_picture_colours_only_inside_the_skull_and_draws_a_colour_scale() -> None:
    rng = np.random.default_rng(2)
    brain, cam, mask = rng.random((PANEL_SIZE,) * 2), rng.random((PANEL_SIZE,) * 2), _disc(PANEL_SIZE, 180)
    image = key_slice_image(brain, cam, mask=mask, probability=0.95, slice_number=3, total_slices=30,
                            position_mm=None, verdict_line="x", positive=True, warnings=[])
    body = image[render.HEADER:render.HEADER + PANEL_SIZE]
    plain, overlay, scale = body[:, :PANEL_SIZE], body[:, PANEL_SIZE:2 * PANEL_SIZE], body[:, 2 * PANEL_SIZE:]
    assert np.array_equal(overlay[~mask], plain[~mask])
    coloured = scale.max(axis=2).astype(int) - scale.min(axis=2) > 100  # the bar's colours, not grey text
    assert coloured.sum() > 200 * 20


def test_a_slice_without_a_closed_skull_shows_its_map_unmasked() -> None:
    """Rather than hide what drove the score: the scale says the map is not masked."""
    cam = np.ones((64, 64), dtype=np.float32)
    image = key_slice_image(np.zeros((64, 64)), cam, mask=np.zeros((64, 64), dtype=bool), probability=0.95,
                            slice_number=1, total_slices=9, position_mm=None, verdict_line="x", positive=True,
                            warnings=[])
    overlay = image[render.HEADER:render.HEADER + PANEL_SIZE, PANEL_SIZE:2 * PANEL_SIZE]
    assert (overlay.max(axis=2) > 0).all()


def test_shown_heat_rejects_a_mask_of_another_shape() -> None:
    with pytest.raises(ValueError, match="shape"):
        shown_heat(np.zeros((8, 8)), np.zeros((4, 4), dtype=bool), probability=0.5, positive=True)


# --- the intracranial mask ------------------------------------------------------------


def test_the_intracranial_mask_is_the_brain_inside_the_skull() -> None:
    hu = _head()
    mask = intracranial_mask(hu, (0.5, 0.5))
    brain = hu == 35.0
    assert not (mask & (hu >= 300)).any()  # no bone
    assert not mask[hu <= -900].any()  # neither the air outside nor the air cell in bone
    assert mask[brain].mean() > 0.99  # grown back to the inner table


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_every_kind_of_bleed_lies_inside_the_mask(subtype: str) -> None:
    """Epidural and subdural collections lie against the inner table: the mask keeps them."""
    found = rendered_bleed(subtype, min_pixels=21)
    assert found is not None, f"no {subtype} bleed was rendered"
    hu, bleeding = found
    assert intracranial_mask(hu, (0.9, 0.9))[bleeding > 0].mean() > 0.98


def test_no_closed_skull_gives_an_empty_mask() -> None:
    hu = _head()
    hu[:, :128][hu[:, :128] >= 300] = 40.0  # half the skull removed
    assert not intracranial_mask(hu, (0.5, 0.5)).any()


def test_the_mask_lines_up_with_the_network_input() -> None:
    """A non-square slice is padded and resized as its network input is."""
    hu = _head()[:, 20:236]  # 256 × 216
    spec = PreprocessSpec(input_size=128)
    mask = mask_to_input(intracranial_mask(hu, (0.5, 0.5)), spec)
    brain_channel = hu_to_input(hu, spec)[0] * spec.std + spec.mean
    assert mask.shape == (128, 128)
    inside = brain_channel > 0.3  # brain (35 HU) in the 0-80 HU window, not air or bone edges
    assert (mask & inside).sum() / mask.sum() > 0.95


# --- the font has every character the pictures use ------------------------------------


def _picture_strings() -> list[str]:
    """The string constants and f-string parts of the modules whose texts are burned in
    (docstrings left out: they are never drawn)."""
    found = []
    for name in PICTURE_TEXT_MODULES:
        tree = ast.parse((REPO / name).read_text(encoding="utf-8"))
        docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                      if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and node.body
                      and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
        found += [node.value for node in ast.walk(tree)
                  if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings]
    return found


def _ink(character: str) -> np.ndarray:
    canvas = Image.new("L", (48, 48))
    ImageDraw.Draw(canvas).text((8, 4), character, font=font(24), fill=255)
    return np.asarray(canvas)


def _missing(characters: set[str]) -> list[str]:
    """Characters the pictures' font draws as its .notdef box (what it draws for a code
    point it has no glyph for)."""
    notdef = _ink("\uffff")
    return sorted(c for c in characters if c.isprintable() and not c.isspace() and np.array_equal(_ink(c), notdef))


def test_the_glyph_check_finds_a_missing_glyph() -> None:
    assert _missing({"中", "A"}) == ["中"]  # DejaVu Sans has no CJK glyphs


def test_the_font_has_every_character_the_pictures_use() -> None:
    characters = set("".join(_picture_strings()))
    assert {"≥", "²", "×"} <= characters  # the strings were found: the scope's reasons are among them
    assert _missing(characters) == []
