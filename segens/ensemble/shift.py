"""What a member's maps look like, per class, so that a recipe fitted on OOF maps can tell test maps that are not
like them: an OOF map comes from one fold model, a test map usually from the mean of k fold models, softer where
the folds disagree, and thresholds fitted on the one meet the other.

Two figures per member and class, from the stored values (p = v / 255):
- ``area``: the share of the images' pixels with p > 0.5;
- ``soft``: of the pixels with p >= 0.1, the share below 0.9 (the transition band: sharp maps have little of it).

``ens search-weights`` records them for the OOF stores in the recipe; ``ens combine --recipe`` measures the test
stores as it reads them and warns, naming member and classes, where they differ by more than ``AREA_RATIO`` (either
way) or ``SOFT_MARGIN``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segens.conventions.classes import CLASSES
from segens.store import LEVELS

ABOVE_HALF = int(np.argmax(LEVELS > np.float32(0.5)))  # 128: the first stored level with p > 0.5
SOFT_LOW = int(np.argmax(LEVELS >= np.float32(0.1)))  # 26
SOFT_HIGH = int(np.flatnonzero(LEVELS <= np.float32(0.9))[-1])  # 229
AREA_RATIO = 1.25
"""A test map's positive area may differ from OOF's by at most this factor (either way) before a warning."""
SOFT_MARGIN = 0.10
"""A test map's soft share may exceed (or fall below) OOF's by at most this before a warning."""
MIN_AREA = 1e-5
"""Classes whose OOF positive area is below this share of the pixels are not compared (too little to measure)."""


def region_counts(values: np.ndarray) -> tuple[int, int, int]:
    """(pixels with p > 0.5, pixels with 0.1 <= p <= 0.9, pixels with p >= 0.1) of uint8 values."""
    return (int(np.count_nonzero(values >= ABOVE_HALF)),
            int(np.count_nonzero((values >= SOFT_LOW) & (values <= SOFT_HIGH))),
            int(np.count_nonzero(values >= SOFT_LOW)))


def shape_of(counts: np.ndarray, pixels: int) -> list[list[float]]:
    """Per member, [area, soft] of summed (members, 3) counts over ``pixels`` image pixels."""
    counts = np.asarray(counts, np.float64)
    return [[float(positive / max(pixels, 1)), float(soft / above) if above else 0.0]
            for positive, soft, above in counts]


def differences(recorded: dict[str, Sequence[Sequence[float]]], observed: dict[str, Sequence[Sequence[float]]],
                ) -> dict[str, list[str]]:
    """Member -> the classes whose test maps (``observed``) are not like the OOF maps (``recorded``), as phrases;
    both map member -> per class [area, soft]."""
    found: dict[str, list[str]] = {}
    for member, classes in observed.items():
        if member not in recorded:
            continue
        for name, (area, soft), (oof_area, oof_soft) in zip(CLASSES, classes, recorded[member]):
            problems = []
            if oof_area >= MIN_AREA and not 1 / AREA_RATIO <= area / oof_area <= AREA_RATIO:
                problems.append(f"area {area / oof_area:.2f}x")
            if abs(soft - oof_soft) > SOFT_MARGIN:
                problems.append(f"soft share {oof_soft:.2f} -> {soft:.2f}")
            if problems:
                found.setdefault(member, []).append(f"{name} ({', '.join(problems)})")
    return found
