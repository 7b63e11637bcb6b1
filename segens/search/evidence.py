"""One class's OOF evidence, the compact form ``ens search-weights`` scores every candidate on (weights and
threshold, or hard-voting thresholds; the kernels are in segens.search.kernels).

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

import numpy as np

from segens.conventions.dataset import ImageRecord
from segens.conventions.labels import read_label_mask
from segens.ensemble.shift import region_counts
from segens.ensemble.stores import union_box
from segens.store import SCALE, ProbabilityStore

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
    member_counts: np.ndarray  # (images, M, 3) int64: per member, segens.ensemble.shift.region_counts of its values
    pixels: np.ndarray  # (images,) int64: the image's pixels (height x width)

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
          "truth_total", "boxes", "bits", "bit_offsets", "member_counts", "pixels")


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
        np.concatenate([part.member_counts for part in parts]),
        np.concatenate([part.pixels for part in parts]),
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
    low = float(thresholds.min()) * SCALE - SAFETY
    high = float(thresholds.max()) * SCALE + SAFETY
    members, count = len(stores), len(records)
    pieces: dict[int, dict[str, list]] = {channel: {name: [] for name in ("values", "truth", "count", "image",
                                                                           "position", "row", "bits")}
                                           for channel in channels}
    rows_so_far = {channel: 0 for channel in channels}
    counts = {channel: np.zeros((3, count), np.int64) for channel in channels}  # fixed +, fixed true +, truth
    boxes = {channel: np.full((count, 4), -1, np.int32) for channel in channels}
    shapes = {channel: np.zeros((count, members, 3), np.int64) for channel in channels}
    pixels = np.zeros(count, np.int64)
    for index, record in enumerate(records):
        size = stores[0].image_size(record.key)
        pixels[index] = size[0] * size[1]
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
            shapes[channel][index] = [region_counts(region) for region in regions]
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
            np.concatenate(piece["bits"]) if piece["bits"] else np.zeros(0, np.uint8), offsets, shapes[channel],
            pixels.copy(),
        )
    return result


def extract_class(stores: Sequence[ProbabilityStore], records: Sequence[ImageRecord], channel: int,
                  thresholds: np.ndarray) -> ClassEvidence:
    """The evidence of one class (:func:`extract_classes` of one channel)."""
    return extract_classes(stores, records, [channel], thresholds)[channel]


def image_masks(evidence: ClassEvidence, kept: np.ndarray, saturated: bool = True):
    """Per image: (box mask of a candidate whose rows ``kept`` says, truth in the box) or None for an image
    without a box; the mask equals what combine makes before post-processing (``saturated``: whether the candidate
    keeps the always-positive pixels, as every uncalibrated one does)."""
    kept_pixels = kept[evidence.row]
    starts = evidence.pixel_starts
    for index in range(evidence.images):
        if evidence.boxes[index, 0] < 0:
            yield None
            continue
        always, truth = evidence.box_masks(index)
        mask = always.copy() if saturated else np.zeros_like(always)
        chosen = slice(starts[index], starts[index + 1])
        mask.ravel()[evidence.position[chosen][kept_pixels[chosen]]] = True
        yield mask, truth
