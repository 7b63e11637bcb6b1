"""A fold's training data in ultralytics' YOLO segmentation format, made from the label JSON files without copying
images.

Layout under ``root`` (one per fold)::

    data.yaml                      names: the 29 classes in segens order; train/val: the two lists below
    train.txt, val.txt             absolute paths of the linked images, one a line
    train/images/<flat key>.png -> the original image (a symlink)
    train/labels/<flat key>.txt    one line per polygon: ``class x1 y1 x2 y2 ...``, coordinates divided by the
                                   image's width and height
    val/...                        the same for the validation images

Ultralytics finds a label by replacing the last ``/images/`` of the image path with ``/labels/``, which is why the
images are linked into an ``images`` folder rather than listed where they are. A flat key is the image key with
``/`` written as ``__`` (``ID001__image1661130828152_R``), so each split's label cache is one file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import yaml

from segens.conventions.classes import CLASS_TO_INDEX, CLASSES
from segens.conventions.dataset import ImageRecord, image_size
from segens.conventions.labels import check_points_inside, parse_label_json
from segens.errors import SegensError
from segens.infra.atomic import atomic_write_text

SPLITS = ("train", "val")
_DECIMALS = 6  # 1e-6 of a 2048-px side is 0.002 px: integer points survive the round trip


def flat_key(key: str) -> str:
    """The file stem of an image key inside a YOLO data set folder: ``ID001/image1`` -> ``ID001__image1``."""
    return key.replace("/", "__")


def yolo_label_text(polygons: Mapping[str, np.ndarray], height: int, width: int) -> str:
    """YOLO segmentation label text: one ``class x1 y1 ...`` line per polygon, in class order, coordinates
    normalised to [0, 1] by the image's ``width`` and ``height``."""
    scale = np.array([width, height], dtype=np.float64)
    lines = []
    for name in (name for name in CLASSES if name in polygons):
        points = np.clip(np.asarray(polygons[name], dtype=np.float64) / scale, 0.0, 1.0)
        coordinates = " ".join(f"{value:.{_DECIMALS}f}" for value in points.reshape(-1))
        lines.append(f"{CLASS_TO_INDEX[name]} {coordinates}")
    return "\n".join(lines) + "\n"


def read_yolo_label(path: str | Path, height: int, width: int) -> dict[str, np.ndarray]:
    """Read a YOLO segmentation label file back: class name -> (N, 2) float64 (x, y) pixel coordinates (a class
    with several polygons keeps the last; segens writes one per class)."""
    path = Path(path)
    scale = np.array([width, height], dtype=np.float64)
    polygons: dict[str, np.ndarray] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) < 7 or len(fields) % 2 == 0 or not fields[0].isdigit() or int(fields[0]) >= len(CLASSES):
            raise SegensError(f"{path}: line {number} is not 'class x1 y1 x2 y2 x3 y3 ...' with a class "
                              f"index below {len(CLASSES)}; delete the file to have it rewritten")
        polygons[CLASSES[int(fields[0])]] = np.asarray(fields[1:], dtype=np.float64).reshape(-1, 2) * scale
    return polygons


def write_fold_dataset(train: Sequence[ImageRecord], val: Sequence[ImageRecord], root: str | Path) -> Path:
    """Write (or bring up to date) a fold's YOLO data set under ``root`` and return its ``data.yaml``. Images are
    symlinked, never copied; entries of earlier runs that are no longer in the fold are removed."""
    root = Path(root).resolve()
    if not train or not val:
        raise SegensError(f"{root}: a fold needs training and validation images (got {len(train)} and {len(val)}); "
                          "check folds.json")
    for split, records in zip(SPLITS, (train, val)):
        stems = _write_split(records, root / split)
        lines = [str(root / split / "images" / f"{stem}{record.image_path.suffix}")
                 for stem, record in zip(stems, records)]
        _write_if_changed(root / f"{split}.txt", "\n".join(lines) + "\n")
    data_yaml = root / "data.yaml"
    document = {"path": str(root), "train": str(root / "train.txt"), "val": str(root / "val.txt"),
                "names": dict(enumerate(CLASSES))}
    _write_if_changed(data_yaml, yaml.safe_dump(document, sort_keys=False))
    return data_yaml


def _write_split(records: Sequence[ImageRecord], folder: Path) -> list[str]:
    """Link the images and write the labels of one split into ``folder``; return the flat keys in record order."""
    stems = [flat_key(record.key) for record in records]
    if len(set(stems)) != len(stems):
        duplicate = next(stem for stem in stems if stems.count(stem) > 1)
        raise SegensError(f"{folder}: two images map to the file name {duplicate!r} (an image key holds '__' or "
                          "is listed twice); rename the image folders or fix folds.json")
    images, labels = folder / "images", folder / "labels"
    images.mkdir(parents=True, exist_ok=True)
    labels.mkdir(parents=True, exist_ok=True)
    for stem, record in zip(stems, records):
        _link(images / f"{stem}{record.image_path.suffix}", record.image_path.resolve())
        _write_if_changed(labels / f"{stem}.txt", _label_text(record))
    _remove_stale(images, {f"{stem}{record.image_path.suffix}" for stem, record in zip(stems, records)})
    _remove_stale(labels, {f"{stem}.txt" for stem in stems})
    return stems


def _label_text(record: ImageRecord) -> str:
    """The YOLO label text of a record, after checking its polygons lie inside the image."""
    if record.label_path is None:
        raise SegensError(f"{record.image_path}: no label file; a training image needs outputs_json/<same path>.json")
    polygons = parse_label_json(record.label_path)
    height, width = image_size(record.image_path)
    check_points_inside(record.label_path, polygons, height, width)
    return yolo_label_text(polygons, height, width)


def _link(link: Path, target: Path) -> None:
    """Make ``link`` a symlink to ``target`` (replacing a link to anything else)."""
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink() or link.exists():
        link.unlink()
    try:
        link.symlink_to(target)
    except OSError as exc:
        raise SegensError(f"{link}: cannot create a symlink to {target} ({exc.strerror or exc}); "
                          "the YOLO data set needs a file system with symlinks") from None


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` atomically unless the file already holds it (keeps ultralytics' label cache valid)."""
    if path.is_file() and path.read_text() == text:
        return
    atomic_write_text(path, text)


def _remove_stale(folder: Path, keep: set[str]) -> None:
    """Delete files and links of ``folder`` whose names are not in ``keep``."""
    for entry in folder.iterdir():
        if entry.name not in keep and (entry.is_symlink() or entry.is_file()):
            entry.unlink()
