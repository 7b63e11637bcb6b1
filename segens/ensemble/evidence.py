"""The exact, compact evaluator behind ``ens search-weights``: one class's OOF evidence and the Dice of any
candidate (weights and threshold, or hard-voting thresholds) on it.

Why it is exact and fast: a candidate is (member weights w on the simplex, threshold t from a fixed set T),
and a pixel is kept when s = sum_m w_m * v_m / 255 > t, computed in float32 exactly as ``ens combine`` does.
Since s lies between the smallest and the largest member value, a pixel whose members are all below the lowest
threshold of T is negative for every candidate, and one whose members are all above the highest is positive
for every candidate. Those pixels are counted once per image and class (with their ground truth); only the
others, the "ambiguous" pixels near object boundaries, are kept and re-scored per candidate. For every
candidate the per-image counts are therefore identical to a full-resolution evaluation, and so are the Dice
scores and the choice (tests/test_search.py compares against brute force).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numba
import numpy as np

from segens.dataset import ImageRecord
from segens.dice import dice_from_counts
from segens.ensemble.combine import union_box
from segens.labels import check_points_inside, parse_label_json, rasterize
from segens.members.store import ProbabilityStore

THRESHOLDS = (np.arange(255, dtype=np.float64) + 0.5) / 255  # midpoints between quantization levels; 0.5 is one
SAFETY = 0.01  # in quantization steps: keeps float32 rounding of s from crossing a fixed pixel's side


def threshold_grid(low: float = THRESHOLDS[0], high: float = THRESHOLDS[-1]) -> np.ndarray:
    """The swept thresholds as float32: the quantization midpoints within [low, high]."""
    chosen = THRESHOLDS[(THRESHOLDS >= low - 1e-12) & (THRESHOLDS <= high + 1e-12)]
    return chosen.astype(np.float32)


@dataclass
class ClassEvidence:
    """One class's OOF evidence: fixed pixels counted per image, ambiguous pixels kept with their truth."""

    channel: int
    values: np.ndarray  # (N, M) uint8: members' values at the ambiguous pixels
    truth: np.ndarray  # (N,) bool: ground truth at those pixels
    image: np.ndarray  # (N,) int32: which image each pixel belongs to
    fixed_positive: np.ndarray  # (images,) int64: pixels positive for every candidate
    fixed_true_positive: np.ndarray  # (images,) int64: of those, in the ground truth
    truth_total: np.ndarray  # (images,) int64: ground-truth pixels of the class in each image

    @property
    def images(self) -> int:
        return len(self.truth_total)


def class_truth(record: ImageRecord, channel: int, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool ground truth of one class of one image."""
    from segens.classes import CLASSES

    polygons = parse_label_json(record.label_path)
    check_points_inside(record.label_path, polygons, *size)
    name = CLASSES[channel]
    return rasterize({name: polygons[name]}, *size)[channel]


def extract_class(stores: Sequence[ProbabilityStore], records: Sequence[ImageRecord], channel: int,
                  thresholds: np.ndarray) -> ClassEvidence:
    """Read each image's class region from every store once and keep only the ambiguous pixels."""
    low = float(thresholds.min()) * 255 - SAFETY
    high = float(thresholds.max()) * 255 + SAFETY
    values, truths, images = [], [], []
    count = len(records)
    fixed_positive = np.zeros(count, np.int64)
    fixed_true_positive = np.zeros(count, np.int64)
    truth_total = np.zeros(count, np.int64)
    for index, record in enumerate(records):
        size = stores[0].image_size(record.key)
        truth = class_truth(record, channel, size)
        truth_total[index] = np.count_nonzero(truth)
        boxes = [store.boxes(record.key)[channel] for store in stores]
        box = union_box(boxes)
        if box is None:
            continue
        stack = np.stack([store.read_region(record.key, channel, box) for store in stores], axis=-1)
        region_truth = truth[box[0] : box[1], box[2] : box[3]]
        always = stack.min(axis=-1) > high
        never = stack.max(axis=-1) < low
        fixed_positive[index] = np.count_nonzero(always)
        fixed_true_positive[index] = np.count_nonzero(always & region_truth)
        ambiguous = ~(always | never)
        values.append(stack[ambiguous])
        truths.append(region_truth[ambiguous])
        images.append(np.full(int(ambiguous.sum()), index, np.int32))
    members = len(stores)
    return ClassEvidence(
        channel,
        np.concatenate(values) if values else np.zeros((0, members), np.uint8),
        np.concatenate(truths) if truths else np.zeros(0, bool),
        np.concatenate(images) if images else np.zeros(0, np.int32),
        fixed_positive, fixed_true_positive, truth_total,
    )


@numba.njit(cache=True, nogil=True)
def _weighted_histograms(values, truth, image, weights, thresholds, images):  # pragma: no cover - compiled
    """Per image, how many ambiguous pixels (and truth pixels) have exactly j thresholds below their s."""
    levels = thresholds.size
    positives = np.zeros((images, levels + 1), np.int64)
    true_positives = np.zeros((images, levels + 1), np.int64)
    scale = np.float32(255)
    for pixel in range(values.shape[0]):
        total = np.float32(0)
        for member in range(values.shape[1]):
            total = total + weights[member] * (np.float32(values[pixel, member]) / scale)
        low, high = 0, levels  # first index whose threshold is >= total
        while low < high:
            middle = (low + high) // 2
            if thresholds[middle] < total:
                low = middle + 1
            else:
                high = middle
        positives[image[pixel], low] += 1
        if truth[pixel]:
            true_positives[image[pixel], low] += 1
    return positives, true_positives


def _above(histogram: np.ndarray) -> np.ndarray:
    """(images, K + 1) counts by 'thresholds below' -> (images, K) counts of pixels with s > threshold k."""
    tail = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]
    return tail[:, 1:]


def weighted_dice(evidence: ClassEvidence, weights: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(images, K) Dice of every threshold for float32 ``weights`` (as combine uses them), exactly."""
    positives, true_positives = _weighted_histograms(evidence.values, evidence.truth, evidence.image,
                                                     weights.astype(np.float32), thresholds, evidence.images)
    return _dice_of(evidence, positives, true_positives)




@numba.njit(cache=True, nogil=True)
def _hard_histograms(values, truth, image, member_thresholds, swept, thresholds, min_votes, images):  # pragma: no cover
    """Hard voting with member ``swept``'s threshold swept over ``thresholds`` and the others fixed: per image,
    pixels (and truth pixels) kept for exactly the first j thresholds, as histograms over j."""
    levels = thresholds.size
    positives = np.zeros((images, levels + 1), np.int64)
    true_positives = np.zeros((images, levels + 1), np.int64)
    scale = np.float32(255)
    for pixel in range(values.shape[0]):
        others = 0
        for member in range(values.shape[1]):
            if member != swept and np.float32(values[pixel, member]) / scale > member_thresholds[member]:
                others += 1
        if others >= min_votes:
            kept_for = levels
        elif others == min_votes - 1:
            p = np.float32(values[pixel, swept]) / scale
            kept_for = 0  # the swept member votes for threshold k exactly when thresholds[k] < p
            while kept_for < levels and thresholds[kept_for] < p:
                kept_for += 1
        else:
            kept_for = 0
        positives[image[pixel], kept_for] += 1
        if truth[pixel]:
            true_positives[image[pixel], kept_for] += 1
    return positives, true_positives


def hard_dice(evidence: ClassEvidence, member_thresholds: np.ndarray, swept: int, min_votes: int,
              thresholds: np.ndarray) -> np.ndarray:
    """(images, K) Dice of hard voting (unit votes, keep votes >= min_votes) for each threshold of member
    ``swept``, the other members at ``member_thresholds``."""
    positives, true_positives = _hard_histograms(evidence.values, evidence.truth, evidence.image,
                                                 member_thresholds.astype(np.float32), swept, thresholds,
                                                 min_votes, evidence.images)
    return _dice_of(evidence, positives, true_positives)


def _dice_of(evidence: ClassEvidence, positives: np.ndarray, true_positives: np.ndarray) -> np.ndarray:
    predicted = _above(positives) + evidence.fixed_positive[:, None]
    intersection = _above(true_positives) + evidence.fixed_true_positive[:, None]
    return dice_from_counts(intersection, predicted, evidence.truth_total[:, None])
