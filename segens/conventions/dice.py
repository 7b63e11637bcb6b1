"""The competition's Dice: per image and class ``(2|A∩B| + 1e-4) / (|A| + |B| + 1e-4)`` at the image's own
resolution, averaged over images per class, then over classes. The only Dice in segens (computed in float64
from exact pixel counts; the competition's float32 torch code agrees to about 1e-7).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from segens.conventions.classes import CLASSES

EPSILON = 1e-4


def dice_from_counts(intersection: np.ndarray, pred_sum: np.ndarray, true_sum: np.ndarray) -> np.ndarray:
    """Dice from pixel counts (any matching shapes), float64."""
    intersection = np.asarray(intersection, dtype=np.float64)
    return (2.0 * intersection + EPSILON) / (np.asarray(pred_sum, np.float64) + np.asarray(true_sum, np.float64) + EPSILON)


def mask_counts(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-channel (intersection, pred_sum, true_sum) int64 counts of two (C, H, W) masks of equal shape."""
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {truth.shape}")
    pred = pred.astype(bool, copy=False)
    truth = truth.astype(bool, copy=False)
    axes = tuple(range(1, pred.ndim))
    intersection = np.count_nonzero(pred & truth, axis=axes)
    return np.asarray(intersection, np.int64), np.asarray(np.count_nonzero(pred, axis=axes), np.int64), \
        np.asarray(np.count_nonzero(truth, axis=axes), np.int64)


def dice_per_class(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Dice of each channel of one image: (C, H, W) masks -> (C,) float64."""
    return dice_from_counts(*mask_counts(pred, truth))


@dataclass
class DiceTable:
    """Per image, per class Dice scores, aggregated as the competition does."""

    classes: tuple[str, ...] = CLASSES
    scores: dict[str, np.ndarray] = field(default_factory=dict)  # image key -> (C,) float64

    def add(self, image: str, per_class: np.ndarray) -> None:
        per_class = np.asarray(per_class, dtype=np.float64)
        if per_class.shape != (len(self.classes),):
            raise ValueError(f"{image}: expected {len(self.classes)} class scores, got shape {per_class.shape}")
        self.scores[image] = per_class

    def matrix(self) -> np.ndarray:
        """(images, classes) float64 in insertion order."""
        if not self.scores:
            return np.empty((0, len(self.classes)))
        return np.stack(list(self.scores.values()))

    def per_class(self) -> np.ndarray:
        """(C,) mean over images of each class's Dice."""
        if not self.scores:
            raise ValueError("no image was scored")
        return self.matrix().mean(axis=0)

    def mean(self) -> float:
        """The competition score: mean over classes of the per-class mean over images."""
        return float(self.per_class().mean())

    def as_dict(self) -> dict:
        """JSON-ready summary: per-class Dice, mean, image count."""
        return {"mean_dice": self.mean(), "images": len(self.scores),
                "per_class": dict(zip(self.classes, map(float, self.per_class())))}


