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
    "enhance_contrast",
    "add_metal_streaks",
    "BodyGeometry",
    "random_body",
    "render_body_slice",
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


def _height(rng: np.random.Generator, low: float, high: float) -> float:
    """A height in [low, high] where the subtype occurs; a short series that ends below
    that range gets its lower end (the draw is the same whenever the range exists)."""
    return rng.uniform(low, max(low, high))


def random_bleed(
    rng: np.random.Generator, head: HeadGeometry, subtype: str, z_range: tuple[float, float]
) -> Bleed:
    """A bleed of `subtype` placed where that subtype occurs, centred within `z_range`."""
    a, b, c = head.inner_semi_axes
    angle = rng.uniform(0, 2 * np.pi)
    hu = rng.uniform(*BLEED_HU_RANGE)
    if subtype == "intraparenchymal":
        z = _height(rng, max(z_range[0], -0.1 * c), min(z_range[1], 0.6 * c))
        reach = rng.uniform(0.15, 0.55) * np.sqrt(max(1 - (z / c) ** 2, 0.2))
        centre = (reach * a * np.cos(angle), reach * b * np.sin(angle), z)
        radii = (rng.uniform(7, 16), rng.uniform(7, 16), rng.uniform(6, 12))
    elif subtype == "epidural":
        z = _height(rng, max(z_range[0], 0.0), min(z_range[1], 0.6 * c))
        centre = (0.0, 0.0, z)
        radii = (rng.uniform(35, 55), rng.uniform(9, 16), 0.0)  # ball radius, max depth
    elif subtype == "subdural":
        z = _height(rng, max(z_range[0], 0.0), min(z_range[1], 0.55 * c))
        centre = (0.0, 0.0, z)
        # half-width in angle (as radians × 10), max thickness, half-height in z
        radii = (rng.uniform(5, 9), rng.uniform(5, 11), rng.uniform(22, 40))
    elif subtype == "subarachnoid":
        z = _height(rng, max(z_range[0], -0.3 * c), min(z_range[1], 0.6 * c))
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
    contrast_hu: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """HU (float32 H×W) and lesion mask (uint8 bits) of the axial slice at height `z`.

    `x`, `y` are the patient coordinates of each pixel. `sharp` renders a bone kernel:
    no partial-volume blur and `noise_hu` uncorrelated noise. `contrast_hu` > 0 renders
    the scan after IV contrast, vessels at that density (`enhance_contrast`).
    """
    frame = _frame(head, x, y, z)
    hu, parts = _anatomy(head, frame)
    if contrast_hu > 0:
        enhance_contrast(hu, head, frame, parts, contrast_hu)
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


# What IV contrast does to a head CT, in HU: arteries and venous sinuses at the bolus's
# density, the choroid plexus and grey matter a little brighter (blood-brain barrier intact).
CHOROID_PLEXUS_HU = 110.0
GREY_ENHANCEMENT_HU, WHITE_ENHANCEMENT_HU = 6.0, 3.0


def _vessels(head: HeadGeometry, frame: _Frame, parts: dict[str, np.ndarray]) -> np.ndarray:
    """Dural venous sinuses, the circle of Willis with its middle cerebral branches, and
    cortical veins in the sulci: where contrast makes a head CT bright."""
    a, b, c = head.inner_semi_axes
    depth, inside = parts["intracranial_depth"], parts["intracranial"]
    sagittal = (np.abs(frame.u) < 4.5) & (depth < 6.0) & (frame.z > -0.1 * c)
    transverse = (depth < 5.0) & (frame.v > 0.55 * b) & (np.abs(frame.z + 0.28 * c) < 0.06 * c)
    straight = _ellipsoid(frame, (0.0, 0.45 * b, 0.05 * c), (3.0, 14.0, 4.0))
    ring = np.hypot(frame.u, frame.v - 4.0)
    willis_level = np.abs(frame.z + 0.18 * c) < 3.0
    willis = willis_level & (np.abs(ring - 14.5) < 1.2)
    middle_cerebral = willis_level & (np.abs(frame.v + 2.0) < 1.5) & (np.abs(frame.u) > 14.0) \
        & (np.abs(frame.u) < 0.6 * a)
    veins = parts["subarachnoid"] & (np.sin(7 * frame.theta + 0.11 * frame.z) > 0.9)
    return inside & (sagittal | transverse | straight | willis | middle_cerebral | veins)


def enhance_contrast(hu: np.ndarray, head: HeadGeometry, frame: _Frame, parts: dict[str, np.ndarray],
                     vessel_hu: float) -> None:
    """The slice after IV contrast, in place: vessels at `vessel_hu`, glomus of the choroid
    plexus enhanced, grey and white matter a few HU brighter."""
    c = head.inner_semi_axes[2]
    k = head.ventricle_scale
    plexus = (_ellipsoid(frame, (9.0 * k, 14.0, 0.25 * c), (3.5, 6.0, 5.0))
              | _ellipsoid(frame, (-9.0 * k, 14.0, 0.25 * c), (3.5, 6.0, 5.0)))
    hu[parts["parenchyma"] & (hu == GREY)] += GREY_ENHANCEMENT_HU
    hu[parts["parenchyma"] & (hu == WHITE)] += WHITE_ENHANCEMENT_HU
    hu[plexus & parts["intracranial"]] = CHOROID_PLEXUS_HU
    hu[_vessels(head, frame, parts)] = vessel_hu


def add_metal_streaks(hu: np.ndarray, metal: list[tuple[float, float]], rng: np.random.Generator, *,
                      amplitude_hu: float, metal_hu: float = 3000.0, radius_px: float = 3.0,
                      streaks: int = 14) -> np.ndarray:
    """Metal at the pixel positions `metal` (row, column) with the streaks a CT
    reconstruction draws from it: alternating bright and dark bands through each object,
    fading with distance, and dark bands between pairs of objects (beam hardening)."""
    rows, cols = np.indices(hu.shape, dtype=np.float32)
    out = hu.astype(np.float32, copy=True)
    for centre in metal:
        dr, dc = rows - centre[0], cols - centre[1]
        distance = np.hypot(dr, dc)
        fade = np.float32(amplitude_hu) / (1.0 + distance / 60.0)
        for index, angle in enumerate(rng.uniform(0, np.pi, streaks)):
            across = np.abs(-np.sin(angle) * dc + np.cos(angle) * dr)
            sign = 1.0 if index % 2 == 0 else -1.0
            out += sign * fade * np.exp(-(across / rng.uniform(1.0, 2.5)) ** 2)
    for (r0, c0), (r1, c1) in zip(metal, metal[1:]):
        length = np.hypot(r1 - r0, c1 - c0) + 1e-6
        across = np.abs((c1 - c0) * (rows - r0) - (r1 - r0) * (cols - c0)) / length
        along = ((rows - r0) * (r1 - r0) + (cols - c0) * (c1 - c0)) / length**2
        out -= np.float32(0.8 * amplitude_hu) * np.exp(-(across / 4.0) ** 2) * ((along > 0) & (along < 1))
    for centre in metal:
        out[np.hypot(rows - centre[0], cols - centre[1]) <= radius_px] = metal_hu
    return out


@dataclass(frozen=True)
class BodyGeometry:
    """An abdomen: what a misrouted auto-forward rule sends instead of a head."""

    semi_axes: tuple[float, float]  # outer surface, mm: left-right, front-back
    fat: float  # subcutaneous fat, mm
    liver: tuple[float, float, float]  # centre x, y and radius, mm
    gas: tuple[tuple[float, float, float], ...]  # bowel gas pockets: x, y, radius


def random_body(rng: np.random.Generator) -> BodyGeometry:
    """An adult abdomen 280–340 mm wide, 200–250 mm deep."""
    a, b = rng.uniform(140, 170), rng.uniform(100, 125)
    gas = tuple((float(rng.uniform(-0.5, 0.5) * a), float(rng.uniform(-0.6, 0.1) * b), float(rng.uniform(6, 18)))
                for _ in range(int(rng.integers(3, 8))))
    return BodyGeometry((a, b), float(rng.uniform(12, 30)), (float(-0.35 * a), float(-0.1 * b), float(0.4 * b)), gas)


def render_body_slice(body: BodyGeometry, x: np.ndarray, y: np.ndarray, z: float, rng: np.random.Generator, *,
                      noise_hu: float = 8.0) -> np.ndarray:
    """HU (float32) of an axial abdominal slice: skin and fat, muscle, liver, spleen,
    kidneys, a vertebra with its canal, the aorta and bowel with gas."""
    a, b = body.semi_axes
    outer = (x / a) ** 2 + (y / b) ** 2
    wall = (x / (a - body.fat)) ** 2 + (y / (b - body.fat)) ** 2
    hu = np.full(x.shape, AIR, dtype=np.float32)
    hu[outer <= 1] = FAT
    hu[wall <= 1] = 45.0  # muscle and bowel wall
    cavity = (x / (a - body.fat - 12)) ** 2 + (y / (b - body.fat - 12)) ** 2 <= 1
    hu[cavity] = 30.0  # bowel contents and mesentery
    hu[cavity & (np.sin(x / 9.0) * np.sin(y / 7.0 + z / 11.0) > 0.6)] = -80.0  # mesenteric fat
    lx, ly, lr = body.liver
    hu[cavity & (np.hypot(x - lx, y - ly) < lr)] = 60.0
    hu[cavity & (np.hypot(x + 0.45 * a, y - 0.2 * b) < 0.25 * b)] = 50.0  # spleen (patient's left: +x)
    for side in (-1, 1):
        kidney = np.hypot((x - side * 0.3 * a) / 28.0, (y - 0.45 * b) / 45.0) < 1
        hu[kidney] = 35.0
    spine_y = 0.62 * b
    body_r = np.hypot(x, y - spine_y)
    hu[body_r < 22] = 250.0  # cancellous bone of the vertebral body
    hu[(body_r >= 19) & (body_r < 22)] = 800.0  # its cortex
    arch = np.hypot(x, y - spine_y - 30)
    hu[(arch < 16) & (arch >= 11)] = 700.0
    hu[arch < 11] = 15.0  # spinal canal
    hu[np.hypot(x - 12, y - spine_y + 32) < 11] = 45.0  # aorta
    for gx, gy, gr in body.gas:
        hu[cavity & (np.hypot(x - gx, y - gy) < gr)] = AIR
    hu = _smooth(hu)
    noise = _smooth(rng.normal(0.0, 1.0, hu.shape).astype(np.float32)) * np.float32(1 / 0.375)
    return hu + noise * np.float32(noise_hu)
