"""The submission CSV: columns ``image_name,class,rle``; image_name is the file name only; rows in sorted
``IDxxx/name`` order, then class order; an empty mask is an empty field. The only CSV reader and writer.

Rows are matched by (image_name, class), never by position.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from segens.atomic import atomic_write
from segens.classes import CLASS_TO_INDEX, CLASSES
from segens.errors import SegensError

HEADER = ("image_name", "class", "rle")


def write_submission(path: str | Path, rows: Iterable[tuple[str, str, str]]) -> int:
    """Write rows (image_name, class, rle) atomically, byte-identical to pandas ``to_csv(index=False)``;
    returns the row count."""
    count = 0
    with atomic_write(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(HEADER)
        for row in rows:
            writer.writerow(row)
            count += 1
    return count


def image_rows(image_name: str, rles: list[str]) -> list[tuple[str, str, str]]:
    """The 29 rows of one image in class order."""
    if len(rles) != len(CLASSES):
        raise ValueError(f"{image_name}: expected {len(CLASSES)} RLE strings, got {len(rles)}")
    return [(image_name, name, rle) for name, rle in zip(CLASSES, rles)]


@dataclass
class Submission:
    """A parsed submission: image_name -> 29 RLE strings in class order (None where a row is missing)."""

    path: Path
    rles: dict[str, list[str | None]]

    def image(self, image_name: str) -> list[str]:
        """The 29 RLE strings of one image; a missing image or class row is a SegensError."""
        if image_name not in self.rles:
            raise SegensError(f"{self.path}: no rows for image {image_name}")
        rles = self.rles[image_name]
        missing = [CLASSES[i] for i, rle in enumerate(rles) if rle is None]
        if missing:
            raise SegensError(f"{self.path}: image {image_name} has no row for class(es) {', '.join(missing)}")
        return rles  # type: ignore[return-value]


def read_submission(path: str | Path) -> Submission:
    """Parse a submission CSV; wrong header, unknown class or duplicate (image_name, class) is a SegensError."""
    path = Path(path)
    try:
        handle = open(path, newline="", encoding="utf-8")
    except OSError as exc:
        raise SegensError(f"{path}: cannot open submission ({exc.strerror or exc})") from None
    rles: dict[str, list[str | None]] = {}
    with handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if header is None or tuple(h.strip() for h in header) != HEADER:
            raise SegensError(f"{path}: header must be {','.join(HEADER)}, found {header}")
        for line, row in enumerate(reader, start=2):
            if len(row) != 3:
                raise SegensError(f"{path}:{line}: expected 3 fields (image_name,class,rle), found {len(row)}")
            image_name, class_name, rle = row
            index = CLASS_TO_INDEX.get(class_name)
            if index is None:
                raise SegensError(f"{path}:{line}: unknown class {class_name!r}")
            slots = rles.setdefault(image_name, [None] * len(CLASSES))
            if slots[index] is not None:
                raise SegensError(f"{path}:{line}: duplicate row for image {image_name}, class {class_name}")
            slots[index] = rle
    return Submission(path, rles)
