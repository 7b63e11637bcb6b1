"""The submission CSV: columns ``image_name,class,rle``; image_name is the file name only; rows in sorted
``IDxxx/name`` order, then class order; an empty mask is an empty field. The only CSV reader and writer.

Rows are matched by (image_name, class), never by position.
"""

from __future__ import annotations

import codecs
import csv
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from segens.conventions.classes import CLASS_TO_INDEX, CLASSES
from segens.errors import SegensError
from segens.infra.atomic import atomic_write
from segens.infra.safeload import require_regular

HEADER = ("image_name", "class", "rle")
MAX_FIELD_CHARS = 1 << 28
"""Longest CSV field read (256 Mi characters): a checkerboard-like 2048x2048 mask's RLE is about 20 MB."""


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
    """Parse a submission CSV; wrong header, unknown class or duplicate (image_name, class) is a SegensError.

    UTF-8 with or without a BOM (Excel writes one); other bytes are an error giving the byte offset. Fields up to
    MAX_FIELD_CHARS are read (an RLE of a checkerboard-like 2048x2048 mask is about 20 MB, above the csv module's
    default limit)."""
    path = Path(path)
    try:
        handle = open(require_regular(path, "submission"), newline="", encoding="utf-8-sig")
    except OSError as exc:
        raise SegensError(f"{path}: cannot open submission ({exc.strerror or exc})") from None
    if csv.field_size_limit() < MAX_FIELD_CHARS:
        csv.field_size_limit(MAX_FIELD_CHARS)
    rles: dict[str, list[str | None]] = {}
    reader = csv.reader(handle)
    try:
        with handle:
            header = next(reader, None)
            if header is None or tuple(h.strip() for h in header) != HEADER:
                raise SegensError(f"{path}: header must be {','.join(HEADER)}, found {str(header)[:200]}")
            for line, row in enumerate(reader, start=2):
                _add_row(rles, row, f"{path}:{line}")
    except UnicodeDecodeError:
        offset, byte = _bad_utf8_byte(path)
        raise SegensError(f"{path}: not UTF-8 text (byte {offset}: {byte!r}); save the CSV as UTF-8") from None
    except csv.Error as exc:
        raise SegensError(f"{path}:{reader.line_num}: not a readable CSV row ({exc}); "
                          "is this a submission CSV?") from None
    except OSError as exc:
        raise SegensError(f"{path}: cannot read submission ({exc.strerror or exc})") from None
    return Submission(path, rles)


def _add_row(rles: dict[str, list[str | None]], row: list[str], where: str) -> None:
    """Put one CSV row (image_name, class, rle) into ``rles``; a SegensError naming ``where`` if it is wrong."""
    if len(row) != 3:
        raise SegensError(f"{where}: expected 3 fields (image_name,class,rle), found {len(row)}")
    image_name, class_name, rle = row
    index = CLASS_TO_INDEX.get(class_name)
    if index is None:
        raise SegensError(f"{where}: unknown class {class_name[:100]!r}")
    slots = rles.setdefault(image_name, [None] * len(CLASSES))
    if slots[index] is not None:
        raise SegensError(f"{where}: duplicate row for image {image_name}, class {class_name}")
    slots[index] = rle


def _bad_utf8_byte(path: Path) -> tuple[int, bytes]:
    """The file offset and value of the first byte that is not valid UTF-8 (read in blocks, never all at once)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    with open(path, "rb") as handle:
        while True:
            block = handle.read(1 << 20)
            pending = len(decoder.getstate()[0])  # bytes of an incomplete character carried from the last block
            try:
                decoder.decode(block, final=not block)
            except UnicodeDecodeError as exc:
                position = offset - pending + exc.start
                handle.seek(position)
                return position, handle.read(1)
            if not block:
                return offset, b""
            offset += len(block)
