"""Run-length encoding of the competition: the mask flattened row-major, ``start length`` pairs of runs of
ones separated by spaces, starts 1-indexed; an empty mask is the empty string. The only RLE in segens.

Encoding looks only at the rows and columns that hold the mask (its bounding box), so its cost follows the
object's size rather than the image's; a zero column appended to the box keeps runs from crossing rows,
except when the box spans the full width, where the flattened rows are used as they are.
"""

from __future__ import annotations

import warnings

import numba
import numpy as np

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
    height, width = mask.shape
    row0, row1, col0, col1 = box
    if col0 == 0 and col1 == width:
        flat = np.zeros((row1 - row0) * width + 2, dtype=np.int8)
        flat[1:-1] = mask[row0:row1].reshape(-1) != 0
        changes = np.flatnonzero(flat[1:] != flat[:-1])
        return changes[0::2] + row0 * width, changes[1::2] + row0 * width
    sub_width = col1 - col0 + 1  # one zero column appended to each row, and one zero before the first
    padded = np.zeros((row1 - row0) * sub_width + 1, dtype=np.int8)
    padded[1:].reshape(row1 - row0, sub_width)[:, :-1] = mask[row0:row1, col0:col1] != 0
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    rows, cols = np.divmod(changes, sub_width)
    flat_index = (rows + row0) * width + cols + col0
    return flat_index[0::2], flat_index[1::2]


def encode(mask: np.ndarray, box: BBox | None | str = "auto") -> str:
    """RLE string of a 2-D mask (non-zero = foreground), identical to the reference encoder's output."""
    starts, ends = run_bounds(mask, box)
    if starts.size == 0:
        return ""
    pairs = np.empty(starts.size * 2, dtype=np.int64)
    pairs[0::2] = starts + 1
    pairs[1::2] = ends - starts
    return _format(pairs)


def encode_stack(masks: np.ndarray, boxes: list[BBox | None] | None = None) -> list[str]:
    """RLE strings of a (C, H, W) stack of masks, one per channel."""
    if masks.ndim != 3:
        raise ValueError(f"encode_stack needs a (C, H, W) stack, got shape {masks.shape}")
    if boxes is None:
        return [encode(channel) for channel in masks]
    return [encode(channel, box) for channel, box in zip(masks, boxes, strict=True)]


def _integers(text: str) -> np.ndarray | None:
    """The whitespace-separated integers of ``text`` as int64, or None if any token is not an integer."""
    if text.isascii() and "  " not in text and text.replace(" ", "").isdigit():  # plain ASCII digits, single spaces
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return np.fromstring(text, dtype=np.int64, sep=" ")  # C parser: about 5x faster than split()
    try:
        return np.array([int(token) for token in text.split()], dtype=np.int64)
    except ValueError:
        return None


def parse(rle: str, height: int, width: int, where: str = "RLE") -> tuple[np.ndarray, np.ndarray]:
    """Validated 0-indexed (starts, ends) of an RLE string for a height x width image.

    Raises SegensError (naming ``where``) for text that is not pairs of integers, non-positive lengths, runs
    out of order or overlapping, or runs past the end of the image.
    """
    text = rle.strip() if isinstance(rle, str) else ""
    if not text:
        if isinstance(rle, str) or rle is None or (isinstance(rle, float) and np.isnan(rle)):
            empty = np.empty(0, dtype=np.int64)
            return empty, empty
        raise SegensError(f"{where}: RLE must be a string, got {type(rle).__name__}")
    numbers = _integers(text)
    if numbers is None:
        raise SegensError(f"{where}: RLE holds something other than integers: {text[:60]!r}")
    if numbers.size % 2:
        raise SegensError(f"{where}: RLE has an odd count of numbers ({numbers.size}); it must be start/length pairs")
    starts, lengths = numbers[0::2] - 1, numbers[1::2]
    if (starts < 0).any() or (lengths <= 0).any():
        raise SegensError(f"{where}: RLE starts must be >= 1 and lengths >= 1")
    ends = starts + lengths
    if (starts[1:] < ends[:-1]).any():
        raise SegensError(f"{where}: RLE runs overlap or are out of order")
    if ends.size and ends[-1] > height * width:
        raise SegensError(
            f"{where}: RLE runs past the end of a {width}x{height} image (pixel {int(ends[-1])} > {height * width}); "
            "was it encoded for another image size?"
        )
    return starts, ends


def decode(rle: str, height: int, width: int, where: str = "RLE") -> np.ndarray:
    """(height, width) bool mask of an RLE string (empty string: all False); validated, see ``parse``."""
    mask = np.zeros((height, width), dtype=bool)
    box, sub = decode_box(rle, height, width, where)
    if box is not None:
        mask[box[0] : box[1], box[2] : box[3]] = sub
    return mask


def decode_stack(rles: list[str], height: int, width: int, where: str = "RLE") -> np.ndarray:
    """(len(rles), height, width) bool masks of a list of RLE strings (one per class), validated."""
    masks = np.zeros((len(rles), height, width), dtype=bool)
    for channel, text in enumerate(rles):
        box, sub = decode_box(text, height, width, f"{where} [{channel}]")
        if box is not None:
            masks[channel, box[0] : box[1], box[2] : box[3]] = sub
    return masks


def decode_box(rle: str, height: int, width: int, where: str = "RLE") -> tuple[BBox | None, np.ndarray]:
    """An RLE string as its bounding box and the bool mask inside it (the compact form segens works on).

    Returns (None, an empty (0, 0) array) for an empty mask. Only the box is allocated and painted, in
    compiled code, so the cost follows the object's size, not the image's.
    """
    starts, ends = parse(rle, height, width, where)
    if starts.size == 0:
        return None, np.zeros((0, 0), dtype=bool)
    row0, row1, col0, col1 = _runs_box(starts, ends, width)
    sub = np.zeros((row1 - row0, col1 - col0), dtype=bool)
    _paint_runs(starts, ends, width, row0, col0, sub)
    return (row0, row1, col0, col1), sub


@numba.njit(cache=True, nogil=True)
def _runs_box(starts: np.ndarray, ends: np.ndarray, width: int) -> tuple[int, int, int, int]:  # pragma: no cover
    row0 = starts[0] // width
    row1 = (ends[-1] - 1) // width + 1
    col0, col1 = width, 0
    for index in range(starts.size):
        if starts[index] // width != (ends[index] - 1) // width:
            return row0, row1, 0, width
        col0 = min(col0, starts[index] % width)
        col1 = max(col1, (ends[index] - 1) % width + 1)
    return row0, row1, col0, col1


@numba.njit(cache=True, nogil=True)
def _paint_runs(starts, ends, width, row0, col0, sub) -> None:  # pragma: no cover - compiled
    for index in range(starts.size):
        position, end = starts[index], ends[index]
        while position < end:
            row, col = position // width, position % width
            stop = min(end, (row + 1) * width)
            sub[row - row0, col - col0 : col - col0 + (stop - position)] = True
            position = stop
