"""The patients' ``meta_data.xlsx``: writing it in the competition's form and reading it back cleaned.

The file has one row per patient under Korean headers: ``ID`` (an integer, ``1`` for folder ``ID001``), ``나이``
(age), ``성별`` (sex, ``남``/``여``), ``체중(몸무게)`` (weight, kg), ``키(신장)`` (height, cm); the real file has
dirt (control characters such as ``_x0008_여``, stray spaces, numbers written as text, blank cells, a header-less
``Unnamed: 5`` column). :func:`read_metadata` returns English columns and says what it cleaned or dropped.
"""

from __future__ import annotations

import datetime
import io
import re
import unicodedata
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from segens.errors import SegensError

# Korean header -> English column, in file order.
COLUMNS: dict[str, str] = {"ID": "ID", "나이": "age", "성별": "sex", "체중(몸무게)": "weight", "키(신장)": "height"}
ENGLISH_COLUMNS: tuple[str, ...] = tuple(COLUMNS.values())
SEX_CODES: dict[str, str] = {
    "남": "M", "남자": "M", "남성": "M", "M": "M", "MALE": "M",
    "여": "F", "여자": "F", "여성": "F", "F": "F", "FEMALE": "F",
}
# Plausible ranges; values outside become NA (a typo such as a height of 1700 is not silently kept).
NUMERIC_RANGES: dict[str, tuple[float, float]] = {"age": (0.0, 120.0), "weight": (2.0, 300.0), "height": (40.0, 250.0)}
MAX_XLSX_BYTES = 32 << 20
MAX_XLSX_EXPANDED = 256 << 20
_FIXED_TIME = datetime.datetime(2022, 8, 1)  # xlsx timestamps, so the same rows give the same bytes
_EXCEL_ESCAPE = re.compile(r"_x[0-9A-Fa-f]{4}_")
_XML_ILLEGAL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)?")
_PATIENT_ID = re.compile(r"^(?:ID)?0*(\d+)$", re.IGNORECASE)


def write_metadata(path: str | Path, rows: Iterable[Mapping[str, object]]) -> Path:
    """Write ``meta_data.xlsx``: one row per mapping, keyed by Korean headers or English names (``ID``, ``age``,
    ``sex``, ``weight``, ``height``); values go in as given (dirty ones included), missing keys as blank cells."""
    import openpyxl

    english_to_korean = {english: korean for korean, english in COLUMNS.items()}
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    sheet.append(list(COLUMNS))
    for row in rows:
        values = {english_to_korean.get(key, key): value for key, value in row.items()}
        unknown = sorted(set(values) - set(COLUMNS))
        if unknown:
            raise SegensError(f"{path}: unknown metadata field(s) {unknown}; "
                              f"use {list(COLUMNS)} or {list(ENGLISH_COLUMNS)}")
        sheet.append([_cell_value(values.get(header)) for header in COLUMNS])
    workbook.properties.created = workbook.properties.modified = _FIXED_TIME
    buffer = io.BytesIO()
    from openpyxl.writer.excel import ExcelWriter

    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        ExcelWriter(workbook, archive).save()  # save_workbook would stamp the current time
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_fixed_zip_times(buffer.getvalue()))
    return path


def _cell_value(value: object) -> object:
    """NaN/NA -> blank cell; numpy scalars -> Python ones; control characters (which the xlsx XML cannot hold)
    -> Excel's ``_xHHHH_`` escapes, which is how the real file came to hold ``_x0008_여``."""
    if value is None or (not isinstance(value, str) and pd.isna(value)):
        return None
    if isinstance(value, str):
        return _XML_ILLEGAL.sub(lambda match: f"_x{ord(match.group()):04X}_", value)
    return value.item() if isinstance(value, np.generic) else value


def _fixed_zip_times(data: bytes) -> bytes:
    """Rewrite a zip archive with every member dated ``_FIXED_TIME``, for byte-identical files."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as target:
        for info in source.infolist():
            member = zipfile.ZipInfo(info.filename, date_time=_FIXED_TIME.timetuple()[:6])
            member.compress_type = zipfile.ZIP_DEFLATED
            target.writestr(member, source.read(info.filename))
    return out.getvalue()


def read_metadata(path: str | Path) -> tuple[pd.DataFrame, list[str]]:
    """Read and clean ``meta_data.xlsx``: a frame with columns ``ID`` (string ``"ID001"``), ``age``, ``sex``
    (string ``"M"``/``"F"`` or NA), ``weight``, ``height`` (float64, NaN when missing or unparseable), in file
    order, plus notes on what was cleaned or dropped. An unreadable file or one without an ID column raises a
    SegensError naming it."""
    path = Path(path)
    raw = _read_sheet(path)
    notes: list[str] = []
    raw = _select_columns(raw, path, notes)
    empty = raw.map(_is_blank).all(axis=1)
    if empty.any():
        notes.append(f"{path.name}: dropped {int(empty.sum())} empty row(s) "
                     f"(spreadsheet rows {_rows(raw.index[empty])})")
    raw = raw[~empty]

    ids = [_patient_id(value) for value in raw["ID"]]
    bad = [index for index, value in zip(raw.index, ids) if value is None]
    if bad:
        notes.append(f"{path.name}: dropped {len(bad)} row(s) whose ID is not a patient number "
                     f"(spreadsheet rows {_rows(bad)}: {[raw.at[i, 'ID'] for i in bad]})")
    keep = [value is not None for value in ids]
    raw, ids = raw.loc[np.asarray(keep, dtype=bool)], [value for value in ids if value is not None]
    seen: set[str] = set()
    duplicated = []
    for value in ids:
        duplicated.append(value in seen)
        seen.add(value)
    if any(duplicated):
        repeated = sorted({value for value, dup in zip(ids, duplicated) if dup})
        notes.append(f"{path.name}: dropped {sum(duplicated)} row(s) repeating an earlier ID "
                     f"({', '.join(repeated)}); the first row of each ID is kept")
    raw = raw.loc[~np.asarray(duplicated, dtype=bool)]
    ids = [value for value, dup in zip(ids, duplicated) if not dup]

    clean = pd.DataFrame({"ID": pd.array(ids, dtype="string")})
    clean["age"], clean["weight"], clean["height"] = (
        _numeric_column(raw[name].tolist(), ids, name, path, notes) for name in ("age", "weight", "height"))
    clean["sex"] = _sex_column(raw["sex"].tolist(), ids, path, notes)
    return clean[list(ENGLISH_COLUMNS)], notes


def _read_sheet(path: Path) -> pd.DataFrame:
    """The first sheet as strings/numbers (object dtype), or a SegensError naming the file."""
    if not path.is_file():
        raise SegensError(f"{path}: metadata file not found; it should be ROOT/meta_data.xlsx")
    _check_archive(path)
    try:
        frame = pd.read_excel(path, engine="openpyxl", dtype=object)
    except Exception as exc:  # openpyxl raises many types for a damaged archive or XML
        raise SegensError(f"{path}: not a readable .xlsx file ({type(exc).__name__}: {exc}); "
                          "re-save it from a spreadsheet program") from None
    frame.index = frame.index + 2  # spreadsheet row numbers: the header is row 1
    return frame


def _check_archive(path: Path) -> None:
    """Refuse, before parsing, an .xlsx (a zip archive) larger than MAX_XLSX_BYTES or expanding to more than
    MAX_XLSX_EXPANDED bytes (a zip bomb); the real file is a few KB."""
    size = path.stat().st_size
    if size > MAX_XLSX_BYTES:
        raise SegensError(f"{path}: {size:,} bytes, more than the {MAX_XLSX_BYTES:,} segens reads for metadata; "
                          "is it the right file?")
    try:
        with zipfile.ZipFile(path) as archive:
            expanded = sum(member.file_size for member in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise SegensError(f"{path}: not a readable .xlsx file ({type(exc).__name__}: {exc}); "
                          "re-save it from a spreadsheet program") from None
    if expanded > MAX_XLSX_EXPANDED:
        raise SegensError(f"{path}: the .xlsx expands to {expanded:,} bytes, more than the {MAX_XLSX_EXPANDED:,} "
                          "segens reads for metadata; re-save it with only the patients' sheet")


def _select_columns(raw: pd.DataFrame, path: Path, notes: list[str]) -> pd.DataFrame:
    """Rename known headers (Korean or English, whitespace and control characters ignored) to English; drop the
    rest with a note; add missing optional columns as blanks. No ID column -> SegensError."""
    lookup = {_clean_text(k).casefold(): v for k, v in COLUMNS.items()}
    lookup.update({v.casefold(): v for v in ENGLISH_COLUMNS})
    renamed: dict[object, str] = {}
    for column in raw.columns:
        target = lookup.get(_clean_text(str(column)).casefold())
        if target and target not in renamed.values():
            renamed[column] = target
            continue
        filled = int((~raw[column].map(_is_blank)).sum())
        why = "no header" if str(column).startswith("Unnamed") else "not a metadata field"
        notes.append(f"{path.name}: dropped column {str(column)!r} ({why}; {filled} non-empty value(s))")
    if "ID" not in renamed.values():
        raise SegensError(f"{path}: no 'ID' column (headers: {[str(c) for c in raw.columns]}); "
                          f"expected {list(COLUMNS)}")
    frame = raw[list(renamed)].rename(columns=renamed)
    for name in ENGLISH_COLUMNS:
        if name not in frame:
            notes.append(f"{path.name}: no {name!r} column; filled with NA")
            frame[name] = None
    return frame


def _numeric_column(values: list, ids: list[str], name: str, path: Path, notes: list[str]) -> np.ndarray:
    """Floats for one numeric column; text with a single number in it is read, the rest become NaN (noted)."""
    out = np.full(len(values), np.nan)
    from_text, missing, unparseable, implausible = [], [], [], []
    low, high = NUMERIC_RANGES[name]
    for i, (value, patient) in enumerate(zip(values, ids)):
        if _is_blank(value):
            missing.append(patient)
            continue
        number = _to_number(value)
        if number is None:
            unparseable.append(f"{patient}={value!r}")
        elif not low <= number <= high:
            implausible.append(f"{patient}={value!r}")
        else:
            out[i] = number
            if isinstance(value, str):
                from_text.append(f"{patient}={value!r}")
    _note(notes, path, name, "read from text", from_text)
    _note(notes, path, name, "missing, left NA", missing)
    _note(notes, path, name, "not a number, set to NA", unparseable)
    _note(notes, path, name, f"outside {low:g}..{high:g}, set to NA", implausible)
    return out


def _sex_column(values: list, ids: list[str], path: Path, notes: list[str]) -> pd.api.extensions.ExtensionArray:
    """``"M"``/``"F"``/NA for the sex column; control characters and spaces stripped, 남 -> M, 여 -> F (noted)."""
    out: list[str | None] = []
    cleaned, missing, unknown = [], [], []
    for value, patient in zip(values, ids):
        if _is_blank(value):
            missing.append(patient)
            out.append(None)
            continue
        text = _clean_text(str(value))
        code = SEX_CODES.get(text.upper())
        if code is None:
            unknown.append(f"{patient}={value!r}")
        elif text != str(value):
            cleaned.append(f"{patient}={value!r}")
        out.append(code)
    _note(notes, path, "sex", "control characters or spaces removed", cleaned)
    _note(notes, path, "sex", "missing, left NA", missing)
    _note(notes, path, "sex", f"not one of {sorted(set(SEX_CODES))}, set to NA", unknown)
    return pd.array(out, dtype="string")


def _note(notes: list[str], path: Path, column: str, what: str, items: list[str]) -> None:
    if items:
        notes.append(f"{path.name}: {column}: {len(items)} value(s) {what}: {', '.join(items)}")


def _clean_text(text: str) -> str:
    """Drop Excel ``_xHHHH_`` escapes and control/format characters, then surrounding whitespace."""
    text = _EXCEL_ESCAPE.sub("", text)
    text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C")
    return text.strip()


def _to_number(value: object) -> float | None:
    """A float from a number, or from text holding exactly one number (``"172cm"``, ``" 65,5 "``); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        return float(value) if np.isfinite(value) else None
    found = _NUMBER.findall(_clean_text(str(value)))
    return float(found[0].replace(",", ".")) if len(found) == 1 else None


def _patient_id(value: object) -> str | None:
    """``"ID007"`` from ``7``, ``7.0``, ``"7"``, ``"ID007"``; None when it is not a positive patient number."""
    if _is_blank(value) or isinstance(value, bool):
        return None
    if isinstance(value, (float, np.floating)):
        if not float(value).is_integer():
            return None
        value = int(value)
    match = _PATIENT_ID.match(_clean_text(str(value)))
    if not match or int(match.group(1)) == 0:
        return None
    return f"ID{int(match.group(1)):03d}"


def _is_blank(value: object) -> bool:
    """None, NaN, or text that is empty once control characters and spaces are removed."""
    if value is None:
        return True
    if isinstance(value, str):
        return _clean_text(value) == ""
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _rows(index: Iterable) -> str:
    return ", ".join(str(i) for i in index)
