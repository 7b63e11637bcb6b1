"""One image's array in a probability store: its verified metadata (size, chunk grid, per-class boxes, written
chunks with their crc32, digest) and how its chunks are encoded. See segens.store.format for the layout."""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.errors import SegensError
from segens.store.format import BLOSC, CHUNK_SIDE, repair_advice

if TYPE_CHECKING:  # segens.conventions.rle imports numba, slow to start in worker processes
    from segens.conventions.rle import BBox


def image_boxes(probs: np.ndarray) -> list[BBox | None]:
    """Per-class bounding box of the non-zero values of a (C, H, W) uint8 stack (None for an empty class)."""
    boxes: list[BBox | None] = []
    for plane in probs:
        rows = np.flatnonzero(plane.max(axis=1))  # max of uint8 is a fast SIMD reduction, unlike any()
        if rows.size == 0:
            boxes.append(None)
            continue
        cols = np.flatnonzero(plane[rows[0]:rows[-1] + 1].max(axis=0))
        boxes.append((int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1))
    return boxes


@dataclass(frozen=True)
class ImageMetadata:
    """One image's metadata, checked: size, chunk shape, per-class boxes and written chunks {(row, col): crc32}."""

    size: tuple[int, int]
    chunk_shape: tuple[int, int]
    boxes: tuple[BBox | None, ...]
    chunks: tuple[dict[tuple[int, int], int], ...]

    @classmethod
    def from_metadata(cls, document: dict[str, Any], key: str, where: str, classes: Sequence[str],
                      store: str) -> ImageMetadata:
        """Validate image ``key``'s zarr.json against this format and the identity ``store`` of the store holding
        it; a SegensError naming ``where`` (and the class)."""
        fix = f"; the store was altered or damaged: {repair_advice(key)}"
        attributes = document.get("attributes") or {}
        if attributes.get("digest") != metadata_digest(attributes):
            raise SegensError(f"{where}: the image's metadata (key, size, boxes, chunks) does not match its "
                              f"digest{fix}")
        if attributes.get("key") != key:
            raise SegensError(f"{where}: this folder holds the metadata of image {attributes.get('key')!r}, not of "
                              f"{key!r}: image folders were moved, swapped or copied inside the store{fix}")
        if attributes.get("store") != store:
            raise SegensError(f"{where}: this image was written by another store (identity {attributes.get('store')!r}, "
                              f"this store's is {store!r}): it was copied in from elsewhere{fix}")
        height, width = attributes.get("height"), attributes.get("width")
        if not (_is_int(height) and _is_int(width) and height > 0 and width > 0):
            raise SegensError(f"{where}: height/width {height!r}x{width!r} are not positive integers{fix}")
        chunk_shape = (1, min(CHUNK_SIDE, height), min(CHUNK_SIDE, width))
        grid = ((document.get("chunk_grid") or {}).get("configuration") or {}).get("chunk_shape")
        codecs = [codec.get("name") for codec in document.get("codecs") or [] if isinstance(codec, dict)]
        separator = (((document.get("chunk_key_encoding") or {}).get("configuration") or {}).get("separator"))
        if document.get("shape") != [NUM_CLASSES, height, width] or document.get("data_type") != "uint8" \
                or grid != list(chunk_shape) or codecs != ["bytes", "blosc"] or separator != "/":
            raise SegensError(f"{where}: the array's metadata is not this store format's (shape "
                              f"{document.get('shape')}, dtype {document.get('data_type')}, chunks {grid}, codecs "
                              f"{codecs}){fix}")
        raw_boxes, raw_chunks = attributes.get("boxes"), attributes.get("chunks")
        if not isinstance(raw_boxes, list) or len(raw_boxes) != NUM_CLASSES \
                or not isinstance(raw_chunks, list) or len(raw_chunks) != NUM_CLASSES:
            raise SegensError(f"{where}: boxes and chunks must list {NUM_CLASSES} classes each{fix}")
        boxes: list[BBox | None] = []
        chunks: list[dict[tuple[int, int], int]] = []
        for channel, (box, listed) in enumerate(zip(raw_boxes, raw_chunks)):
            here = f"{where}, class {classes[channel]!r}"
            if box is not None and not (isinstance(box, list) and len(box) == 4 and all(map(_is_int, box))
                                        and 0 <= box[0] < box[1] <= height and 0 <= box[2] < box[3] <= width):
                raise SegensError(f"{here}: box {box!r} is not [row0, row1, col0, col1] inside {height}x{width}{fix}")
            written: dict[tuple[int, int], int] = {}
            for entry in listed if isinstance(listed, list) else [None]:
                if not (isinstance(entry, list) and len(entry) == 3 and all(map(_is_int, entry))):
                    raise SegensError(f"{here}: chunk entry {entry!r} is not [row, col, crc32]{fix}")
                row, col, crc = entry
                if box is None or not (box[0] // chunk_shape[1] <= row <= (box[1] - 1) // chunk_shape[1]
                                       and box[2] // chunk_shape[2] <= col <= (box[3] - 1) // chunk_shape[2]):
                    raise SegensError(f"{here}: written chunk ({row}, {col}) lies outside the recorded box "
                                      f"{box!r}{fix}")
                written[(row, col)] = crc
            boxes.append(None if box is None else tuple(box))
            chunks.append(written)
        return cls((height, width), chunk_shape[1:], tuple(boxes), tuple(chunks))



def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def encode_chunk(values: np.ndarray, chunk_shape: tuple[int, int]) -> bytes:
    """One chunk's stored bytes, as zarr's BytesCodec + BloscCodec write them (edge chunks padded with zeros)."""
    if values.shape != chunk_shape:
        padded = np.zeros(chunk_shape, np.uint8)
        padded[:values.shape[0], :values.shape[1]] = values
        values = padded
    return bytes(BLOSC.encode(np.ascontiguousarray(values)))


def valid_metadata(document: dict[str, Any], key: str, store: str) -> bool:
    """Whether an image's metadata passes ``ImageMetadata.from_metadata`` (an image whose metadata does not is missing)."""
    try:
        ImageMetadata.from_metadata(document, key, key, CLASSES, store)
    except SegensError:
        return False
    return True


def metadata_digest(attributes: dict[str, Any]) -> int:
    """crc32 of the canonical JSON of an image's key, store identity, height, width, boxes and chunks."""
    content = {name: attributes.get(name) for name in ("key", "store", "height", "width", "boxes", "chunks")}
    return zlib.crc32(json.dumps(content, sort_keys=True, separators=(",", ":")).encode())


def with_digest(attributes: dict[str, Any]) -> dict[str, Any]:
    return {**attributes, "digest": metadata_digest(attributes)}


def check_probs(probs: np.ndarray, key: str, url: str) -> None:
    if not isinstance(probs, np.ndarray) or probs.dtype != np.uint8 or probs.ndim != 3 \
            or probs.shape[0] != NUM_CLASSES or 0 in probs.shape:
        raise SegensError(f"{url}: image {key!r}: probabilities must be a ({NUM_CLASSES}, H, W) uint8 array "
                          f"(quantize them with segens.store.quantize), got "
                          f"{getattr(probs, 'dtype', type(probs).__name__)} {getattr(probs, 'shape', '')}")


def check_boxes(boxes: Iterable[Any], shape: tuple[int, ...], key: str) -> list[BBox | None]:
    boxes = list(boxes)
    _, height, width = shape
    if len(boxes) != NUM_CLASSES:
        raise SegensError(f"image {key!r}: expected {NUM_CLASSES} boxes, got {len(boxes)}")
    checked: list[BBox | None] = []
    for box in boxes:
        if box is not None:
            box = tuple(int(v) for v in box)
            if len(box) != 4 or not (0 <= box[0] < box[1] <= height and 0 <= box[2] < box[3] <= width):
                raise SegensError(f"image {key!r}: box {box!r} is not (row0, row1, col0, col1) inside {height}x{width}")
        checked.append(box)
    return checked


def box_json(box: BBox | None) -> list[int] | None:
    return None if box is None else [int(v) for v in box]


def box_selection(channel: int, box: BBox) -> tuple[int, slice, slice]:
    return channel, slice(box[0], box[1]), slice(box[2], box[3])


def nonzero_chunks(probs: np.ndarray, boxes: list[BBox | None],
                    chunks: tuple[int, int]) -> Iterable[tuple[int, slice, slice]]:
    """(class, rows, cols) of every whole chunk under a class's box that holds a non-zero value."""
    _, height, width = probs.shape
    for channel, box in enumerate(boxes):
        if box is None:
            continue
        for row in range(box[0] // chunks[0] * chunks[0], box[1], chunks[0]):
            for col in range(box[2] // chunks[1] * chunks[1], box[3], chunks[1]):
                rows, cols = slice(row, min(row + chunks[0], height)), slice(col, min(col + chunks[1], width))
                if probs[channel, rows, cols].max():
                    yield channel, rows, cols
