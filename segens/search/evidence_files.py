"""The OOF evidence of a search on disk: one ``.npz`` per batch of images holding every class's evidence, beside
the recipe in the search's resume folder, so that each store and label file is read once per search (not once per
class) and a killed search resumes without reading them again.

Files are written atomically and read with ``allow_pickle=False``; each is checked against the batch it must
hold (names, dtypes, shapes, index ranges). A file that fails is extracted again: whoever can write there can at
most make work be redone or scores be wrong, never run code or crash the search with a deep traceback.
"""

from __future__ import annotations

import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segens.conventions.classes import NUM_CLASSES
from segens.conventions.dataset import ImageRecord
from segens.infra.atomic import atomic_write
from segens.search.evidence import FIELDS, ClassEvidence, concatenate, extract_classes
from segens.store import ProbabilityStore

STORED = tuple("rows_of_image" if name == "image" else name for name in FIELDS)
"""What a batch file holds per class: the fields, with each image's row count in place of each row's image."""
BATCH_IMAGES = 32
"""Images per extraction task: a batch file of 29 classes holds about 4 MB per image at 5 members at 2048."""


def batches(images: int) -> list[range]:
    """The image index ranges extracted as one task each."""
    return [range(start, min(images, start + BATCH_IMAGES)) for start in range(0, images, BATCH_IMAGES)]


def batch_path(folder: Path, batch: range) -> Path:
    return folder / f"batch-{batch.start:06d}-{batch.stop:06d}.npz"


def extract_batch(stores: Sequence[ProbabilityStore], records: Sequence[ImageRecord],
                  thresholds: np.ndarray) -> dict[str, np.ndarray]:
    """Every class's evidence of ``records`` as the named arrays of a batch file (``"<channel>/<field>"``)."""
    evidence = extract_classes(stores, records, range(NUM_CLASSES), thresholds)
    arrays = {}
    for channel, item in evidence.items():
        for name in STORED:
            arrays[f"{channel}/{name}"] = (np.bincount(item.image, minlength=item.images).astype(np.int64)
                                           if name == "rows_of_image" else getattr(item, name))
    return arrays


def save_batch(folder: Path, batch: range, arrays: dict[str, np.ndarray], search: str) -> None:
    """Write a batch file atomically (uncompressed .npz, no pickled objects), naming the search it belongs to."""
    with atomic_write(batch_path(folder, batch), "wb") as handle:
        np.savez(handle, allow_pickle=False, search=np.frombuffer(search.encode(), np.uint8), **arrays)


@dataclass(frozen=True)
class ClassOnDisk:
    """Where one class's evidence lies: what a local worker needs to load it itself (the client then holds none)."""

    folder: Path
    channel: int
    images: int
    members: int

    def load(self) -> ClassEvidence:
        return load_class(self.folder, self.channel, self.images, self.members)


def valid_batch(folder: Path, batch: range, members: int, search: str) -> bool:
    """Whether the batch's file is there, belongs to the search ``search`` (its key) and holds every class's
    evidence of its images."""
    path = batch_path(folder, batch)
    try:
        if path.exists() and not path.is_file():  # a FIFO planted there would block np.load: extract again
            return False
        with np.load(path, allow_pickle=False) as archive:
            if archive["search"].dtype != np.uint8 or archive["search"].tobytes() != search.encode():
                return False
            for channel in range(NUM_CLASSES):
                _checked(channel, {name: archive[f"{channel}/{name}"] for name in STORED}, len(batch), members)
    except (OSError, KeyError, ValueError, zipfile.BadZipFile, EOFError):
        return False
    return True


def batch_search(folder: Path, batch: range) -> str | None:
    """The key of the search that the batch's file names (None: no readable file there), so a file of another
    search copied into this folder can be named in a note before it is extracted again."""
    path = batch_path(folder, batch)
    try:
        if not path.is_file():
            return None
        with np.load(path, allow_pickle=False) as archive:
            key = archive["search"]
            return key.tobytes().decode() if key.dtype == np.uint8 and key.ndim == 1 else None
    except (OSError, KeyError, ValueError, UnicodeDecodeError, zipfile.BadZipFile, EOFError):
        return None


def load_class(folder: Path, channel: int, images: int, members: int) -> ClassEvidence:
    """One class's evidence over all images, from the batch files (checked again as read)."""
    parts = []
    for batch in batches(images):
        with np.load(batch_path(folder, batch), allow_pickle=False) as archive:
            arrays = {name: archive[f"{channel}/{name}"] for name in STORED}
        parts.append(_checked(channel, arrays, len(batch), members))
    return concatenate(channel, parts)


def _checked(channel: int, arrays: dict[str, np.ndarray], images: int, members: int) -> ClassEvidence:
    """The evidence of one class of one batch; ValueError if any array does not fit a batch of ``images``."""
    rows = arrays["truth"].shape[0] if arrays["truth"].ndim == 1 else -1
    pixels = arrays["position"].shape[0] if arrays["position"].ndim == 1 else -1
    expected = {"values": (np.uint8, (members, rows)), "truth": (np.bool_, (rows,)), "count": (np.int64, (rows,)),
                "rows_of_image": (np.int64, (images,)), "position": (np.int32, (pixels,)), "row": (np.int32, (pixels,)),
                "fixed_positive": (np.int64, (images,)), "fixed_true_positive": (np.int64, (images,)),
                "truth_total": (np.int64, (images,)), "boxes": (np.int32, (images, 4)), "bits": (np.uint8, None),
                "bit_offsets": (np.int64, (images + 1,)), "member_counts": (np.int64, (images, members, 3)),
                "pixels": (np.int64, (images,))}
    for name, (dtype, shape) in expected.items():
        array = arrays[name]
        if array.dtype != dtype or (shape is not None and array.shape != shape) or (shape is None and array.ndim != 1):
            raise ValueError(f"{name}: {array.dtype} {array.shape}")
    rows_of_image = arrays.pop("rows_of_image")
    if np.any(rows_of_image < 0) or rows_of_image.sum() != rows:
        raise ValueError("row counts")
    evidence = ClassEvidence(channel, image=np.repeat(np.arange(images, dtype=np.int32), rows_of_image), **arrays)
    offsets, boxes, row = evidence.bit_offsets, evidence.boxes, evidence.row
    areas = np.where(boxes[:, 0] >= 0, (boxes[:, 1] - boxes[:, 0]).astype(np.int64) * (boxes[:, 3] - boxes[:, 2]), 0)
    if offsets[0] != 0 or offsets[-1] != evidence.bits.size \
            or np.any(np.diff(offsets) != 2 * ((areas + 7) // 8)) \
            or np.any((boxes[:, 0] >= 0) & ((boxes[:, 1] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 2]))):
        raise ValueError("boxes or bits out of range")
    if pixels and (row.min() < 0 or row.max() >= rows):
        raise ValueError("rows out of range")
    if np.any(np.bincount(row, minlength=rows) != evidence.count):
        raise ValueError("row counts")
    if pixels and (np.any(np.diff(evidence.image[row]) < 0) or evidence.position.min() < 0
                   or np.any(evidence.position >= areas[evidence.image[row]])):
        raise ValueError("positions out of range")
    return evidence
