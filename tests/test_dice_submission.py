"""Dice as the competition computes it; the submission CSV format; scoring a CSV against a data root."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from segens.conventions.classes import CLASSES
from segens.conventions.dataset import discover, read_record_mask
from segens.conventions.dice import DiceTable, dice_per_class
from segens.conventions.rle import encode_stack
from segens.conventions.submission import image_rows, read_submission, write_submission
from segens.ensemble.evaluate import evaluate_submission
from segens.errors import SegensError
from segens.reference import reference_dice


def test_dice_matches_reference_including_empty_cases() -> None:
    rng = np.random.default_rng(0)
    pred = rng.random((29, 17, 23)) < 0.3
    truth = rng.random((29, 17, 23)) < 0.3
    pred[0] = truth[0] = False  # both empty: (0 + eps) / (0 + eps) = 1
    pred[1] = False  # missed class: eps / (|B| + eps), about 0
    np.testing.assert_allclose(dice_per_class(pred, truth), reference_dice(pred, truth), rtol=0, atol=1e-15)
    scores = dice_per_class(pred, truth)
    assert scores[0] == 1.0 and scores[1] < 1e-5


def test_dice_table_averages_images_then_classes() -> None:
    table = DiceTable(classes=("a", "b"))
    table.add("img1", np.array([1.0, 0.0]))
    table.add("img2", np.array([0.5, 1.0]))
    np.testing.assert_allclose(table.per_class(), [0.75, 0.5])
    assert table.mean() == pytest.approx(0.625)
    with pytest.raises(ValueError, match=r"img3: expected 2 class scores, got shape \(1,\)"):
        table.add("img3", np.array([1.0]))


def _rows_for(root: Path, split: str) -> list[tuple[str, str, str]]:
    rows = []
    for record in discover(root, split).records:
        rows.extend(image_rows(record.name, encode_stack(read_record_mask(record))))
    return rows


def test_csv_is_byte_identical_to_pandas_and_keeps_the_given_row_order(tiny_root: Path, tmp_path: Path) -> None:
    """The writer formats rows exactly as pandas does and never reorders them: the competition's order (images by
    relative path with extension, then class order) is made by whoever lists the images (discover, combine; see
    test_conventions and test_combine), so rows given in another order are written in that order."""
    rows = _rows_for(tiny_root, "train")
    ours = tmp_path / "ours.csv"
    assert write_submission(ours, rows) == 4 * 29
    theirs = tmp_path / "pandas.csv"
    pd.DataFrame(rows, columns=["image_name", "class", "rle"]).to_csv(theirs, index=False)
    assert ours.read_bytes() == theirs.read_bytes()
    frame = pd.read_csv(ours, keep_default_na=False)
    assert list(frame["image_name"][::29]) == ["image1661130828152_R.png", "image1661130828153.png",
                                               "image1661130900000.png", "image1661130900001_L.png"]
    assert list(frame["class"][:29]) == list(CLASSES)
    shuffled = [rows[i] for i in np.random.default_rng(0).permutation(len(rows))]
    write_submission(ours, shuffled)
    pd.DataFrame(shuffled, columns=["image_name", "class", "rle"]).to_csv(theirs, index=False)
    assert ours.read_bytes() == theirs.read_bytes()
    assert [tuple(row) for row in pd.read_csv(ours, keep_default_na=False).itertuples(index=False)] == shuffled


def test_empty_mask_is_empty_field(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    write_submission(path, image_rows("a.png", [""] * 29))
    assert path.read_text().splitlines()[1] == "a.png,finger-1,"
    assert read_submission(path).image("a.png") == [""] * 29


def test_evaluate_is_matched_by_name_not_row_position(tiny_root: Path, tmp_path: Path) -> None:
    rows = _rows_for(tiny_root, "test")
    path = tmp_path / "shuffled.csv"
    write_submission(path, reversed(rows))
    table = evaluate_submission(path, tiny_root, "test")
    assert table.mean() == 1.0 and len(table.scores) == 2


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda rows: rows[:-1], "no row for class"),
        (lambda rows: rows + rows[:1], "duplicate row"),
        (lambda rows: [(rows[0][0], "Femur", "")] + rows[1:], "unknown class 'Femur'"),
        (lambda rows: [(rows[0][0], rows[0][1], "1 99999")] + rows[1:], "runs past the end"),
        (lambda rows: rows + [("elsewhere.png", c, "") for c in CLASSES], "not in"),
        (lambda rows: rows[29:], "no rows for image"),
    ],
)
def test_bad_submissions(tiny_root: Path, tmp_path: Path, edit, message: str) -> None:
    path = tmp_path / "bad.csv"
    write_submission(path, edit(_rows_for(tiny_root, "test")))
    with pytest.raises(SegensError, match=message) as caught:
        evaluate_submission(path, tiny_root, "test")
    assert str(path) in str(caught.value)


def test_bad_header(tmp_path: Path) -> None:
    path = tmp_path / "h.csv"
    path.write_text("name,cls,rle\n")
    with pytest.raises(SegensError, match="header"):
        read_submission(path)


def test_atomic_write_keeps_old_file_when_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    write_submission(path, image_rows("a.png", [""] * 29))
    before = path.read_bytes()

    def rows():
        yield ("a.png", "finger-1", "")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_submission(path, rows())
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["s.csv"]
