"""One bleed of a given subtype, rendered on a phantom slice, for tests of what a bleed looks like."""

from __future__ import annotations

import numpy as np

from training.phantom import random_bleed, random_head, render_slice

__all__ = ["rendered_bleed"]


def rendered_bleed(subtype: str, *, min_pixels: int = 1) -> tuple[np.ndarray, np.ndarray] | None:
    """(HU, bleed mask) of the first axial slice (0.9 mm pixels, 256²) where a bleed of
    `subtype` covers at least `min_pixels`; None if 20 random bleeds never do. Bleeds are
    placed at random, so a few tries find one; the seed keeps it the same every run."""
    rng = np.random.default_rng(5)
    head = random_head(rng)
    coords = (np.arange(256) - 127.5) * 0.9
    x, y = np.meshgrid(coords, coords)
    c = head.inner_semi_axes[2]
    for _attempt in range(20):
        bleed = random_bleed(rng, head, subtype, (-0.3 * c, 0.6 * c))
        for z in np.linspace(-0.3 * c, 0.6 * c, 19):
            hu, mask = render_slice(head, [bleed], x, y, float(z), rng)
            if (mask > 0).sum() >= min_pixels:
                return hu, mask
    return None
