"""Run-length encoding of the competition: the mask flattened row-major, ``start length`` pairs of runs of
ones separated by spaces, starts 1-indexed; an empty mask is the empty string. The only RLE in segens.

Encoding looks only at the rows and columns that hold the mask (its bounding box), so its cost follows the
object's size rather than the image's; a zero column appended to the box keeps runs from crossing rows,
except when the box spans the full width, where the flattened rows are used as they are.
"""

from __future__ import annotations

import re
import warnings

import numba
import numpy as np

from segens.conventions.classes import CLASSES
from segens.errors import SegensError

BBox = tuple[int, int, int, int]
"""(row0, row1, col0, col1), half-open: mask[row0:row1, col0:col1] holds every non-zero pixel."""


def bbox(mask: np.ndarray) -> BBox | None:
    """Bounding box of the non-zero pixels of a 2-D array, or None if it has none."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def _format(numbers: np.ndarray) -> str:
    return " ".join(map(str, numbers.tolist()))


def run_bounds(mask: np.ndarray, box: BBox | None | str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """0-indexed flat (start, end) of each run of non-zero pixels of a 2-D mask, end exclusive, as int64.

    ``box`` may be passed when known (None: empty mask); it must contain every non-zero pixel.
    """
    if mask.ndim != 2:
        raise ValueError(f"RLE needs a 2-D mask, got shape {mask.shape}")
    if isinstance(box, str):
        box = bbox(mask)
    if box is None:
        empty = np.empty(0, dtype=np.int64)
        return empty, empty
    row0, row1, col0, col1 = box
    return box_run_bounds(mask[row0:row1, col0:col1], row0, col0, mask.shape[1])


def box_run_bounds(sub: np.ndarray, row0: int, col0: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of a mask known only inside a box (``sub`` at (row0, col0) of an image ``width`` wide, zero
    outside), as 0-indexed flat (start, end) of the whole image, end exclusive."""
    rows_in_box, box_width = sub.shape
    if col0 == 0 and box_width == width:
        flat = np.zeros(rows_in_box * width + 2, dtype=np.int8)
        flat[1:-1] = sub.reshape(-1) != 0
        changes = np.flatnonzero(flat[1:] != flat[:-1])
        return changes[0::2] + row0 * width, changes[1::2] + row0 * width
    padded_width = box_width + 1  # one zero column appended to each row, and one zero before the first
    padded = np.zeros(rows_in_box * padded_width + 1, dtype=np.int8)
    padded[1:].reshape(rows_in_box, padded_width)[:, :-1] = sub != 0
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    rows, cols = np.divmod(changes, padded_width)
    flat_index = (rows + row0) * width + cols + col0
    return flat_index[0::2], flat_index[1::2]


def _pairs_text(starts: np.ndarray, ends: np.ndarray) -> str:
    if starts.size == 0:
        return ""
    pairs = np.empty(starts.size * 2, dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return _format(pairs)


def encode(mask: np.ndarray, box: BBox | None | str = "auto") -> str:
    """RLE string of a 2-D mask (non-zero = foreground), identical to the reference encoder's output."""
    return _pairs_text(*run_bounds(mask, box))


def encode_box(sub: np.ndarray, box: BBox | None, width: int) -> str:
    """RLE string of an image that is zero outside ``box`` and ``sub`` (box-shaped) inside it."""
    if box is None:
        return ""
    return _pairs_text(*box_run_bounds(sub, box[0], box[2], width))


def encode_stack(masks: np.ndarray, boxes: list[BBox | None] | None = None) -> list[str]:
    """RLE strings of a (C, H, W) stack of masks, one per channel."""
    if masks.ndim != 3:
        raise ValueError(f"encode_stack needs a (C, H, W) stack, got shape {masks.shape}")
    if boxes is None:
        return [encode(channel) for channel in masks]
    return [encode(channel, box) for channel, box in zip(masks, boxes, strict=True)]


_TOKEN = re.compile(r"[+-]?[0-9]+")
_SATURATE = 1 << 62
"""Integers beyond this are clipped to it while parsing: far past any image, so the size check refuses them."""


def _integers(text: str) -> np.ndarray | None:
    """The whitespace-separated ASCII integers of ``text`` as int64, or None if any token is not one. Numbers
    too large for int64 are clipped (the fast parser saturates at the int64 maximum), never wrapped."""
    if text.isascii() and "  " not in text and text.replace(" ", "").isdigit():  # plain ASCII digits, single spaces
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return np.fromstring(text, dtype=np.int64, sep=" ")  # C parser: about 5x faster than split()
    tokens = text.split()
    if not all(_TOKEN.fullmatch(token) for token in tokens):  # int() would also take '1_000' and non-ASCII digits
        return None
    return np.array([max(-_SATURATE, min(int(token), _SATURATE)) for token in tokens], dtype=np.int64)


_RUN_ERRORS = {
    1: "RLE starts must be >= 1 and lengths >= 1",
    2: "RLE runs overlap or are out of order",
}


def parse_pairs(rle: str, height: int, width: int, where: str = "RLE") -> np.ndarray:
    """Validated int64 ``[start1, length1, start2, length2, ...]`` (starts 1-indexed) of an RLE string.

    Raises SegensError (naming ``where``) for text that is not pairs of integers, non-positive starts or
    lengths, runs out of order or overlapping, or runs past the end of a height x width image.
    """
    text = rle.strip() if isinstance(rle, str) else ""
    if not text:
        if isinstance(rle, str) or rle is None or (isinstance(rle, float) and np.isnan(rle)):
            return np.empty(0, dtype=np.int64)
        raise SegensError(f"{where}: RLE must be a string, got {type(rle).__name__}")
    numbers = _integers(text)
    if numbers is None:
        raise SegensError(f"{where}: RLE holds something other than integers: {text[:60]!r}")
    if numbers.size % 2:
        raise SegensError(f"{where}: RLE has an odd count of numbers ({numbers.size}); it must be start/length pairs")
    pixels = height * width
    if numbers.size and int(numbers.max()) > pixels:  # checked before the compiled code, whose sums could overflow
        raise SegensError(f"{where}: RLE runs past the end of a {width}x{height} image (it holds the number "
                          f"{int(numbers.max())}, more than its {pixels} pixels); "
                          "was it encoded for another image size?")
    problem, last_end = _check_pairs(numbers)
    if problem:
        raise SegensError(f"{where}: {_RUN_ERRORS[problem]}")
    if last_end > height * width:
        raise SegensError(
            f"{where}: RLE runs past the end of a {width}x{height} image (pixel {last_end} > {height * width}); "
            "was it encoded for another image size?"
        )
    return numbers


def parse(rle: str, height: int, width: int, where: str = "RLE") -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-indexed (starts, ends) of an RLE string, ends exclusive; see ``parse_pairs``."""
    numbers = parse_pairs(rle, height, width, where)
    starts = numbers[0::2] - 1
    return starts, starts + numbers[1::2]


def decode(rle: str, height: int, width: int, where: str = "RLE") -> np.ndarray:
    """(height, width) bool mask of an RLE string (empty string: all False); validated, see ``parse_pairs``."""
    mask = np.zeros((height, width), dtype=bool)
    box, sub = decode_box(rle, height, width, where)
    if box is not None:
        mask[box[0] : box[1], box[2] : box[3]] = sub
    return mask


def decode_stack(rles: list[str], height: int, width: int, where: str = "RLE") -> np.ndarray:
    """(len(rles), height, width) bool masks of a list of RLE strings (one per class), validated."""
    masks = np.zeros((len(rles), height, width), dtype=bool)
    for channel, text in enumerate(rles):
        name = CLASSES[channel] if len(rles) == len(CLASSES) else str(channel)
        box, sub = decode_box(text, height, width, f"{where} class {name}")
        if box is not None:
            masks[channel, box[0] : box[1], box[2] : box[3]] = sub
    return masks


def decode_box(rle: str, height: int, width: int, where: str = "RLE") -> tuple[BBox | None, np.ndarray]:
    """An RLE string as its bounding box and the bool mask inside it (the compact form segens works on).

    Returns (None, an empty (0, 0) array) for an empty mask. Only the box is allocated and painted, in
    compiled code, so the cost follows the object's size, not the image's.
    """
    numbers = parse_pairs(rle, height, width, where)
    if numbers.size == 0:
        return None, np.zeros((0, 0), dtype=bool)
    row0, row1, col0, col1 = _pairs_box(numbers, width)
    sub = np.zeros((row1 - row0, col1 - col0), dtype=bool)
    _paint_pairs(numbers, width, row0, col0, sub)
    return (row0, row1, col0, col1), sub


@numba.njit(cache=True, nogil=True)
def _check_pairs(numbers: np.ndarray) -> tuple[int, int]:  # pragma: no cover - compiled
    """(problem code or 0, exclusive 1-indexed end of the last run)."""
    previous_end = 0
    for index in range(0, numbers.size, 2):
        start, length = numbers[index], numbers[index + 1]
        if start < 1 or length < 1:
            return 1, 0
        if start <= previous_end:
            return 2, 0
        previous_end = start + length - 1
    return 0, previous_end


@numba.njit(cache=True, nogil=True)
def _pairs_box(numbers: np.ndarray, width: int) -> tuple[int, int, int, int]:  # pragma: no cover - compiled
    first, last = numbers[0] - 1, numbers[-2] - 1 + numbers[-1] - 1
    row0, row1 = first // width, last // width + 1
    col0, col1 = width, 0
    for index in range(0, numbers.size, 2):
        start = numbers[index] - 1
        end = start + numbers[index + 1] - 1  # inclusive
        if start // width != end // width:
            return row0, row1, 0, width
        col0 = min(col0, start % width)
        col1 = max(col1, end % width + 1)
    return row0, row1, col0, col1


@numba.njit(cache=True, nogil=True)
def _paint_pairs(numbers, width, row0, col0, sub) -> None:  # pragma: no cover - compiled
    for index in range(0, numbers.size, 2):
        position = numbers[index] - 1
        end = position + numbers[index + 1]
        while position < end:
            row, col = position // width, position % width
            stop = min(end, (row + 1) * width)
            sub[row - row0, col - col0 : col - col0 + (stop - position)] = True
            position = stop
