"""X-ray-like rendering of a placed :class:`~segens.synth.anatomy.Hand` into an 8-bit grayscale image.

Attenuation is summed along the beam: a blurred soft-tissue slab plus, per bone, the chord length through a
hollow cylinder fitted to the bone's own label polygon (dense cortex rim, lighter marrow), so overlapping bones
add up and bone edges sit exactly on the label outlines. Then a smooth exposure field, detector blur, quantum
plus electronic noise, a side marker, and a random window. Smooth fields are computed at low resolution.
"""

from __future__ import annotations

import cv2
import numpy as np

from segens.synth.anatomy import CARPALS, FOREARM, Hand

TISSUE_RES = 512  # working resolution of the soft-tissue and exposure fields
MU_TISSUE = 0.17  # per cm of soft tissue
# Per bone group: inner (marrow) radius as a fraction of the outer, cortex and marrow attenuation per cm.
_BONE_MATERIAL = {"long": (0.62, 1.0, 0.22), "carpal": (0.8, 0.85, 0.42), "forearm": (0.8, 0.75, 0.16)}


def render_radiograph(hand: Hand, rng: np.random.Generator) -> np.ndarray:
    """The radiograph of ``hand``: (size, size) uint8, dark background, bright bone; deterministic given ``rng``."""
    size = hand.size
    attenuation = MU_TISSUE * _tissue_thickness(hand, rng)
    attenuation += _bone_attenuation(hand) * _texture(size, rng)
    signal = (1.0 - np.exp(-attenuation)) * _exposure_field(size, rng)
    sigma = max(0.6, size / 1400)
    signal = cv2.GaussianBlur(signal, (0, 0), sigma)
    _add_marker(signal, hand, rng)
    signal += _noise(signal, rng)
    return _window(signal, rng)


def _tissue_thickness(hand: Hand, rng: np.random.Generator) -> np.ndarray:
    """Soft-tissue thickness (cm) of the hand and forearm silhouette: (size, size) float32, smooth."""
    low = min(hand.size, TISSUE_RES)
    canvas = np.zeros((low, low), np.uint8)
    for x0, y0, x1, y1, radius in hand.tissue_capsules:
        start, end = (int(round(x0 * low)), int(round(y0 * low))), (int(round(x1 * low)), int(round(y1 * low)))
        cv2.line(canvas, start, end, 255, thickness=max(1, int(round(2 * radius * low))), lineType=cv2.LINE_AA)
    for polygon in hand.tissue_polygons:
        cv2.fillPoly(canvas, [np.rint(polygon * low).astype(np.int32).reshape(-1, 1, 2)], 255, cv2.LINE_AA)
    mask = cv2.GaussianBlur(canvas, (0, 0), low / 250) > 127
    depth = cv2.distanceTransform(mask.astype(np.uint8), cv2.DIST_L2, 5) * (hand.size / low) / hand.px_per_cm
    depth = np.minimum(depth, 1.6)
    thickness = 2.0 * np.sqrt(depth * (3.2 - depth)) * rng.uniform(0.85, 1.15)
    thickness = cv2.GaussianBlur(thickness.astype(np.float32), (0, 0), low / 180)
    return cv2.resize(thickness, (hand.size, hand.size), interpolation=cv2.INTER_LINEAR)


def _bone_attenuation(hand: Hand) -> np.ndarray:
    """Summed bone attenuation (dimensionless): (size, size) float32, zero outside every bone."""
    total = np.zeros((hand.size, hand.size), np.float32)
    for name, points in hand.polygons.items():
        group = "forearm" if name in FOREARM else "carpal" if name in CARPALS else "long"
        _add_bone(total, points, hand.px_per_cm, *_BONE_MATERIAL[group])
    return total


def _add_bone(total: np.ndarray, points: np.ndarray, px_per_cm: float, inner: float, mu_cortex: float,
              mu_marrow: float) -> None:
    """Add one bone's attenuation in place: chord lengths through a hollow cylinder whose local radius is the
    largest distance-to-edge nearby (so shafts and heads each get their own)."""
    size = total.shape[0]
    x0, y0 = np.maximum(points.min(axis=0) - 2, 0)
    x1, y1 = np.minimum(points.max(axis=0) + 3, size)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillPoly(mask, [(points - (x0, y0)).reshape(-1, 1, 2)], 1)
    depth = cv2.distanceTransform(mask, cv2.DIST_L2, 5)
    reach = 2 * int(np.ceil(depth.max())) + 1
    radius = cv2.dilate(depth, cv2.getStructuringElement(cv2.MORPH_RECT, (reach, reach)))
    radius = cv2.blur(radius, (max(1, reach // 2),) * 2)
    radius = np.maximum(radius, depth) / px_per_cm
    depth = depth / px_per_cm
    offset2 = (radius - depth) ** 2  # squared distance from the local axis
    outer = np.sqrt(np.maximum(radius**2 - offset2, 0.0))
    marrow = np.sqrt(np.maximum((inner * radius) ** 2 - offset2, 0.0))
    total[y0:y1, x0:x1] += 2.0 * (mu_cortex * (outer - marrow) + mu_marrow * marrow) * mask


def _texture(size: int, rng: np.random.Generator) -> np.ndarray:
    """Trabecular-like multiplicative texture around 1: (size, size) float32, blobs a few pixels across."""
    low = max(8, size // 5)
    field = cv2.GaussianBlur(rng.standard_normal((low, low), dtype=np.float32), (0, 0), 0.8)
    field = cv2.resize(field, (size, size), interpolation=cv2.INTER_LINEAR)
    return 1.0 + 0.25 * field


def _exposure_field(size: int, rng: np.random.Generator) -> np.ndarray:
    """Uneven exposure: a smooth random gain (about 0.8 .. 1.2) with a heel-effect gradient, (size, size) float32."""
    coarse = cv2.resize(rng.normal(0.0, 1.0, (4, 4)).astype(np.float32), (64, 64), interpolation=cv2.INTER_CUBIC)
    ys, xs = np.mgrid[0:64, 0:64].astype(np.float32) / 63 - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    gain = 1.0 + 0.07 * coarse + rng.uniform(0.05, 0.2) * (np.cos(angle) * xs + np.sin(angle) * ys)
    return cv2.resize(gain.astype(np.float32), (size, size), interpolation=cv2.INTER_LINEAR)


def _add_marker(signal: np.ndarray, hand: Hand, rng: np.random.Generator) -> None:
    """Burn a lead side marker ("R"/"L" in a box) into a top corner away from the thumb, in place."""
    size = signal.shape[0]
    scale = size / 700
    text = hand.side
    (w, h), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, max(1, int(3 * scale)))
    right = (hand.side == "R") != (rng.random() < 0.2)
    x = int(size * rng.uniform(0.72, 0.9)) - w if right else int(size * rng.uniform(0.04, 0.14))
    y = int(size * rng.uniform(0.05, 0.12)) + h
    marker = np.zeros(signal.shape, np.uint8)
    pad = max(1, int(6 * scale))
    cv2.rectangle(marker, (x - pad, y - h - pad), (x + w + pad, y + pad), 90, -1)
    cv2.putText(marker, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, 230, max(1, int(3 * scale)), cv2.LINE_AA)
    np.maximum(signal, marker.astype(np.float32) / 255.0, out=signal)


def _noise(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Quantum (Poisson-like, grows with the signal) plus electronic (constant) noise: float32, signal's shape."""
    level = rng.uniform(0.6, 1.4)
    noise = rng.standard_normal(signal.shape, dtype=np.float32)
    return noise * (level * (0.008 + 0.025 * np.sqrt(np.maximum(signal, 0.0))))


def _window(signal: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Map the signal to uint8 through a random window and gamma, as a viewer's display settings would."""
    low, high = rng.uniform(-0.08, -0.02), rng.uniform(0.85, 1.0)
    scaled = np.clip((signal - low) / (high - low), 0.0, 1.0) ** rng.uniform(0.85, 1.2)
    return (scaled * 255.0 + 0.5).astype(np.uint8)
