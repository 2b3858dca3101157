"""Pictures for the result series: key-slice panels and the study summary, as RGB uint8.

Everything a radiologist needs to read the picture is burned in: the probability, the
slice position, the verdict, what the heatmap's colours mean, and NOT FOR DIAGNOSTIC USE
(plus the demonstration or untrained-model warning when the checkpoint's provenance calls
for it). Text is drawn in DejaVu Sans, which matplotlib ships: Pillow's built-in font has
no ≥ or ², and a missing glyph burns in as an empty box.

The heatmap is coloured only inside the skull (Grad-CAM also lights up bone and scalp,
which says nothing about a bleed), and only as strongly as it counts: Grad-CAM scales
every map to a maximum of 1, so for a study the model calls negative the map is scaled by
the slice's P(ICH), and a calm study looks calm.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PANEL_SIZE", "SCALE_WIDTH", "FONT_PATH", "font", "shown_heat", "heat_overlay", "key_slice_image",
           "summary_image", "not_triaged_image"]

PANEL_SIZE = 512  # each half of a key-slice image, in pixels
SCALE_WIDTH = 136  # the colour scale beside the heatmap
HEADER = 104
FOOTER = 36
WHITE, RED, YELLOW, GREY, GREEN = (255, 255, 255), (255, 64, 64), (255, 210, 0), (150, 150, 150), (90, 220, 120)
AMBER = (255, 160, 40)
NOT_DIAGNOSTIC = "NOT FOR DIAGNOSTIC USE"
FONT_PATH = Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf"
COLOURS = colormaps["jet"]
# How the heat shows over the brain window: colour at this opacity from FULL_HEAT up,
# fading to none at 0, so that what the model ignored stays plain grey.
OPACITY = 0.6
FULL_HEAT = 0.25


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    """The pictures' font at `size` pixels."""
    return ImageFont.truetype(str(FONT_PATH), size)


def shown_heat(cam: np.ndarray, mask: np.ndarray, *, probability: float, positive: bool) -> np.ndarray:
    """The heat a key slice shows, in [0, 1]: the Grad-CAM map inside `mask` (the skull's
    inside) only, and for a study called negative scaled by the slice's P(ICH)."""
    if cam.shape != mask.shape:
        raise ValueError(f"Grad-CAM {cam.shape} and the intracranial mask {mask.shape} differ in shape")
    scale = 1.0 if positive else float(np.clip(probability, 0.0, 1.0))
    return (np.clip(cam, 0, 1) * mask * scale).astype(np.float32)


def heat_overlay(gray: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """`heat` (in [0, 1]) coloured over the grey image `gray` (in [0, 1]) as RGB uint8;
    where the heat is 0 the pixel stays exactly grey."""
    rgb = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    alpha = (OPACITY * np.clip(heat / FULL_HEAT, 0, 1))[..., None]
    colour = COLOURS(np.clip(heat, 0, 1))[..., :3].astype(np.float32)
    return ((rgb * (1 - alpha) + colour * alpha) * 255).round().astype(np.uint8)


def _colour_scale(height: int, lines: list[str]) -> np.ndarray:
    """A vertical colour bar from 0 (no evidence) to 1 (strongest), labelled, and `lines`
    below it saying how the map was drawn."""
    strip = Image.new("RGB", (SCALE_WIDTH, height), (0, 0, 0))
    draw = ImageDraw.Draw(strip)
    top, bottom, left, width = 56, height - 150, 12, 22
    draw.text((left, 8), "ICH evidence", fill=WHITE, font=font(16))
    draw.text((left, 28), "(Grad-CAM)", fill=GREY, font=font(14))
    values = np.linspace(1, 0, bottom - top)[:, None]
    bar = (COLOURS(np.repeat(values, width, axis=1))[..., :3] * 255).astype(np.uint8)
    strip.paste(Image.fromarray(bar), (left, top))
    draw.rectangle([left - 1, top - 1, left + width, bottom], outline=GREY)
    for value, label in ((1.0, "1 strongest"), (0.5, "0.5"), (0.0, "0 none")):
        y = bottom - (bottom - top) * value
        draw.line([left + width, y, left + width + 5, y], fill=GREY)
        draw.text((left + width + 8, y - 8), label, fill=WHITE, font=font(14))
    y = bottom + 16
    for line in lines:
        draw.text((left, y), line, fill=GREY, font=font(14))
        y += 20
    return np.asarray(strip)


def _to_panel(image: np.ndarray) -> np.ndarray:
    """Resize an (H, W[, 3]) uint8 image to PANEL_SIZE² for display."""
    if image.shape[0] == PANEL_SIZE and image.shape[1] == PANEL_SIZE:
        return image
    return np.asarray(Image.fromarray(image).resize((PANEL_SIZE, PANEL_SIZE), Image.BILINEAR))


def _frame(body: np.ndarray, header: list[tuple[str, tuple[int, int, int]]], warnings: list[str]) -> np.ndarray:
    """Put `body` between a header of text lines and a footer of warnings."""
    height, width = body.shape[:2]
    canvas = Image.new("RGB", (width, HEADER + height + FOOTER), (0, 0, 0))
    canvas.paste(Image.fromarray(body), (0, HEADER))
    draw = ImageDraw.Draw(canvas)
    y = 8
    for text, colour in header:
        draw.text((12, y), text, fill=colour, font=font(22))
        y += 30
    footer = "  |  ".join([NOT_DIAGNOSTIC, *warnings])
    draw.text((12, HEADER + height + 8), footer, fill=YELLOW, font=font(18))
    return np.asarray(canvas)


def key_slice_image(
    brain: np.ndarray,
    cam: np.ndarray,
    *,
    mask: np.ndarray,
    probability: float,
    slice_number: int,
    total_slices: int,
    position_mm: float | None,
    verdict_line: str,
    positive: bool,
    warnings: list[str],
    window_label: str = "brain window",
) -> np.ndarray:
    """Plain brain window beside the Grad-CAM overlay and its colour scale, with the
    slice's facts burned in.

    `brain` is the brain-window channel in [0, 1], `cam` the Grad-CAM map in [0, 1] and
    `mask` the inside of the skull, all at the model's input size, so they line up pixel
    for pixel. A slice on which no closed skull was found (an empty mask) shows the map
    unmasked and says so, rather than hide what drove the score. `window_label` names the
    window as the checkpoint defines it (e.g. "brain window (0-80 HU)").
    """
    if brain.shape != cam.shape:
        raise ValueError(f"brain window {brain.shape} and Grad-CAM {cam.shape} differ in shape")
    masked = bool(mask.any())
    heat = shown_heat(cam, mask if masked else np.ones_like(mask, dtype=bool), probability=probability,
                      positive=positive)
    gray = np.clip(brain, 0, 1).astype(np.float32)
    plain = (np.repeat(gray[..., None], 3, axis=2) * 255).round().astype(np.uint8)
    scale_lines = ["inside the skull" if masked else "no closed skull:", "only" if masked else "not masked"]
    scale_lines += ["flagged study:", "as computed"] if positive else ["not flagged:", f"× P(ICH) {probability:.3f}"]
    body = np.concatenate([_to_panel(plain), _to_panel(heat_overlay(gray, heat)),
                           _colour_scale(PANEL_SIZE, scale_lines)], axis=1)
    where = f", z = {position_mm:.1f} mm" if position_mm is not None else ""
    header = [
        (verdict_line, RED if positive else GREEN),
        (f"P(ICH) = {probability:.3f}   slice {slice_number} of {total_slices}{where}", WHITE),
        (f"left: {window_label}   right: Grad-CAM heatmap of the ICH class", GREY),
    ]
    return _frame(body, header, warnings)


def summary_image(
    probabilities: np.ndarray,
    *,
    slice_threshold: float,
    key_slices: list[int],
    verdict_line: str,
    rule_line: str,
    positive: bool,
    warnings: list[str],
) -> np.ndarray:
    """P(ICH) along the series (inferior → superior) with the threshold and key slices."""
    width, height = 2 * PANEL_SIZE, PANEL_SIZE
    left, right, top, bottom = 70, width - 30, 30, height - 60
    plot = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(plot)
    small = font(18)
    count = len(probabilities)

    def x_at(index: int) -> float:
        return left + (right - left) * (index / max(count - 1, 1))

    def y_at(p: float) -> float:
        return bottom - (bottom - top) * float(p)

    draw.rectangle([left, top, right, bottom], outline=GREY)
    for tick in (0.0, 0.5, 1.0):
        draw.text((left - 48, y_at(tick) - 10), f"{tick:.1f}", fill=GREY, font=small)
    draw.line([left, y_at(slice_threshold), right, y_at(slice_threshold)], fill=YELLOW, width=2)
    draw.text((right - 190, y_at(slice_threshold) - 24), f"threshold {slice_threshold:.2f}", fill=YELLOW, font=small)
    points = [(x_at(i), y_at(p)) for i, p in enumerate(probabilities)]
    if len(points) > 1:
        draw.line(points, fill=WHITE, width=2)
    for i, (x, y) in enumerate(points):
        colour = RED if probabilities[i] > slice_threshold else WHITE
        radius = 7 if i in key_slices else 4
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    draw.text((left, bottom + 12), f"slice 1 (inferior) ... slice {count} (superior)   "
              "large dots: key slices with heatmaps", fill=GREY, font=small)
    header = [
        (verdict_line, RED if positive else GREEN),
        (rule_line, WHITE),
        ("P(ICH) per slice of the analysed series", GREY),
    ]
    return _frame(np.asarray(plot), header, warnings)


def _wrapped(text: str, width: int) -> list[str]:
    """`text` in lines of at most `width` characters, broken at spaces."""
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def not_triaged_image(*, verdict_line: str, reasons: list[str], facts: list[str], warnings: list[str],
                      headline: str = "This study was not triaged: the model's answer would mean nothing for it.",
                      ) -> np.ndarray:
    """The one picture of a study the model did not answer for: why, with the numbers, and
    that it was neither flagged nor cleared — so nobody reads the silence as "not detected"."""
    width, height = 2 * PANEL_SIZE, PANEL_SIZE
    body = Image.new("RGB", (width, height), (0, 0, 0))
    draw = ImageDraw.Draw(body)
    y = 20
    draw.text((24, y), headline, fill=WHITE,
              font=font(22))
    y += 44
    for reason in reasons:
        for number, line in enumerate(_wrapped(reason, 84)):
            draw.text((24, y), ("- " if number == 0 else "  ") + line, fill=AMBER, font=font(20))
            y += 28
        y += 6
    y += 10
    for fact in facts:
        for line in _wrapped(fact, 96):
            draw.text((24, y), line, fill=GREY, font=font(18))
            y += 24
    draw.text((24, height - 40), "It is neither flagged nor cleared: read it as if no triage had run.",
              fill=WHITE, font=font(20))
    header = [
        (verdict_line, AMBER),
        ("input outside what this model was trained on", WHITE),
        ("no heatmaps and no probabilities are shown: they would not be meaningful", GREY),
    ]
    return _frame(np.asarray(body), header, warnings)
