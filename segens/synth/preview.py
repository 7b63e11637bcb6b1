"""A contact sheet of a few images of a data root with their label outlines, to eyeball data or a generator."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np

from segens.conventions.classes import CLASS_TO_INDEX, NUM_CLASSES
from segens.conventions.dataset import discover, read_image
from segens.conventions.labels import parse_label_json
from segens.errors import SegensError

TILE = 512  # pixels per image in the sheet


def preview(root: str | Path, out_png: str | Path, n_images: int = 4, split: str = "train") -> Path:
    """Write a grid of the first ``n_images`` images of ``split`` (in submission order), each class outlined in its
    own colour where a label file exists, to ``out_png``; returns its path."""
    if n_images < 1:
        raise SegensError(f"n_images must be at least 1, got {n_images}")
    records = discover(root, split, require_labels=False).records[:n_images]
    tiles = [_tile(record.image_path, record.label_path, record.key) for record in records]
    columns = math.ceil(math.sqrt(len(tiles)))
    rows = math.ceil(len(tiles) / columns)
    sheet = np.zeros((rows * TILE, columns * TILE, 3), np.uint8)
    for index, tile in enumerate(tiles):
        r, c = divmod(index, columns)
        sheet[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = tile
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    ok, encoded = cv2.imencode(".png", sheet)
    if not ok:
        raise SegensError(f"{out_png}: PNG encoding failed")
    out_png.write_bytes(encoded.tobytes())
    return out_png


def _tile(image_path: Path, label_path: Path | None, key: str) -> np.ndarray:
    """One TILE x TILE BGR uint8 tile: the image, its outlines (drawn at tile scale) and its key."""
    image = read_image(image_path)
    scale = TILE / max(image.shape)
    tile = cv2.cvtColor(cv2.resize(image, (TILE, TILE), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    if label_path is not None:
        for label, points in parse_label_json(label_path).items():
            scaled = np.rint(points * scale).astype(np.int32).reshape(-1, 1, 2)
            cv2.polylines(tile, [scaled], True, _colour(CLASS_TO_INDEX[label]), 1, cv2.LINE_AA)
    cv2.putText(tile, key, (6, TILE - 8), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 255, 255), 1, cv2.LINE_AA)
    return tile


def _colour(index: int) -> tuple[int, int, int]:
    """A distinct saturated BGR colour per class index (hues spread around the wheel)."""
    hue = int(round(index * 180 / NUM_CLASSES * 7)) % 180  # stride 7 keeps neighbouring bones apart in hue
    bgr = cv2.cvtColor(np.uint8([[[hue, 255, 255]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return int(bgr[0]), int(bgr[1]), int(bgr[2])
