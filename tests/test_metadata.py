"""meta_data.xlsx: the written form (Korean headers, integer IDs), cleaning on read, and errors naming the file."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import openpyxl
import pandas as pd
import pytest

from segens.conventions.metadata import read_metadata, write_metadata
from segens.errors import SegensError

KOREAN = ["ID", "나이", "성별", "체중(몸무게)", "키(신장)"]


def test_clean_rows_round_trip_without_notes(tmp_path: Path) -> None:
    path = write_metadata(tmp_path / "meta_data.xlsx", [
        {"ID": 1, "age": 30, "sex": "남", "weight": 70, "height": 175.5},
        {"ID": 2, "나이": 41, "성별": "여", "체중(몸무게)": 52.5, "키(신장)": 160},
    ])
    raw = pd.read_excel(path, engine="openpyxl")
    assert list(raw.columns) == KOREAN and raw["ID"].tolist() == [1, 2]
    frame, notes = read_metadata(path)
    assert notes == []
    assert list(frame.columns) == ["ID", "age", "sex", "weight", "height"]
    assert frame["ID"].tolist() == ["ID001", "ID002"] and frame["sex"].tolist() == ["M", "F"]
    assert frame["age"].tolist() == [30.0, 41.0] and frame["weight"].tolist() == [70.0, 52.5]
    assert frame["height"].tolist() == [175.5, 160.0]
    assert all(frame[c].dtype == np.float64 for c in ("age", "weight", "height"))


def test_dirty_values_are_cleaned_and_reported(tmp_path: Path) -> None:
    path = write_metadata(tmp_path / "meta_data.xlsx", [
        {"ID": 1, "나이": 30, "성별": "_x0008_여", "체중(몸무게)": 50, "키(신장)": 158},
        {"ID": 2, "나이": "45세", "성별": " 남", "체중(몸무게)": None, "키(신장)": "172cm"},
        {"ID": 3, "나이": 29, "성별": "여\t", "체중(몸무게)": 1700, "키(신장)": "unknown"},
        {"ID": 4, "나이": 33, "성별": "?", "체중(몸무게)": 80, "키(신장)": 181},
        {"ID": 5, "나이": 52, "성별": "\x08남", "체중(몸무게)": 61, "키(신장)": 169},  # written as _x0008_남
    ])
    assert pd.read_excel(path, engine="openpyxl")["성별"].iloc[4] == "_x0008_남"
    frame, notes = read_metadata(path)
    assert frame["sex"].iloc[:3].tolist() == ["F", "M", "F"] and pd.isna(frame["sex"].iloc[3])
    assert frame["sex"].iloc[4] == "M"
    assert frame["age"].tolist() == [30.0, 45.0, 29.0, 33.0, 52.0]
    assert frame["height"].iloc[1] == 172.0 and np.isnan(frame["height"].iloc[2])
    assert np.isnan(frame["weight"].iloc[1]) and np.isnan(frame["weight"].iloc[2])
    text = "\n".join(notes)
    for expected in ("sex: 4 value(s) control characters or spaces removed", "ID001='_x0008_여'",
                     "weight: 1 value(s) missing, left NA: ID002", "height: 1 value(s) read from text: ID002='172cm'",
                     "height: 1 value(s) not a number, set to NA: ID003='unknown'",
                     "weight: 1 value(s) outside 2..300, set to NA: ID003=1700", "ID004='?'"):
        assert expected in text, (expected, notes)


def test_bad_rows_and_stray_columns_are_dropped_with_notes(tmp_path: Path) -> None:
    path = tmp_path / "meta_data.xlsx"
    workbook = openpyxl.Workbook()
    sheet = workbook.active
    for row in (KOREAN, [1, 30, "남", 70, 175], [None, None, None, None, None], ["abc", 40, "여", 50, 160],
                ["ID002", 50, "여", 55, 158], [2, 51, "여", 56, 159], [3.0, 60, "남", 80, 180, " "]):
        sheet.append(row)
    workbook.save(path)
    frame, notes = read_metadata(path)
    assert frame["ID"].tolist() == ["ID001", "ID002", "ID003"]
    assert frame["age"].tolist() == [30.0, 50.0, 60.0]  # the first row of a repeated ID wins
    text = "\n".join(notes)
    assert "dropped column 'Unnamed: 5' (no header" in text
    assert "dropped 1 empty row(s) (spreadsheet rows 3)" in text
    assert "ID is not a patient number (spreadsheet rows 4" in text
    assert "repeating an earlier ID (ID002)" in text


def test_missing_optional_column_becomes_na(tmp_path: Path) -> None:
    path = tmp_path / "meta.xlsx"
    pd.DataFrame({"ID": [5], "성별": ["남"]}).to_excel(path, index=False)
    frame, notes = read_metadata(path)
    assert frame["ID"].tolist() == ["ID005"] and frame["age"].isna().all()
    assert any("no 'height' column" in note for note in notes)


def test_header_only_file_gives_an_empty_frame(tmp_path: Path) -> None:
    frame, notes = read_metadata(write_metadata(tmp_path / "meta_data.xlsx", []))
    assert list(frame.columns) == ["ID", "age", "sex", "weight", "height"] and len(frame) == 0 and notes == []


@pytest.mark.parametrize("content", [b"not a spreadsheet", b"PK\x03\x04 truncated zip"])
def test_malformed_file_raises_naming_it(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "meta_data.xlsx"
    path.write_bytes(content)
    with pytest.raises(SegensError, match=rf"{re.escape(str(path))}: not a readable \.xlsx file"):
        read_metadata(path)


def test_missing_file_and_missing_id_column_raise_naming_the_file(tmp_path: Path) -> None:
    with pytest.raises(SegensError, match=r"absent\.xlsx: metadata file not found; it should be ROOT/meta_data\.xlsx"):
        read_metadata(tmp_path / "absent.xlsx")
    path = tmp_path / "no_id.xlsx"
    pd.DataFrame({"나이": [3]}).to_excel(path, index=False)
    with pytest.raises(SegensError, match=f"{path}: no 'ID' column"):
        read_metadata(path)


def test_writing_is_deterministic_and_rejects_unknown_fields(tmp_path: Path) -> None:
    rows = [{"ID": 1, "age": 30, "sex": "남", "weight": 70, "height": 175}]
    first = write_metadata(tmp_path / "a.xlsx", rows).read_bytes()
    assert write_metadata(tmp_path / "b.xlsx", rows).read_bytes() == first
    with zipfile.ZipFile(tmp_path / "a.xlsx") as archive:
        assert {info.date_time for info in archive.infolist()} == {(2022, 8, 1, 0, 0, 0)}
    with pytest.raises(SegensError, match="unknown metadata field"):
        write_metadata(tmp_path / "c.xlsx", [{"ID": 1, "shoe size": 44}])
