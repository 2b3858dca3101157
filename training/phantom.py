"""Synthetic head anatomy and bleeds in HU, as pure numpy.

A head is an ellipsoid of nested layers (scalp, skull with tables and diploe, CSF rim,
cortex with gyri and sulci, white matter, ventricles, basal cisterns). Bleeds of the five
RSNA subtypes are solids in the same patient space, so they span adjacent slices the way
real ones do. Every slice comes with a lesion mask: bit k set means subtype k is there.

Coordinates are DICOM patient space in mm: x towards the patient's left, y posterior,
z superior; the head's centre is near the origin.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "SUBTYPES",
    "SUBTYPE_BITS",
    "MIN_BLEED_PIXELS",
    "BLEED_HU_RANGE",
    "HeadGeometry",
    "Bleed",
    "random_head",
    "random_bleed",
    "render_slice",
    "lateral_projection",
]

# The RSNA 2019 subtypes, in the order of their mask bits.
SUBTYPES = ("epidural", "intraparenchymal", "intraventricular", "subarachnoid", "subdural")
SUBTYPE_BITS = {name: 1 << i for i, name in enumerate(SUBTYPES)}
# A bleed cut to fewer pixels than this in a slice is left out of that slice entirely,
# so that every labelled slice shows blood a reader could see.
MIN_BLEED_PIXELS = 40
# Mean density of fresh blood drawn per bleed; with noise voxels stay inside 50–90 HU.
BLEED_HU_RANGE = (60.0, 80.0)

AIR, FAT, SKIN, CSF, GREY, WHITE, EDEMA = -1000.0, -90.0, 40.0, 8.0, 38.0, 28.0, 18.0
BONE_TABLE, BONE_DIPLOE = 1450.0, 750.0


@dataclass(frozen=True)
class HeadGeometry:
    """Size, position and small individual traits of one synthetic head."""

    semi_axes: tuple[float, float, float]  # outer surface, mm: left-right, front-back, up
    centre: tuple[float, float]  # in-plane position of the head's centre, mm
    rotation: float  # in-plane yaw, radians
    scalp: float  # mm
    skull: float  # mm
    gyri: int  # folds around the circumference
    gyral_phase: float
    ventricle_scale: float

    @property
    def inner_semi_axes(self) -> tuple[float, float, float]:
        """Semi-axes of the inner table (the intracranial space)."""
        depth = self.scalp + self.skull
        return tuple(s - depth for s in self.semi_axes)  # type: ignore[return-value]


@dataclass(frozen=True)
class Bleed:
    """One bleed: subtype, density, and the shape parameters its subtype uses (head frame)."""

    subtype: str
    hu: float
    centre: tuple[float, float, float]  # mm, head frame
    radii: tuple[float, float, float]  # mm; meaning depends on subtype
    angle: float  # direction from the head's centre, radians (extra-axial bleeds)


def random_head(rng: np.random.Generator) -> HeadGeometry:
    """A plausible adult head: 140–160 mm wide, 175–200 mm long."""
    return HeadGeometry(
        semi_axes=(rng.uniform(70, 80), rng.uniform(88, 100), rng.uniform(95, 110)),
        centre=(rng.uniform(-8, 8), rng.uniform(-10, 6)),
        rotation=rng.uniform(-0.12, 0.12),
        scalp=rng.uniform(4.0, 6.0),
        skull=rng.uniform(6.0, 8.0),
        gyri=int(rng.integers(34, 46)),
        gyral_phase=rng.uniform(0, 2 * np.pi),
        ventricle_scale=rng.uniform(0.8, 1.3),
    )


def random_bleed(
    rng: np.random.Generator, head: HeadGeometry, subtype: str, z_range: tuple[float, float]
) -> Bleed:
    """A bleed of `subtype` placed where that subtype occurs, centred within `z_range`."""
    a, b, c = head.inner_semi_axes
    angle = rng.uniform(0, 2 * np.pi)
    hu = rng.uniform(*BLEED_HU_RANGE)
    if subtype == "intraparenchymal":
        z = rng.uniform(max(z_range[0], -0.1 * c), min(z_range[1], 0.6 * c))
        reach = rng.uniform(0.15, 0.55) * np.sqrt(max(1 - (z / c) ** 2, 0.2))
        centre = (reach * a * np.cos(angle), reach * b * np.sin(angle), z)
        radii = (rng.uniform(7, 16), rng.uniform(7, 16), rng.uniform(6, 12))
    elif subtype == "epidural":
        z = rng.uniform(max(z_range[0], 0.0), min(z_range[1], 0.6 * c))
        centre = (0.0, 0.0, z)
        radii = (rng.uniform(35, 55), rng.uniform(9, 16), 0.0)  # ball radius, max depth
    elif subtype == "subdural":
        z = rng.uniform(max(z_range[0], 0.0), min(z_range[1], 0.55 * c))
        centre = (0.0, 0.0, z)
        # half-width in angle (as radians × 10), max thickness, half-height in z
        radii = (rng.uniform(5, 9), rng.uniform(5, 11), rng.uniform(22, 40))
    elif subtype == "subarachnoid":
        z = rng.uniform(max(z_range[0], -0.3 * c), min(z_range[1], 0.6 * c))
        reach = rng.uniform(0.55, 0.9)
        centre = (reach * a * np.cos(angle), reach * b * np.sin(angle), z)
        radii = (rng.uniform(30, 45),) * 3
    elif subtype == "intraventricular":
        centre = (0.0, 0.0, 0.0)
        level = rng.uniform(-20, 5)  # fluid level (y, mm) of blood layering posteriorly
        radii = (level, float(rng.integers(0, 3)), 0.0)  # side: 0 left, 1 right, 2 both
    else:
        raise ValueError(f"unknown subtype {subtype!r}; known: {', '.join(SUBTYPES)}")
    return Bleed(subtype, hu, centre, radii, angle)


@dataclass(frozen=True)
class _Frame:
    """Head-frame coordinates of every pixel of one slice, and derived depths."""

    u: np.ndarray  # mm, head's left-right axis
    v: np.ndarray  # mm, head's front-back axis
    z: float
    depth: np.ndarray  # mm inward from the scalp surface along the ray from the centre
    theta: np.ndarray  # in-plane angle around the head's centre


def _frame(head: HeadGeometry, x: np.ndarray, y: np.ndarray, z: float) -> _Frame:
    cos, sin = np.cos(head.rotation), np.sin(head.rotation)
    dx, dy = x - head.centre[0], y - head.centre[1]
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    a, b, c = head.semi_axes
    radius3 = np.sqrt((u / a) ** 2 + (v / b) ** 2 + (z / c) ** 2) + 1e-9
    distance = np.sqrt(u**2 + v**2 + z**2)
    depth = (1.0 - radius3) * distance / radius3
    return _Frame(u, v, z, depth.astype(np.float32), np.arctan2(v / b, u / a))


def _ellipsoid(frame: _Frame, centre, radii) -> np.ndarray:
    return (
        ((frame.u - centre[0]) / radii[0]) ** 2
        + ((frame.v - centre[1]) / radii[1]) ** 2
        + ((frame.z - centre[2]) / radii[2]) ** 2
    ) <= 1.0


def _ventricles(head: HeadGeometry, frame: _Frame) -> tuple[np.ndarray, np.ndarray]:
    """(left lateral ventricle, right lateral ventricle | third | fourth ventricle)."""
    c = head.inner_semi_axes[2]
    k = head.ventricle_scale
    lateral_z, lateral_r = 0.25 * c, (5.5 * k, 24.0, 0.2 * c)
    left = _ellipsoid(frame, (9.0 * k, -2.0, lateral_z), lateral_r)
    right = _ellipsoid(frame, (-9.0 * k, -2.0, lateral_z), lateral_r)
    third = _ellipsoid(frame, (0.0, 2.0, 0.02 * c), (2.0 * k, 11.0, 0.12 * c))
    fourth = _ellipsoid(frame, (0.0, 28.0, -0.3 * c), (5.0, 4.0, 0.07 * c))
    return left, right | third | fourth


def _cisterns(head: HeadGeometry, frame: _Frame) -> np.ndarray:
    c = head.inner_semi_axes[2]
    ring = np.hypot(frame.u, frame.v - 4.0)
    return (ring > 12.0) & (ring < 17.0) & (abs(frame.z + 0.18 * c) < 0.07 * c)


def _anatomy(head: HeadGeometry, frame: _Frame) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """HU of the normal head and the compartments bleeds are placed into."""
    depth = frame.depth
    hu = np.full(depth.shape, AIR, dtype=np.float32)
    inside = depth >= 0
    hu[inside] = SKIN
    hu[(depth >= 1.5) & (depth < head.scalp - 1.0)] = FAT
    skull_top, skull_bottom = head.scalp, head.scalp + head.skull
    bone = (depth >= skull_top) & (depth < skull_bottom)
    hu[bone] = BONE_TABLE
    table = 1.8
    hu[(depth >= skull_top + table) & (depth < skull_bottom - table)] = BONE_DIPLOE
    intracranial_depth = depth - skull_bottom
    intracranial = intracranial_depth >= 0
    fold = np.sin(head.gyri * frame.theta + head.gyral_phase + 0.05 * frame.z)
    rim = 1.5
    cortex_end = rim + 3.0 + 1.5 * fold
    sulcus = (np.abs(fold) < 0.12) & (intracranial_depth < rim + 9.0)
    hu[intracranial] = WHITE
    hu[intracranial & (intracranial_depth < cortex_end)] = GREY
    csf_space = intracranial & ((intracranial_depth < rim) | sulcus)
    cisterns = intracranial & _cisterns(head, frame)
    left, other = _ventricles(head, frame)
    left, other = left & intracranial, other & intracranial
    hu[csf_space | cisterns | left | other] = CSF
    parenchyma = intracranial & ~(csf_space | cisterns | left | other)
    return hu, {
        "intracranial_depth": intracranial_depth,
        "intracranial": intracranial,
        "parenchyma": parenchyma,
        "subarachnoid": csf_space | cisterns,
        "ventricle_left": left,
        "ventricle_other": other,
    }


def _bleed_region(
    head: HeadGeometry, frame: _Frame, bleed: Bleed, parts: dict[str, np.ndarray]
) -> np.ndarray:
    if bleed.subtype == "intraparenchymal":
        return _ellipsoid(frame, bleed.centre, bleed.radii) & parts["parenchyma"]
    if bleed.subtype == "subarachnoid":
        return _ellipsoid(frame, bleed.centre, bleed.radii) & parts["subarachnoid"]
    if bleed.subtype == "intraventricular":
        level, side, _ = bleed.radii
        chosen = {0: parts["ventricle_left"], 1: parts["ventricle_other"]}.get(
            int(side), parts["ventricle_left"] | parts["ventricle_other"]
        )
        return chosen & (frame.v > level)
    depth = parts["intracranial_depth"]
    angular = np.angle(np.exp(1j * (frame.theta - bleed.angle)))
    if bleed.subtype == "subdural":
        half_width, thickness, half_height = bleed.radii[0] / 10.0, bleed.radii[1], bleed.radii[2]
        taper = np.clip(1.0 - (angular / half_width) ** 2, 0.0, None)
        taper *= max(0.0, 1.0 - ((frame.z - bleed.centre[2]) / half_height) ** 2)
        return parts["intracranial"] & (depth < thickness * np.sqrt(taper))
    if bleed.subtype == "epidural":
        radius, max_depth = bleed.radii[0], bleed.radii[1]
        a, b, _ = head.inner_semi_axes
        # Ball centred outside the inner table: its cap inside the skull is a lens.
        out = radius - max_depth
        scale = np.sqrt(max(1 - (bleed.centre[2] / head.inner_semi_axes[2]) ** 2, 0.05))
        edge = (a * scale * np.cos(bleed.angle), b * scale * np.sin(bleed.angle))
        norm = np.hypot(*edge)
        centre = (
            edge[0] * (1 + out / norm),
            edge[1] * (1 + out / norm),
            bleed.centre[2],
        )
        return _ellipsoid(frame, centre, (radius,) * 3) & parts["intracranial"]
    raise ValueError(f"unknown subtype {bleed.subtype!r}")


def _smooth(image: np.ndarray) -> np.ndarray:
    """3×3 binomial blur: the partial-volume softening of real reconstructions."""
    padded = np.pad(image, 1, mode="edge")
    rows = (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4
    return ((rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 4).astype(np.float32)


def render_slice(
    head: HeadGeometry,
    bleeds: list[Bleed],
    x: np.ndarray,
    y: np.ndarray,
    z: float,
    rng: np.random.Generator,
    *,
    noise_hu: float = 3.0,
    sharp: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32 H×W) and lesion mask (uint8 bits) of the axial slice at height `z`.

    `x`, `y` are the patient coordinates of each pixel. `sharp` renders a bone kernel:
    no partial-volume blur and `noise_hu` uncorrelated noise.
    """
    frame = _frame(head, x, y, z)
    hu, parts = _anatomy(head, frame)
    if not sharp:
        hu = _smooth(hu)
    mask = np.zeros(hu.shape, dtype=np.uint8)
    for bleed in bleeds:
        region = _bleed_region(head, frame, bleed, parts)
        if bleed.subtype == "intraparenchymal":
            edema = _ellipsoid(frame, bleed.centre, tuple(r * 1.4 for r in bleed.radii))
            hu[edema & parts["parenchyma"] & ~region & (mask == 0)] = EDEMA
        if np.count_nonzero(region) < MIN_BLEED_PIXELS:
            continue
        hu[region] = bleed.hu
        mask[region] |= SUBTYPE_BITS[bleed.subtype]
    noise = rng.normal(0.0, 1.0, hu.shape).astype(np.float32)
    if not sharp:
        noise = _smooth(noise) * np.float32(1 / 0.375)  # keep the std after the blur
    hu += noise * np.float32(noise_hu)
    return hu, mask


def lateral_projection(head: HeadGeometry, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """A scout-like lateral projection (arbitrary units) of the head over a (y, z) grid:
    the chord lengths through bone and soft tissue, with a neck below the skull."""
    a, b, c = head.semi_axes
    ai, bi, ci = head.inner_semi_axes
    yy = y - head.centre[1]

    def chord(sa: float, sb: float, sc: float) -> np.ndarray:
        return 2 * sa * np.sqrt(np.clip(1 - (yy / sb) ** 2 - (z / sc) ** 2, 0, None))

    outer, inner = chord(a, b, c), chord(ai, bi, ci)
    neck = np.where((z < -0.5 * c) & (np.abs(yy - 15) < 55), 2 * 0.8 * a, 0.0)
    soft = np.maximum(inner, neck)
    return (3.0 * (outer - inner) + 0.25 * soft).astype(np.float32)
