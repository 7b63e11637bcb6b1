"""Data-root discovery and image reading for the competition layout.

``ROOT/train/DCM/IDxxx/<name>.png`` pairs with ``ROOT/train/outputs_json/IDxxx/<name>.json`` by relative path;
``ROOT/test/DCM`` holds the test images (``ROOT/test/outputs_json``, when present, their labels for scoring).
An image's key is its relative path without extension (``ID001/image1661130828152_R``); names are never split
on ``_``. Sorting is by the relative path with extension, as the competition's sample submission is.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from segens.conventions.labels import read_label_mask
from segens.errors import SegensError
from segens.infra.safeload import require_regular

IMAGE_DIR = "DCM"
LABEL_DIR = "outputs_json"
SPLITS = ("train", "test")
MAX_IMAGE_SIDE = 16384
"""Largest image side read (pixels): 2048 in the competition; a 16384^2 (29, H, W) uint8 store is 7.8 GB."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class ImageRecord:
    """One image of a split: its key, file paths and (if any) label file."""

    key: str  # relpath without extension, POSIX separators: "ID001/image1661130828152"
    image_path: Path
    label_path: Path | None

    @property
    def name(self) -> str:
        """The file name as the submission writes it (no folder): ``image1661130828152.png``."""
        return self.image_path.name

    @property
    def relpath(self) -> str:
        """Relative path with extension, ``ID001/image1661130828152.png``: the competition's sort key."""
        return f"{self.key.rsplit('/', 1)[0]}/{self.name}" if "/" in self.key else self.name

    @property
    def patient(self) -> str:
        """The patient folder (``ID001``): both hands of one patient share it."""
        return self.key.split("/", 1)[0]


@dataclass
class SplitListing:
    """The images of one split, sorted in submission order, and what could not be paired."""

    root: Path
    split: str
    records: list[ImageRecord]
    images_without_labels: list[Path] = field(default_factory=list)
    labels_without_images: list[Path] = field(default_factory=list)

    def by_key(self) -> dict[str, ImageRecord]:
        return {record.key: record for record in self.records}

    def by_name(self) -> dict[str, ImageRecord]:
        """File name -> record; raises if two folders hold the same file name (the CSV could not tell them apart)."""
        names: dict[str, ImageRecord] = {}
        for record in self.records:
            if record.name in names:
                raise SegensError(
                    f"{self.root}/{self.split}: file name {record.name} appears in both "
                    f"{names[record.name].patient} and {record.patient}; submission rows could not tell them apart"
                )
            names[record.name] = record
        return names


def check_unique_file_names(keys: Iterable[str], where: str | Path, suffix: str = ".png") -> None:
    """Image keys (``ID001/name``) must have distinct file names (``name`` + ``suffix``): a submission row names
    an image by its file name only, so two patients' ``name.png`` would give duplicate rows. A SegensError
    naming ``where`` and both images otherwise."""
    seen: dict[str, str] = {}
    for key in keys:
        name = key.rsplit("/", 1)[-1] + suffix
        if name in seen:
            raise SegensError(f"{where}: images {seen[name]} and {key} share the file name {name}; submission rows "
                              "name images by file name only, so they could not be told apart: rename one of them")
        seen[name] = key


def _keys(folder: Path, suffix: str) -> dict[str, Path]:
    return {p.relative_to(folder).with_suffix("").as_posix(): p for p in folder.rglob(f"*{suffix}") if p.is_file()}


def discover(root: str | Path, split: str = "train", require_labels: bool | None = None) -> SplitListing:
    """List a split's images, paired with labels by relative path.

    ``require_labels`` (default: True for train) makes images without labels an error rather than a report.
    """
    root = Path(root)
    if split not in SPLITS:
        raise SegensError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    image_folder = root / split / IMAGE_DIR
    if not image_folder.is_dir():
        raise SegensError(
            f"{image_folder}: not found; a data root holds {split}/{IMAGE_DIR}/IDxxx/<name>.png "
            "(make one with `ens synth`)"
        )
    images = _keys(image_folder, ".png")
    if not images:
        raise SegensError(f"{image_folder}: no .png images found")
    labels_folder = root / split / LABEL_DIR
    labels = _keys(labels_folder, ".json") if labels_folder.is_dir() else {}
    ordered = sorted(images, key=lambda key: images[key].relative_to(image_folder).as_posix())
    check_unique_file_names(ordered, image_folder)
    records = [ImageRecord(key, images[key], labels.get(key)) for key in ordered]
    listing = SplitListing(
        root=root,
        split=split,
        records=records,
        images_without_labels=[images[k] for k in ordered if k not in labels] if labels else [],
        labels_without_images=sorted(labels[k] for k in labels if k not in images),
    )
    if require_labels is None:
        require_labels = split == "train"
    if require_labels and (listing.images_without_labels or not labels):
        missing = listing.images_without_labels or [images[k] for k in ordered]
        raise SegensError(
            f"{labels_folder}: {len(missing)} image(s) have no label file, first {missing[0]}; "
            f"each image needs {split}/{LABEL_DIR}/<same relative path>.json"
        )
    return listing


def read_image(path: str | Path, color: str = "gray") -> np.ndarray:
    """Read an image as (H, W) uint8 grayscale (``color="gray"``: colour images are converted) or (H, W, 3) uint8
    in ``"bgr"`` (what ``cv2.imread(path)`` gives; gray images repeated) or ``"rgb"`` order; 16-bit is scaled to
    8-bit. The header is checked first (``image_size``): a side over MAX_IMAGE_SIDE is refused before decoding."""
    path = Path(path)
    image_size(path)
    image = cv2.imread(str(require_regular(path, "image")), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise SegensError(f"{path}: not a readable image; replace or remove it")
    if image.dtype == np.uint16:
        image = (image // 257).astype(np.uint8)
    if color == "gray":
        if image.ndim == 3:
            image = cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY if image.shape[2] == 4 else cv2.COLOR_BGR2GRAY)
        return np.ascontiguousarray(image)
    if image.ndim == 2:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    elif image.shape[2] == 4:
        image = cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return np.ascontiguousarray(image[:, :, ::-1] if color == "rgb" else image)


def image_size(path: str | Path) -> tuple[int, int]:
    """(height, width) of an image from its header alone (PNG's IHDR; other formats through Pillow's lazy
    open); a SegensError naming the file if it is unreadable or a side is 0 or over MAX_IMAGE_SIDE."""
    path = Path(path)
    try:
        with open(require_regular(path, "image"), "rb") as handle:
            header = handle.read(24)
    except FileNotFoundError:
        raise SegensError(f"{path}: file not found; replace or remove it") from None
    except OSError as exc:
        raise SegensError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if header[:8] == PNG_SIGNATURE:
        if len(header) < 24 or header[12:16] != b"IHDR":
            raise SegensError(f"{path}: not a readable image (a PNG without its IHDR header); replace or remove it")
        height, width = int.from_bytes(header[20:24], "big"), int.from_bytes(header[16:20], "big")
    else:
        height, width = _other_format_size(path)
    if not (0 < height <= MAX_IMAGE_SIDE and 0 < width <= MAX_IMAGE_SIDE):
        raise SegensError(f"{path}: its header claims {width}x{height} pixels; segens reads images with sides from 1 "
                          f"to {MAX_IMAGE_SIDE}; replace or remove it")
    return height, width


def _other_format_size(path: Path) -> tuple[int, int]:
    """(height, width) of a non-PNG image from its header (Pillow reads only the header on open)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the side bound is checked by the caller
            with Image.open(path) as image:
                width, height = image.size
    except Image.DecompressionBombError as exc:
        raise SegensError(f"{path}: its header claims too many pixels ({exc}); replace or remove it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, ImportError):
        # ImportError: once ultralytics is imported, its patched Image.open tries an optional HEIF plugin for any
        # file Pillow cannot identify, and that plugin is not installed
        raise SegensError(f"{path}: not a readable image; replace or remove it") from None
    return height, width


def read_record_mask(record: ImageRecord) -> np.ndarray:
    """The (29, H, W) bool ground truth of a labelled image, at the image's own size."""
    if record.label_path is None:
        raise SegensError(f"{record.image_path}: no label file; cannot score this image")
    height, width = image_size(record.image_path)
    return read_label_mask(record.label_path, height, width)
