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
from functools import cached_property

import numba
import numpy as np

from segens.conventions.dataset import ImageRecord
from segens.conventions.dice import dice_from_counts
from segens.ensemble.combine import union_box
from segens.conventions.labels import read_label_mask
from segens.store import ProbabilityStore

THRESHOLDS = (np.arange(255, dtype=np.float64) + 0.5) / 255  # midpoints between quantization levels; 0.5 is one
SAFETY = 0.01  # in quantization steps: keeps float32 rounding of s from crossing a fixed pixel's side


def threshold_grid(low: float = THRESHOLDS[0], high: float = THRESHOLDS[-1]) -> np.ndarray:
    """The swept thresholds as float32: the quantization midpoints within [low, high]."""
    chosen = THRESHOLDS[(THRESHOLDS >= low - 1e-12) & (THRESHOLDS <= high + 1e-12)]
    return chosen.astype(np.float32)


@dataclass
class ClassEvidence:
    """One class's OOF evidence: fixed pixels counted per image; ambiguous pixels as the distinct (member values,
    truth) rows of each image with their pixel counts (candidates are scored per row: a pixel's fate depends on
    nothing else); and per image what rebuilds any candidate's mask in the class's union box (post-processing)."""

    channel: int
    values: np.ndarray  # (M, R) uint8: each member's value of each distinct row, rows grouped by image in order
    truth: np.ndarray  # (R,) bool: the row's ground truth
    count: np.ndarray  # (R,) int64: ambiguous pixels of the row's image with exactly these values and truth
    image: np.ndarray  # (R,) int32: which image each row belongs to
    position: np.ndarray  # (N,) int32: each ambiguous pixel's flat index in its image's box, grouped by image
    row: np.ndarray  # (N,) int32: each ambiguous pixel's row
    fixed_positive: np.ndarray  # (images,) int64: pixels positive for every candidate
    fixed_true_positive: np.ndarray  # (images,) int64: of those, in the ground truth
    truth_total: np.ndarray  # (images,) int64: ground-truth pixels of the class in each image
    boxes: np.ndarray  # (images, 4) int32: union box of the members' boxes (row0, row1, col0, col1); -1 if none
    bits: np.ndarray  # uint8: per image, np.packbits of the always-positive mask, then of the truth, in the box
    bit_offsets: np.ndarray  # (images + 1,) int64: where each image's bits start in ``bits``

    @property
    def images(self) -> int:
        return len(self.truth_total)

    @property
    def members(self) -> int:
        return self.values.shape[0]

    @property
    def ambiguous_pixels(self) -> int:
        return int(self.position.size)

    @cached_property
    def row_starts(self) -> np.ndarray:
        """(images + 1,) int64: where each image's rows start (they are grouped by image, in order)."""
        return np.searchsorted(self.image, np.arange(self.images + 1)).astype(np.int64)

    @cached_property
    def pixel_starts(self) -> np.ndarray:
        """(images + 1,) int64: where each image's ambiguous pixels start (grouped by image, in order)."""
        return np.searchsorted(self.image[self.row], np.arange(self.images + 1)).astype(np.int64)

    def box_masks(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(always positive, truth) bool masks of image ``index`` inside its box."""
        r0, r1, c0, c1 = self.boxes[index]
        area = int((r1 - r0) * (c1 - c0))
        packed = self.bits[self.bit_offsets[index]:self.bit_offsets[index + 1]]
        half = packed.size // 2
        shape = (int(r1 - r0), int(c1 - c0))
        return (np.unpackbits(packed[:half], count=area).view(bool).reshape(shape),
                np.unpackbits(packed[half:], count=area).view(bool).reshape(shape))


FIELDS = ("values", "truth", "count", "image", "position", "row", "fixed_positive", "fixed_true_positive",
          "truth_total", "boxes", "bits", "bit_offsets")


def concatenate(channel: int, parts: Sequence[ClassEvidence]) -> ClassEvidence:
    """The evidence of consecutive image batches as one (image indices, rows and bit offsets shifted)."""
    image_base = np.cumsum([0] + [part.images for part in parts])
    row_base = np.cumsum([0] + [part.truth.size for part in parts])
    bit_base = np.cumsum([0] + [part.bits.size for part in parts])
    return ClassEvidence(
        channel,
        np.concatenate([part.values for part in parts], axis=1),
        np.concatenate([part.truth for part in parts]),
        np.concatenate([part.count for part in parts]),
        np.concatenate([part.image + np.int32(base) for part, base in zip(parts, image_base)]).astype(np.int32),
        np.concatenate([part.position for part in parts]),
        np.concatenate([part.row + np.int32(base) for part, base in zip(parts, row_base)]).astype(np.int32),
        np.concatenate([part.fixed_positive for part in parts]),
        np.concatenate([part.fixed_true_positive for part in parts]),
        np.concatenate([part.truth_total for part in parts]),
        np.concatenate([part.boxes for part in parts]),
        np.concatenate([part.bits for part in parts]),
        np.concatenate([[0]] + [part.bit_offsets[1:] + base for part, base in zip(parts, bit_base)]).astype(np.int64),
    )


def distinct_rows(values: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The distinct (member values, truth) columns of (M, N) uint8 ``values`` and (N,) bool ``truth``: their values
    (M, R), truth (R,), counts (R,) int64, and each input column's row (N,) int32."""
    members = values.shape[0]
    if members <= 7:  # one uint64 key per pixel: a fast sort
        key = truth.astype(np.uint64) << np.uint64(8 * members)
        for member in range(members):
            key |= values[member].astype(np.uint64) << np.uint64(8 * member)
        keys, row, count = np.unique(key, return_inverse=True, return_counts=True)
        rows = np.stack([(keys >> np.uint64(8 * member)).astype(np.uint8) for member in range(members)])
        return rows, (keys >> np.uint64(8 * members)).astype(bool), count.astype(np.int64), row.astype(np.int32)
    stacked = np.concatenate([values, truth[None].view(np.uint8)]).T
    unique, row, count = np.unique(stacked, axis=0, return_inverse=True, return_counts=True)
    return (np.ascontiguousarray(unique[:, :members].T), unique[:, members].astype(bool), count.astype(np.int64),
            row.reshape(-1).astype(np.int32))


def class_truth(record: ImageRecord, channel: int, size: tuple[int, int]) -> np.ndarray:
    """The (H, W) bool ground truth of one class of one image."""
    return image_truth(record, size)[channel]


def image_truth(record: ImageRecord, size: tuple[int, int]) -> np.ndarray:
    """The (29, H, W) bool ground truth of one image (its label file parsed and checked once)."""
    return read_label_mask(record.label_path, *size)


def extract_classes(stores: Sequence[ProbabilityStore], records: Sequence[ImageRecord], channels: Sequence[int],
                    thresholds: np.ndarray) -> dict[int, ClassEvidence]:
    """The evidence of ``channels`` over ``records``: each image's label rasterised once, each store's class regions
    read once, only the ambiguous pixels kept (channel -> ClassEvidence)."""
    low = float(thresholds.min()) * 255 - SAFETY
    high = float(thresholds.max()) * 255 + SAFETY
    members, count = len(stores), len(records)
    pieces: dict[int, dict[str, list]] = {channel: {name: [] for name in ("values", "truth", "count", "image",
                                                                           "position", "row", "bits")}
                                           for channel in channels}
    rows_so_far = {channel: 0 for channel in channels}
    counts = {channel: np.zeros((3, count), np.int64) for channel in channels}  # fixed +, fixed true +, truth
    boxes = {channel: np.full((count, 4), -1, np.int32) for channel in channels}
    for index, record in enumerate(records):
        size = stores[0].image_size(record.key)
        truth = image_truth(record, size)
        member_boxes = [store.boxes(record.key) for store in stores]
        for channel in channels:
            counts[channel][2, index] = np.count_nonzero(truth[channel])
            box = union_box([member[channel] for member in member_boxes])
            piece = pieces[channel]
            if box is None:
                piece["bits"].append(np.zeros(0, np.uint8))
                continue
            boxes[channel][index] = box
            regions = [store.read_region(record.key, channel, box) for store in stores]
            lowest, highest = regions[0].copy(), regions[0].copy()
            for region in regions[1:]:
                np.minimum(lowest, region, out=lowest)
                np.maximum(highest, region, out=highest)
            region_truth = truth[channel, box[0] : box[1], box[2] : box[3]]
            always = lowest > high
            ambiguous = ~always & (highest >= low)
            counts[channel][0, index] = np.count_nonzero(always)
            counts[channel][1, index] = np.count_nonzero(always & region_truth)
            position = np.flatnonzero(ambiguous).astype(np.int32)
            values, row_truth, row_count, row = distinct_rows(np.stack([region.ravel()[position] for region in regions]),
                                                              region_truth.ravel()[position])
            piece["values"].append(values)
            piece["truth"].append(row_truth)
            piece["count"].append(row_count)
            piece["image"].append(np.full(row_count.size, index, np.int32))
            piece["position"].append(position)
            piece["row"].append(row + np.int32(rows_so_far[channel]))
            rows_so_far[channel] += row_count.size
            piece["bits"].append(np.concatenate([np.packbits(always), np.packbits(region_truth)]))
    result = {}
    for channel in channels:
        piece = pieces[channel]
        offsets = np.zeros(count + 1, np.int64)
        offsets[1:] = np.cumsum([bits.size for bits in piece["bits"]])
        result[channel] = ClassEvidence(
            channel,
            np.concatenate(piece["values"], axis=1) if piece["values"] else np.zeros((members, 0), np.uint8),
            np.concatenate(piece["truth"]) if piece["truth"] else np.zeros(0, bool),
            np.concatenate(piece["count"]) if piece["count"] else np.zeros(0, np.int64),
            np.concatenate(piece["image"]) if piece["image"] else np.zeros(0, np.int32),
            np.concatenate(piece["position"]) if piece["position"] else np.zeros(0, np.int32),
            np.concatenate(piece["row"]) if piece["row"] else np.zeros(0, np.int32),
            counts[channel][0], counts[channel][1], counts[channel][2], boxes[channel],
            np.concatenate(piece["bits"]) if piece["bits"] else np.zeros(0, np.uint8), offsets,
        )
    return result


def extract_class(stores: Sequence[ProbabilityStore], records: Sequence[ImageRecord], channel: int,
                  thresholds: np.ndarray) -> ClassEvidence:
    """The evidence of one class (:func:`extract_classes` of one channel)."""
    return extract_classes(stores, records, [channel], thresholds)[channel]


def weighted_kept(evidence: ClassEvidence, weights: np.ndarray, threshold: np.float32) -> np.ndarray:
    """(R,) bool: the rows kept by float32 ``weights`` at ``threshold``, summed as combine sums."""
    total = np.zeros(evidence.truth.size, np.float32)
    for member in range(evidence.members):
        total += weights[member] * (evidence.values[member].astype(np.float32) / np.float32(255))
    return total > threshold


def hard_kept(evidence: ClassEvidence, member_thresholds: np.ndarray, min_votes: float) -> np.ndarray:
    """(R,) bool: the rows with at least ``min_votes`` unit votes (a member votes when p > its float32
    threshold), as combine counts them."""
    votes = np.zeros(evidence.truth.size, np.float64)
    for member in range(evidence.members):
        votes += evidence.values[member].astype(np.float32) / np.float32(255) > member_thresholds[member]
    return votes >= min_votes


def image_masks(evidence: ClassEvidence, kept: np.ndarray):
    """Per image: (box mask of a candidate whose rows ``kept`` says, truth in the box) or None for an image
    without a box; the mask equals what combine makes before post-processing."""
    kept_pixels = kept[evidence.row]
    starts = evidence.pixel_starts
    for index in range(evidence.images):
        if evidence.boxes[index, 0] < 0:
            yield None
            continue
        always, truth = evidence.box_masks(index)
        mask = always.copy()
        chosen = slice(starts[index], starts[index + 1])
        mask.ravel()[evidence.position[chosen][kept_pixels[chosen]]] = True
        yield mask, truth


LEVELS_OF_VALUES = np.arange(256, dtype=np.float32) / np.float32(255)  # p of each stored uint8 value, as combine
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


def weighted_dice(evidence: ClassEvidence, weights: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(images, K) Dice of every threshold for float32 ``weights`` (as combine uses them), exactly."""
    products = weights.astype(np.float32)[:, None] * LEVELS_OF_VALUES[None, :]  # float32, as combine multiplies
    if np.any(np.diff(thresholds.astype(np.float64)) <= 2 / BUCKETS):
        raise ValueError("thresholds must be sorted and further apart than 2 / BUCKETS")
    lookup = np.searchsorted(thresholds.astype(np.float64), np.arange(BUCKETS + 1) / BUCKETS, side="left")
    padded = np.concatenate([thresholds.astype(np.float32), [np.float32(np.inf)]])
    positives, true_positives = _weighted_histograms(evidence.values, evidence.truth.view(np.uint8), evidence.count,
                                                     evidence.row_starts, products, padded, lookup.astype(np.int64))
    return _dice_of(evidence, positives, true_positives)


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
    votes_of = (LEVELS_OF_VALUES[None, :] > member_thresholds.astype(np.float32)[:, None]).view(np.uint8)
    below_of = np.searchsorted(thresholds, LEVELS_OF_VALUES, side="left").astype(np.int64)  # thresholds < p
    positives, true_positives = _hard_histograms(evidence.values, evidence.truth.view(np.uint8), evidence.count,
                                                 evidence.row_starts, votes_of,
                                                 swept, below_of, thresholds.size, min_votes)
    return _dice_of(evidence, positives, true_positives)


def _dice_of(evidence: ClassEvidence, positives: np.ndarray, true_positives: np.ndarray) -> np.ndarray:
    predicted = _above(positives) + evidence.fixed_positive[:, None]
    intersection = _above(true_positives) + evidence.fixed_true_positive[:, None]
    return dice_from_counts(intersection, predicted, evidence.truth_total[:, None])
