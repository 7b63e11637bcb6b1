"""Hand-bone geometry for synthetic radiographs: the 29 bones as smooth polygons, plus a soft-tissue outline.

Bones are laid out in a canonical right hand (PA view, thumb on the image left) in centimetres, ``x`` towards the
little finger and ``y`` towards the fingertips, origin at the middle of the radiocarpal joint. A :class:`HandPose`
(mirroring, scale, rotation, finger spread and lengths, ...) places that hand in normalised image coordinates
(``[0, 1]``, ``y`` down), so the same pose gives the same hand at any resolution.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike

from segens.conventions.classes import CLASSES

FOREARM = ("Radius", "Ulna")
CARPALS = ("Trapezium", "Trapezoid", "Capitate", "Hamate", "Scaphoid", "Lunate", "Triquetrum", "Pisiform")
DENSE_POINTS = 240  # outline samples before clipping and arc-length resampling

# Per digit, thumb first: finger-N class numbers from distal to metacarpal (the real data's convention; the thumb
# has no middle phalanx).
DIGIT_CLASSES: tuple[tuple[str, ...], ...] = (
    ("finger-1", "finger-2", "finger-3"),
    *(tuple(f"finger-{4 * d + k}" for k in range(4)) for d in range(1, 5)),
)

# Metacarpal base (cm), axis angle (degrees from +y towards +x), length, width; then phalanges proximal -> distal
# as (length, width). Index .. little fingers, thumb first.
_METACARPALS = (
    ((-2.70, 3.35), -36.0, 4.4, 1.35),
    ((-1.30, 3.60), -8.0, 6.6, 1.15),
    ((-0.10, 3.75), -1.0, 6.3, 1.15),
    ((1.00, 3.55), 7.0, 5.6, 1.02),
    ((1.95, 3.25), 15.0, 5.1, 1.0),
)
_PHALANGES = (
    ((3.1, 1.05), (2.4, 0.92)),
    ((4.0, 0.98), (2.4, 0.86), (1.75, 0.74)),
    ((4.5, 1.02), (2.8, 0.88), (1.9, 0.76)),
    ((4.2, 0.96), (2.7, 0.84), (1.85, 0.72)),
    ((3.4, 0.86), (2.0, 0.76), (1.65, 0.66)),
)
# Extra angle of the phalanges relative to their metacarpal at spread 1 (degrees): fingers fan out.
_SPREAD_ANGLE = (14.0, -5.0, 0.0, 5.0, 11.0)
_JOINT_GAP = 0.22  # cm between neighbouring phalanges

# Carpal bones: centre (cm), length along the axis, width, axis angle (degrees), superellipse exponent, bend,
# third-harmonic amplitude (triangularity). Neighbours overlap as in a PA radiograph.
_CARPAL_SHAPES: dict[str, tuple[tuple[float, float], float, float, float, float, float, float]] = {
    "Scaphoid": ((-1.5, 0.9), 2.5, 1.25, -47.0, 2.1, 0.16, 0.0),
    "Lunate": ((0.25, 0.85), 1.55, 1.7, 5.0, 2.3, -0.15, 0.0),
    "Triquetrum": ((1.55, 1.3), 1.6, 1.3, 40.0, 2.2, 0.0, 0.04),
    "Pisiform": ((1.85, 1.05), 1.15, 1.0, 20.0, 2.0, 0.0, 0.0),
    "Trapezium": ((-2.35, 2.55), 1.75, 1.55, -35.0, 2.3, 0.0, 0.05),
    "Trapezoid": ((-1.35, 2.85), 1.35, 1.25, -12.0, 2.4, 0.0, 0.03),
    "Capitate": ((-0.15, 2.6), 2.45, 1.5, -2.0, 2.4, 0.0, 0.0),
    "Hamate": ((1.0, 2.3), 2.2, 1.6, 14.0, 2.2, 0.0, 0.09),
}


@dataclass(frozen=True)
class HandPose:
    """Everything that varies between hands; a pose plus a size gives the polygons exactly."""

    side: str  # "R" (thumb on the image left) or "L" (mirrored)
    scale: float  # normalised image units per cm, before shrinking to fit
    rotation: float  # degrees, rotation of the whole hand about the wrist
    pivot: tuple[float, float]  # where the wrist centre lands, normalised (x, y)
    spread: float  # finger fanning, 1 = typical
    finger_lengths: tuple[float, ...]  # per digit (5), multiplies phalanx and metacarpal lengths
    joint_bends: tuple[float, ...]  # per digit and joint (5 x 3, flattened), degrees
    carpal_jitter: tuple[float, ...]  # per carpal bone (8 x 2, flattened), cm
    shape_seed: int  # seeds each bone's outline irregularity


@dataclass
class Hand:
    """A placed hand: integer pixel polygons per class and soft-tissue primitives in normalised coordinates."""

    size: int
    side: str
    px_per_cm: float
    polygons: dict[str, np.ndarray]  # class -> (N, 2) int32 (x, y) in [0, size - 1], CLASSES order
    tissue_capsules: list[tuple[float, float, float, float, float]] = field(default_factory=list)  # x0,y0,x1,y1,r
    tissue_polygons: list[np.ndarray] = field(default_factory=list)  # (M, 2) float normalised


@dataclass(frozen=True)
class _Bone:
    """One bone in canonical cm coordinates before placement: a dense closed outline and its point budget."""

    name: str
    outline: np.ndarray  # (DENSE_POINTS or more, 2) float, cm
    n_points: int


def sample_pose(rng: np.random.Generator, side: str, base: dict[str, float] | None = None) -> HandPose:
    """Draw a hand pose; ``base`` (from :func:`sample_patient_traits`) makes both hands of a patient alike."""
    base = base or sample_patient_traits(rng)
    rotation = base["rotation"] + rng.normal(0.0, 3.0)
    pivot_x = 0.5 + rng.uniform(-0.05, 0.05) - 0.28 * np.sin(np.radians(rotation))
    return HandPose(
        side=side,
        scale=base["scale"] * rng.uniform(0.98, 1.02),
        rotation=float(rotation),
        pivot=(float(pivot_x), float(rng.uniform(0.76, 0.84))),
        spread=float(np.clip(base["spread"] + rng.normal(0.0, 0.15), 0.2, 2.2)),
        finger_lengths=tuple(float(base["length"] * rng.uniform(0.97, 1.03)) for _ in range(5)),
        joint_bends=tuple(float(v) for v in rng.normal(0.0, 3.0, 15)),
        carpal_jitter=tuple(float(v) for v in rng.normal(0.0, 0.06, 16)),
        shape_seed=int(rng.integers(0, 2**31 - 1)),
    )


def sample_patient_traits(rng: np.random.Generator, height_cm: float = 168.0) -> dict[str, float]:
    """Traits shared by a patient's two hands: scale (from body height), spread, length, wrist rotation."""
    strong = rng.random() < 0.15
    rotation = rng.choice([-1.0, 1.0]) * rng.uniform(30.0, 45.0) if strong else np.clip(rng.normal(0, 7), -15, 15)
    return {
        "scale": 0.041 * (height_cm / 168.0) ** 0.5 * rng.uniform(0.9, 1.08),
        "spread": rng.uniform(0.4, 1.7),
        "length": rng.uniform(0.93, 1.07),
        "rotation": float(rotation),
    }


def build_hand(pose: HandPose, size: int) -> Hand:
    """Place the canonical hand with ``pose`` in a ``size`` x ``size`` image; every point lands inside it."""
    bones, capsules, tissue_polys = _canonical_hand(pose)
    to_image = _placement(pose, [b.outline for b in bones if b.name not in FOREARM])
    polygons: dict[str, np.ndarray] = {}
    for bone in bones:
        pixels = _clip_to_box(to_image(bone.outline) * size, 0.0, size - 1.0)
        polygons[bone.name] = _round_inside(resample_closed(pixels, bone.n_points), size)
    scale = float(np.linalg.norm(to_image([[1.0, 0.0]]) - to_image([[0.0, 0.0]])))  # normalised units per cm
    placed_capsules = []
    for start, end, radius in capsules:
        (x0, y0), (x1, y1) = to_image([start, end])
        placed_capsules.append((float(x0), float(y0), float(x1), float(y1), radius * scale))
    return Hand(
        size=size,
        side=pose.side,
        px_per_cm=scale * size,
        polygons={name: polygons[name] for name in CLASSES},
        tissue_capsules=placed_capsules,
        tissue_polygons=[to_image(poly) for poly in tissue_polys],
    )


def _placement(pose: HandPose, fit_outlines: list[np.ndarray],
               margin: float = 0.035) -> Callable[[ArrayLike], np.ndarray]:
    """The cm -> normalised map of ``pose``, its scale shrunk so ``fit_outlines`` stay ``margin`` inside."""
    angle = np.radians(pose.rotation)
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    mirror = np.array([-1.0 if pose.side == "L" else 1.0, -1.0])  # image y points down
    pivot = np.asarray(pose.pivot)

    def direction(points: np.ndarray) -> np.ndarray:
        return (points * mirror) @ rot.T

    q = direction(np.concatenate(fit_outlines))
    limits = [pose.scale]
    for axis in range(2):
        hi, lo = q[:, axis] > 1e-9, q[:, axis] < -1e-9
        limits += list((1.0 - margin - pivot[axis]) / q[hi, axis]) + list((margin - pivot[axis]) / q[lo, axis])
    scale = max(min(limits), 1e-4)
    return lambda points: pivot + scale * direction(np.asarray(points, dtype=np.float64))


Capsule = tuple[np.ndarray, np.ndarray, float]  # soft tissue around a segment: start, end (cm), radius (cm)


def _canonical_hand(pose: HandPose) -> tuple[list[_Bone], list[Capsule], list[np.ndarray]]:
    """All 29 bones in canonical cm coordinates, plus soft-tissue capsules ((a, b, radius) in cm) and polygons."""
    rng = np.random.default_rng(pose.shape_seed)
    bones = [_Bone("Radius", _radius_outline(rng), 64), _Bone("Ulna", _ulna_outline(rng), 56)]
    jitter = dict(zip(CARPALS, np.reshape(pose.carpal_jitter, (8, 2))))
    for name, (centre, length, width, angle, power, bend, tri) in _CARPAL_SHAPES.items():
        local = _round_outline(length, width, power, bend, tri, rng)
        bones.append(_Bone(name, _to_world(local, np.add(centre, jitter[name]), angle), 44))
    capsules: list[Capsule] = []
    joints = []
    for digit in range(5):
        digit_bones, digit_capsules, ends = _digit(pose, digit, rng)
        bones += digit_bones
        capsules += digit_capsules
        joints.append(ends)
    return bones, capsules, _tissue_polygons(joints)


def _digit(pose: HandPose, digit: int,
           rng: np.random.Generator) -> tuple[list[_Bone], list[Capsule], tuple[np.ndarray, np.ndarray]]:
    """One digit's metacarpal and phalanges (cm), soft-tissue capsules around the phalanges, (base, head) of the
    metacarpal."""
    (bx, by), mc_angle, mc_length, mc_width = _METACARPALS[digit]
    grow = pose.finger_lengths[digit]
    names = DIGIT_CLASSES[digit][::-1]  # metacarpal first, distal last
    base = np.array([bx, by])
    angle = mc_angle
    segments = [(mc_length * grow, mc_width)] + [(length * grow, width) for length, width in _PHALANGES[digit]]
    bends = pose.joint_bends[3 * digit: 3 * digit + 3]
    bones: list[_Bone] = []
    capsules: list[Capsule] = []
    for index, (name, (length, width)) in enumerate(zip(names, segments)):
        if index == 1:
            angle += _SPREAD_ANGLE[digit] * pose.spread
        if index >= 1:
            angle += bends[index - 1]
        direction = np.array([np.sin(np.radians(angle)), np.cos(np.radians(angle))])
        kind = ("metacarpal", "proximal", "middle", "distal")[index if digit else (0, 1, 3)[index]]
        local = _long_outline(length, width, kind, rng)
        n_points = 36 if kind == "distal" else 48
        bones.append(_Bone(name, _to_world(local, base + direction * length / 2, angle), n_points))
        end = base + direction * length
        if index == 0:
            mc_ends = (base.copy(), end)
        else:
            reach = 0.45 if kind == "distal" else 0.2
            capsules.append((base - direction * 0.3, end + direction * reach, 0.75 * width + 0.3))
        base = end + direction * _JOINT_GAP
    return bones, capsules, mc_ends


def _tissue_polygons(joints: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
    """Palm (metacarpal bases and heads, widened) and forearm (down past the image) silhouettes in cm."""
    heads = np.array([head for _, head in joints[1:]])
    palm = np.array([
        [-3.3, -0.5], joints[0][0] + [-0.8, 0.3], joints[0][1] + [-0.4, -0.6], heads[0] + [-0.75, 0.3],
        *(heads + [0.0, 0.55]), heads[-1] + [0.8, 0.2], joints[4][0] + [1.1, -0.2], [3.2, 0.0],
    ])
    forearm = np.array([[-3.4, 0.5], [3.1, 0.5], [3.0, -30.0], [-3.3, -30.0]])
    return [palm, forearm]


def _long_outline(length: float, width: float, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A tubular bone (proximal end at -length/2 on the local v axis): waisted shaft, rounded ends, (n, 2) (u, v)."""
    waist, taper, power = {
        "metacarpal": (0.36, 0.05, 2.6),
        "proximal": (0.30, -0.12, 2.8),
        "middle": (0.24, -0.12, 2.8),
        "distal": (0.18, -0.35, 2.4),
    }[kind]
    theta = np.linspace(0.0, 2 * np.pi, DENSE_POINTS, endpoint=False)
    u, v = _superellipse(theta, width / 2, length / 2, power)
    t = 2 * v / length
    u = u * (1 - waist * (1 - t**2) ** 2) * (1 + taper * t)
    if kind == "distal":  # the tuft widens again at the tip
        u = u * (1 + 0.28 * np.clip(t - 0.55, 0, None) / 0.45)
    wobble = _wobble(theta, rng, 0.012)
    return np.stack([u * wobble, v * wobble], axis=1)


def _round_outline(length: float, width: float, power: float, bend: float, tri: float,
                   rng: np.random.Generator) -> np.ndarray:
    """A carpal bone: a rounded superellipse, bent into a bean by ``bend``, made triangular by ``tri``."""
    theta = np.linspace(0.0, 2 * np.pi, DENSE_POINTS, endpoint=False)
    u, v = _superellipse(theta, width / 2, length / 2, power)
    v = v + bend * length * ((2 * u / width) ** 2 - 0.5)
    wobble = _wobble(theta, rng, 0.03) * (1 + tri * np.cos(3 * theta + rng.uniform(-0.3, 0.3)))
    return np.stack([u * wobble, v * wobble], axis=1)


def _radius_outline(rng: np.random.Generator) -> np.ndarray:
    """Distal radius (cm, canonical): a shaft from far below flaring into a sloped articular end and styloid."""
    ys = np.linspace(-30.0, -0.5, 60)
    flare = _smoothstep((ys + 4.0) / 3.6)
    centre = -0.55 - 0.35 * flare
    half = 0.85 + 0.8 * flare
    ulnar_top, styloid = (centre[-1] + half[-1], -0.45), (centre[-1] - half[-1] - 0.05, 0.75)
    xs = np.linspace(ulnar_top[0], styloid[0], 40)
    s = (ulnar_top[0] - xs) / (ulnar_top[0] - styloid[0])
    top = ulnar_top[1] + (styloid[1] - ulnar_top[1]) * s**1.7 + 0.12 * np.sin(np.pi * s) * rng.uniform(0.8, 1.2)
    outline = np.concatenate([
        np.stack([centre + half, ys], 1),
        np.stack([xs, top], 1),
        np.stack([(centre - half)[::-1], ys[::-1]], 1),
    ])
    return _smooth_closed(outline, 0.35)


def _ulna_outline(rng: np.random.Generator) -> np.ndarray:
    """Distal ulna (cm, canonical): a narrow shaft ending in a rounded head with a styloid on the ulnar side."""
    ys = np.linspace(-30.0, -1.2, 50)
    flare = _smoothstep((ys + 3.5) / 2.5)
    centre = 1.62 - 0.1 * flare
    half = 0.55 + 0.23 * flare
    theta = np.linspace(0.0, np.pi, 40)
    head_r = half[-1]
    head = np.stack([centre[-1] + head_r * np.cos(theta), ys[-1] + 0.85 * head_r * np.sin(theta)], 1)
    styloid_bump = np.exp(-(((theta - 0.45) / 0.22) ** 2)) * rng.uniform(0.25, 0.4)
    head[:, 1] += styloid_bump
    outline = np.concatenate([
        np.stack([centre + half, ys], 1),
        head[1:-1],
        np.stack([(centre - half)[::-1], ys[::-1]], 1),
    ])
    return _smooth_closed(outline, 0.25)


def _superellipse(theta: np.ndarray, a: float, b: float, power: float) -> tuple[np.ndarray, np.ndarray]:
    """Points of |u/a|^p + |v/b|^p = 1 at parameter ``theta``."""
    c, s = np.cos(theta), np.sin(theta)
    return a * np.sign(c) * np.abs(c) ** (2 / power), b * np.sign(s) * np.abs(s) ** (2 / power)


def _wobble(theta: np.ndarray, rng: np.random.Generator, amplitude: float) -> np.ndarray:
    """A smooth radial factor around 1: harmonics 2..5 with random phases, for per-bone irregularity."""
    factor = np.ones_like(theta)
    for k in range(2, 6):
        factor += rng.normal(0.0, amplitude / (k - 1) ** 0.5) * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    return factor


def _to_world(local: np.ndarray, centre, angle_deg: float) -> np.ndarray:
    """Local (u across, v along the axis) -> canonical cm, axis at ``angle_deg`` from +y towards +x."""
    a = np.radians(angle_deg)
    axis, across = np.array([np.sin(a), np.cos(a)]), np.array([np.cos(a), -np.sin(a)])
    return np.asarray(centre) + local[:, :1] * across + local[:, 1:] * axis


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3 - 2 * x)


def _smooth_closed(outline: np.ndarray, radius_cm: float, step_cm: float = 0.05) -> np.ndarray:
    """Round a closed outline's corners: resample every ``step_cm``, then a circular moving average."""
    perimeter = np.sum(np.linalg.norm(np.diff(outline, axis=0, append=outline[:1]), axis=1))
    dense = resample_closed(outline, int(perimeter / step_cm))
    width = max(1, int(radius_cm / step_cm))
    kernel = np.ones(2 * width + 1) / (2 * width + 1)
    padded = np.concatenate([dense[-width:], dense, dense[:width]])
    return np.stack([np.convolve(padded[:, i], kernel, mode="valid") for i in range(2)], axis=1)


def resample_closed(polygon: np.ndarray, n: int) -> np.ndarray:
    """``n`` points evenly spaced by arc length along a closed polygon ((M, 2) float -> (n, 2) float)."""
    closed = np.concatenate([polygon, polygon[:1]])
    lengths = np.linalg.norm(np.diff(closed, axis=0), axis=1)
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    if cumulative[-1] <= 0:
        return np.repeat(polygon[:1], n, axis=0)
    targets = np.linspace(0.0, cumulative[-1], n, endpoint=False)
    return np.stack([np.interp(targets, cumulative, closed[:, i]) for i in range(2)], axis=1)


def _clip_to_box(polygon: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Sutherland-Hodgman clip of a closed polygon to the square [lo, hi]^2."""
    points = polygon
    for axis in range(2):
        for bound, keep in ((lo, np.greater_equal), (hi, np.less_equal)):
            if len(points) == 0:
                return points
            inside = keep(points[:, axis], bound)
            if inside.all():
                continue
            out = []
            previous, previous_in = points[-1], inside[-1]
            for point, point_in in zip(points, inside):
                if point_in != previous_in:
                    t = (bound - previous[axis]) / (point[axis] - previous[axis])
                    out.append(previous + t * (point - previous))
                if point_in:
                    out.append(point)
                previous, previous_in = point, point_in
            points = np.array(out)
    return points


def _round_inside(points: np.ndarray, size: int) -> np.ndarray:
    """Round to integer pixels, clamped to [0, size - 1]: (n, 2) int32."""
    return np.clip(np.rint(points), 0, size - 1).astype(np.int32)
