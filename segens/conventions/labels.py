"""Label JSON files (``train/outputs_json/IDxxx/<name>.json``): reading, validating, rasterising, writing.

A label file holds ``{"annotations": [{"id", "type": "poly_seg", "attributes", "points": [[x, y], ...],
"label": class name}, ...], ...}``; every other top-level key (``metadata`` with stale sizes among them)
is ignored. Masks are the filled polygons, one channel per class, at the image's own size.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from segens.conventions.classes import CLASS_TO_INDEX, CLASSES, NUM_CLASSES
from segens.errors import SegensError
from segens.infra.safeload import load_json, parse_json, validate

MAX_LABEL_BYTES = 64 << 20
"""Largest label file read; the competition's are a few hundred KB."""
MAX_COORDINATE = 1 << 20
"""Points beyond this are refused before rasterising (int32 and cv2 limits); images are far smaller."""
Coordinate = Annotated[float, Field(allow_inf_nan=False, ge=-MAX_COORDINATE, le=MAX_COORDINATE)]

Polygons = dict[str, np.ndarray]
"""Class name -> (N, 2) int32 array of (x, y) pixel coordinates."""


class _Annotation(BaseModel):
    """The fields of one annotation that segens uses; others (id, type, attributes, ...) are allowed."""

    model_config = ConfigDict(extra="allow", strict=True)

    label: str
    points: list[Annotated[list[Coordinate], Field(min_length=2, max_length=2)]]


class _LabelDocument(BaseModel):
    """A label file: an ``annotations`` list; every other top-level field (metadata, ...) is allowed and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)

    annotations: list[_Annotation]


def parse_label_json(path: str | Path, text: str | bytes | None = None, require_all: bool = True) -> Polygons:
    """Read one label file (or its ``text``) into class -> (N, 2) int32 points; every class exactly once, finite
    coordinates, at least 3 points, or a SegensError naming the file (and annotation and class). With
    ``require_all=False`` (pseudo-labels, segens.ensemble.pseudo) classes may be missing: at most once each.

    Read through segens.infra.safeload: at most MAX_LABEL_BYTES, UTF-8 (BOM accepted), nesting and size bounded."""
    path = Path(path)
    if text is None:
        raw = load_json(path, "label file", MAX_LABEL_BYTES)
    else:
        raw = parse_json(text, path, "label file")
    if not isinstance(raw, dict) or not isinstance(raw.get("annotations"), list):
        raise SegensError(f"{path}: no 'annotations' list at the top level; is this a label file?")
    document = validate(_LabelDocument, raw, path)

    polygons: Polygons = {}
    for number, annotation in enumerate(document.annotations):
        where = f"{path}: annotation {number}"
        label = annotation.label
        if label not in CLASS_TO_INDEX:
            raise SegensError(f"{where}: unknown class {label!r}; valid classes are: {', '.join(CLASSES)}")
        if label in polygons:
            raise SegensError(f"{where}: class {label!r} appears twice; each class must have one polygon")
        if len(annotation.points) < 3:
            raise SegensError(f"{where} ({label}): 'points' must be at least 3 finite [x, y] pairs")
        polygons[label] = np.rint(np.asarray(annotation.points, dtype=np.float64)).astype(np.int32)
    missing = [name for name in CLASSES if name not in polygons]
    if missing and require_all:
        raise SegensError(f"{path}: classes missing: {', '.join(missing)}; every image needs all {NUM_CLASSES}")
    return polygons


def check_points_inside(path: str | Path, polygons: Mapping[str, np.ndarray], height: int, width: int) -> None:
    """Raise a SegensError if any point lies outside [0, width] x [0, height]."""
    for label, points in polygons.items():
        outside = (points[:, 0] < 0) | (points[:, 0] > width) | (points[:, 1] < 0) | (points[:, 1] > height)
        if outside.any():
            x, y = points[np.argmax(outside)]
            raise SegensError(
                f"{path}: class {label!r} has a point ({x}, {y}) outside the {width}x{height} image; "
                "is the label file paired with the right image?"
            )


def rasterize(polygons: Mapping[str, np.ndarray], height: int, width: int) -> np.ndarray:
    """Filled polygons as a (29, height, width) bool mask, channel order of CLASSES (cv2.fillPoly, as the
    competition's baseline)."""
    masks = np.zeros((NUM_CLASSES, height, width), dtype=np.uint8)
    for label, points in polygons.items():
        cv2.fillPoly(masks[CLASS_TO_INDEX[label]], [points.reshape(-1, 1, 2)], 1)
    return masks.view(bool)


def read_label_mask(path: str | Path, height: int, width: int, require_all: bool = True) -> np.ndarray:
    """Parse, validate against the image size, and rasterise a label file: (29, height, width) bool (a class
    without annotation, allowed with ``require_all=False``, is empty)."""
    polygons = parse_label_json(path, require_all=require_all)
    check_points_inside(path, polygons, height, width)
    return rasterize(polygons, height, width)


def label_document(name: str, polygons: Mapping[str, Sequence[Sequence[int]] | np.ndarray],
                   metadata: dict | None = None, fields: Mapping[str, Mapping[str, object]] | None = None) -> dict:
    """A label file's document in the competition's format (class order of CLASSES, integer points) for the image
    file stem ``name``; ``fields``: extra keys per class's annotation (a pseudo-label's confidence, say)."""
    annotations = []
    for number, label in enumerate(name for name in CLASSES if name in polygons):
        points = np.asarray(polygons[label]).astype(int).tolist()
        annotations.append(
            {"id": f"{number:04d}", "type": "poly_seg", "attributes": {}, "points": points, "label": label,
             **dict((fields or {}).get(label, {}))}
        )
    return {"annotations": annotations, "attributes": {}, "file_id": name,
            "parent_path": "", "last_modifier_id": "", "metadata": metadata or {}}


def write_label_json(
    path: str | Path, polygons: Mapping[str, Sequence[Sequence[int]] | np.ndarray], metadata: dict | None = None
) -> None:
    """Write a label file in the competition's format (class order of CLASSES, integer points)."""
    document = label_document(Path(path).stem, polygons, metadata)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document))
