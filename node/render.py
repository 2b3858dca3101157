"""Pictures for the result series: key-slice panels and the study summary, as RGB uint8.

Everything a radiologist needs to read the picture is burned in: the probability, the
slice position, the verdict, and NOT FOR DIAGNOSTIC USE (plus the demonstration or
untrained-model warning when the checkpoint's provenance calls for it).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pytorch_grad_cam.utils.image import show_cam_on_image

__all__ = ["PANEL_SIZE", "key_slice_image", "summary_image", "not_triaged_image"]

PANEL_SIZE = 512  # each half of a key-slice image, in pixels
HEADER = 104
FOOTER = 36
WHITE, RED, YELLOW, GREY, GREEN = (255, 255, 255), (255, 64, 64), (255, 210, 0), (150, 150, 150), (90, 220, 120)
AMBER = (255, 160, 40)
NOT_DIAGNOSTIC = "NOT FOR DIAGNOSTIC USE"


def _font(size: int) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


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
        draw.text((12, y), text, fill=colour, font=_font(22))
        y += 30
    footer = "  |  ".join([NOT_DIAGNOSTIC, *warnings])
    draw.text((12, HEADER + height + 8), footer, fill=YELLOW, font=_font(18))
    return np.asarray(canvas)


def key_slice_image(
    brain: np.ndarray,
    cam: np.ndarray,
    *,
    probability: float,
    slice_number: int,
    total_slices: int,
    position_mm: float | None,
    verdict_line: str,
    positive: bool,
    warnings: list[str],
    window_label: str = "brain window",
) -> np.ndarray:
    """Plain brain window beside the Grad-CAM overlay, with the slice's facts burned in.

    `brain` is the brain-window channel in [0, 1] and `cam` the Grad-CAM map in [0, 1],
    both at the model's input size, so they line up pixel for pixel. `window_label`
    names that window as the checkpoint defines it (e.g. "brain window (0-80 HU)").
    """
    if brain.shape != cam.shape:
        raise ValueError(f"brain window {brain.shape} and Grad-CAM {cam.shape} differ in shape")
    gray = np.clip(brain, 0, 1).astype(np.float32)
    rgb = np.repeat(gray[..., None], 3, axis=2)
    overlay = show_cam_on_image(rgb, np.clip(cam, 0, 1).astype(np.float32), use_rgb=True, image_weight=0.55)
    plain = (rgb * 255).round().astype(np.uint8)
    body = np.concatenate([_to_panel(plain), _to_panel(overlay)], axis=1)
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
    font = _font(18)
    count = len(probabilities)

    def x_at(index: int) -> float:
        return left + (right - left) * (index / max(count - 1, 1))

    def y_at(p: float) -> float:
        return bottom - (bottom - top) * float(p)

    draw.rectangle([left, top, right, bottom], outline=GREY)
    for tick in (0.0, 0.5, 1.0):
        draw.text((left - 48, y_at(tick) - 10), f"{tick:.1f}", fill=GREY, font=font)
    draw.line([left, y_at(slice_threshold), right, y_at(slice_threshold)], fill=YELLOW, width=2)
    draw.text((right - 190, y_at(slice_threshold) - 24), f"threshold {slice_threshold:.2f}", fill=YELLOW, font=font)
    points = [(x_at(i), y_at(p)) for i, p in enumerate(probabilities)]
    if len(points) > 1:
        draw.line(points, fill=WHITE, width=2)
    for i, (x, y) in enumerate(points):
        colour = RED if probabilities[i] > slice_threshold else WHITE
        radius = 7 if i in key_slices else 4
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour)
    draw.text((left, bottom + 12), f"slice 1 (inferior) ... slice {count} (superior)   "
              "large dots: key slices with heatmaps", fill=GREY, font=font)
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
              font=_font(22))
    y += 44
    for reason in reasons:
        for number, line in enumerate(_wrapped(reason, 84)):
            draw.text((24, y), ("- " if number == 0 else "  ") + line, fill=AMBER, font=_font(20))
            y += 28
        y += 6
    y += 10
    for fact in facts:
        for line in _wrapped(fact, 96):
            draw.text((24, y), line, fill=GREY, font=_font(18))
            y += 24
    draw.text((24, height - 40), "It is neither flagged nor cleared: read it as if no triage had run.",
              fill=WHITE, font=_font(20))
    header = [
        (verdict_line, AMBER),
        ("input outside what this model was trained on", WHITE),
        ("no heatmaps and no probabilities are shown: they would not be meaningful", GREY),
    ]
    return _frame(np.asarray(body), header, warnings)
