"""Exact Dice of a voting rule on one class's OOF evidence, for every swept threshold at once (numba).

A candidate costs one pass over the class's distinct ambiguous rows: member by member its float32 sum (weighted)
or its votes (hard), then one histogram per image over the thresholds (found by a table lookup and one comparison);
the fixed pixels are added from the evidence's per-image counts. The result equals a full-resolution evaluation of
``ens combine``'s masks to the last bit (tests/test_search.py compares against brute force).
"""

from __future__ import annotations

import numba
import numpy as np

from segens.conventions.dice import dice_from_counts
from segens.search.evidence import ClassEvidence
from segens.store import LEVELS

BUCKETS = 4096  # of s in [0, 1], for finding a pixel's place among the thresholds without a binary search


@numba.njit(cache=True, nogil=True)
def _weighted_histograms(values, truth, count, starts, products, thresholds, lookup):  # pragma: no cover
    """Per image, how many ambiguous pixels (and truth pixels) have exactly j thresholds below their s, where
    s = sum over members, in order, of products[m, v] (float32 weight x v / 255, as combine computes it).
    ``thresholds`` ends with one +inf; ``lookup[b]`` counts the thresholds below b / (lookup.size - 1), whose
    buckets are narrower than the gaps between thresholds, so one comparison finds a pixel's place."""
    levels = thresholds.size - 1
    images = starts.size - 1
    total = np.zeros(values.shape[1], np.float32)
    for member in range(values.shape[0]):  # member by member: the inner loop vectorises
        product, value = products[member], values[member]
        for pixel in range(total.size):
            total[pixel] = total[pixel] + product[value[pixel]]
    positives = np.zeros((images, levels + 1), np.int64)
    true_positives = np.zeros((images, levels + 1), np.int64)
    scale = np.float32(lookup.size - 1)
    for index in range(images):
        for pixel in range(starts[index], starts[index + 1]):
            s = total[pixel]
            below = lookup[min(max(int(s * scale) - 1, 0), lookup.size - 1)]  # every threshold it counts is below s
            below += thresholds[below] < s  # at most one more does
            positives[index, below] += count[pixel]
            true_positives[index, below] += count[pixel] * truth[pixel]
    return positives, true_positives


def _above(histogram: np.ndarray) -> np.ndarray:
    """(images, K + 1) counts by 'thresholds below' -> (images, K) counts of pixels with s > threshold k."""
    tail = np.cumsum(histogram[:, ::-1], axis=1)[:, ::-1]
    return tail[:, 1:]


def weighted_dice(evidence: ClassEvidence, weights: np.ndarray, thresholds: np.ndarray,
                  tables: np.ndarray | None = None) -> np.ndarray:
    """(images, K) Dice of every threshold for float32 ``weights`` (as combine uses them), exactly; with
    ``tables`` ((M, 256) uint8, segens.voting.calibration) on the members' calibrated levels. The evidence's
    always-positive pixels (every member at 255) are then kept only where their calibrated sum beats the
    threshold (the evidence must have been extracted with the full threshold grid)."""
    if tables is not None and thresholds.max() < np.float32(254 / 255):  # else 'always positive' is not all 255
        raise ValueError("calibrated scores need the evidence of the full threshold grid")
    levels = LEVELS[None, :] if tables is None else LEVELS[tables]
    products = weights.astype(np.float32)[:, None] * levels  # float32, as combine multiplies
    if np.any(np.diff(thresholds.astype(np.float64)) <= 2 / BUCKETS):
        raise ValueError("thresholds must be sorted and further apart than 2 / BUCKETS")
    lookup = np.searchsorted(thresholds.astype(np.float64), np.arange(BUCKETS + 1) / BUCKETS, side="left")
    padded = np.concatenate([thresholds.astype(np.float32), [np.float32(np.inf)]])
    positives, true_positives = _weighted_histograms(evidence.values, evidence.truth.view(np.uint8), evidence.count,
                                                     evidence.row_starts, products, padded, lookup.astype(np.int64))
    saturated = None
    if tables is not None:
        total = np.float32(0)
        for member in range(products.shape[0]):  # member by member, as combine sums
            total = np.float32(total + products[member, 255])
        saturated = total > thresholds.astype(np.float32)
    return _dice_of(evidence, positives, true_positives, saturated)


@numba.njit(cache=True, nogil=True)
def _hard_histograms(values, truth, count, starts, votes_of, swept, below_of, levels, min_votes):  # pragma: no cover
    """Hard voting with member ``swept``'s threshold swept and the others fixed: per image, pixels (and truth
    pixels) kept for exactly the first j thresholds, as histograms over j. votes_of[m, v]: member m votes for
    value v at its threshold; below_of[v]: how many swept thresholds lie below v / 255."""
    images = starts.size - 1
    others = np.zeros(values.shape[1], np.uint8)
    for member in range(values.shape[0]):  # member by member: the inner loop vectorises
        if member != swept:
            vote, value = votes_of[member], values[member]
            for pixel in range(others.size):
                others[pixel] += vote[value[pixel]]
    swept_values = values[swept]
    positives = np.zeros((images, levels + 1), np.int64)
    true_positives = np.zeros((images, levels + 1), np.int64)
    for index in range(images):
        for pixel in range(starts[index], starts[index + 1]):
            if others[pixel] >= min_votes:
                kept_for = levels
            elif others[pixel] == min_votes - 1:
                kept_for = below_of[swept_values[pixel]]  # the swept member votes at threshold k iff k < this
            else:
                kept_for = 0
            positives[index, kept_for] += count[pixel]
            true_positives[index, kept_for] += count[pixel] * truth[pixel]
    return positives, true_positives


def hard_dice(evidence: ClassEvidence, member_thresholds: np.ndarray, swept: int, min_votes: int,
              thresholds: np.ndarray) -> np.ndarray:
    """(images, K) Dice of hard voting (unit votes, keep votes >= min_votes) for each threshold of member
    ``swept``, the other members at ``member_thresholds``."""
    votes_of = (LEVELS[None, :] > member_thresholds.astype(np.float32)[:, None]).view(np.uint8)
    below_of = np.searchsorted(thresholds, LEVELS, side="left").astype(np.int64)  # thresholds < p
    positives, true_positives = _hard_histograms(evidence.values, evidence.truth.view(np.uint8), evidence.count,
                                                 evidence.row_starts, votes_of,
                                                 swept, below_of, thresholds.size, min_votes)
    return _dice_of(evidence, positives, true_positives)


def _dice_of(evidence: ClassEvidence, positives: np.ndarray, true_positives: np.ndarray,
             saturated: np.ndarray | None = None) -> np.ndarray:
    """Dice from the ambiguous rows' histograms and the fixed pixels (``saturated`` (K,) bool: whether the
    always-positive pixels are kept at each threshold; None: at every one)."""
    kept = np.ones(positives.shape[1] - 1, np.int64) if saturated is None else saturated.astype(np.int64)
    predicted = _above(positives) + evidence.fixed_positive[:, None] * kept[None, :]
    intersection = _above(true_positives) + evidence.fixed_true_positive[:, None] * kept[None, :]
    return dice_from_counts(intersection, predicted, evidence.truth_total[:, None])
