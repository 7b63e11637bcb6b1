"""ens evaluate (CSV and store predictions, exact Dice, threshold semantics, image matching, JSON, plot) and
ens show (plain, class-grid and error overlays, names that do not exist)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from matplotlib.colors import to_rgb
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import CLASS_TO_INDEX, NUM_CLASSES
from segens.conventions.dataset import discover, read_record_mask
from segens.conventions.rle import encode_stack
from segens.conventions.submission import image_rows, write_submission
from segens.ensemble.evaluate import evaluate_prediction, evaluate_store, evaluate_submission, keep_table, truth_masks
from segens.ensemble.overlay import FALSE_NEGATIVE, FALSE_POSITIVE, PALETTE, draw_overlay, figure_pixels
from segens.errors import SegensError
from segens.reference import reference_dice
from segens.store import create_store, open_store
from segens.synth import generate

SIZE = 80


def _labels(root: Path, split: str) -> dict[str, np.ndarray]:
    """key -> (29, H, W) uint8 ground truth (0/1) of a split."""
    return {record.key: read_record_mask(record).astype(np.uint8) for record in discover(root, split).records}


def _blur(masks: np.ndarray) -> np.ndarray:
    """Soft (29, H, W) uint8 maps from 0/1 masks: values 0..255 with many in between."""
    return np.stack([cv2.GaussianBlur(plane * np.uint8(255), (0, 0), 1.5) for plane in masks])


def _store(path: Path, split: str, maps: dict[str, np.ndarray]) -> Path:
    store = create_store(path, path.name.split(".")[0], "csv", split, {}, {}, images=list(maps))
    for key, values in maps.items():
        store.write_image(key, values)
    return path


def _csv(path: Path, root: Path, split: str, masks: dict[str, np.ndarray]) -> Path:
    names = {record.key: record.name for record in discover(root, split).records}
    rows = [row for key, mask in masks.items() for row in image_rows(names[key], encode_stack(mask))]
    write_submission(path, rows)
    return path


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A synth root (2 train patients, 1 test patient) and stores / CSVs made from its labels."""
    base = tmp_path_factory.mktemp("evaluate")
    root = base / "data"
    generate(root, n_train_patients=2, n_test_patients=1, size=SIZE, seed=5)
    test, train = _labels(root, "test"), _labels(root, "train")
    blurred = {key: _blur(mask) for key, mask in test.items()}
    shifted = {key: np.roll(mask, 2, axis=2) * np.uint8(255) for key, mask in test.items()}
    return {
        "root": root,
        "labels": _store(base / "labels.test.zarr", "test", {k: m * np.uint8(255) for k, m in test.items()}),
        "oof": _store(base / "labels.oof.zarr", "oof", {k: m * np.uint8(255) for k, m in train.items()}),
        "blur": _store(base / "blur.test.zarr", "test", blurred),
        "blur_csv": _csv(base / "blur.csv", root, "test", {k: v > 127 for k, v in blurred.items()}),
        "shift": _store(base / "shift.test.zarr", "test", shifted),
        "shift_csv": _csv(base / "shift.csv", root, "test", {k: v > 0 for k, v in shifted.items()}),
    }


# ---- evaluate ------------------------------------------------------------------------------------------------


def test_truth_in_boxes_is_the_rasterised_label(data, tiny_root: Path) -> None:
    for root, split in ((data["root"], "train"), (tiny_root, "train"), (tiny_root, "test")):
        for record in discover(root, split).records:
            full = read_record_mask(record)
            painted = np.zeros_like(full)
            for channel, (box, sub) in enumerate(truth_masks(record, full.shape[1:])):
                if box is not None:
                    painted[channel, box[0]:box[1], box[2]:box[3]] = sub
            assert np.array_equal(painted, full), record.key


def test_a_store_of_the_labels_scores_exactly_one(data) -> None:
    table = evaluate_store(data["labels"], data["root"])
    assert (table.matrix() == 1.0).all() and len(table.scores) == 2
    oof = evaluate_store(data["oof"], data["root"])  # an OOF store is scored on the train labels
    assert oof.mean() == 1.0 and sorted(oof.scores) == [r.key for r in discover(data["root"], "train").records]


def test_store_and_csv_of_the_same_masks_score_identically_and_as_brute_force(data) -> None:
    store_table = evaluate_prediction(data["blur"], data["root"])
    csv_table = evaluate_submission(data["blur_csv"], data["root"], "test")
    assert np.array_equal(store_table.matrix(), csv_table.matrix()) and list(store_table.scores) == list(csv_table.scores)
    store = open_store(data["blur"])
    for record in discover(data["root"], "test").records:
        brute = reference_dice(store.read(record.key) / np.float32(255) > np.float32(0.5), read_record_mask(record))
        np.testing.assert_allclose(store_table.scores[record.key], brute, rtol=0, atol=1e-15)
    assert 0.5 < store_table.mean() < 1.0


def test_threshold_keeps_p_strictly_above(data, tmp_path: Path) -> None:
    at_128 = {key: mask * np.uint8(128) for key, mask in _labels(data["root"], "test").items()}
    path = _store(tmp_path / "half.test.zarr", "test", at_128)
    exactly = float(np.float32(128) / np.float32(255))  # the stored p of v = 128, as combine computes it
    assert evaluate_store(path, data["root"], threshold=exactly).per_class().max() < 1e-3  # p == t: dropped
    below = float(np.nextafter(np.float32(exactly), np.float32(0)))  # the next float32 down: kept
    assert evaluate_store(path, data["root"], threshold=below).mean() == 1.0
    assert evaluate_store(path, data["root"], threshold=float(np.nextafter(exactly, 0))).mean() < 1e-3  # float32
    assert evaluate_store(path, data["root"], threshold=0.0).mean() == 1.0
    assert keep_table(0.5)[127:130].tolist() == [False, True, True] and not keep_table(0.0)[0]
    with pytest.raises(SegensError, match=r"threshold 1.0 must be in \[0, 1\)"):
        evaluate_store(path, data["root"], threshold=1.0)


def test_missing_and_extra_images_are_errors_naming_them(data, tmp_path: Path) -> None:
    labels = {k: m * np.uint8(255) for k, m in _labels(data["root"], "test").items()}
    first, second = sorted(labels)
    short = _store(tmp_path / "short.test.zarr", "test", {first: labels[first]})
    with pytest.raises(SegensError, match=rf"short.test.zarr: lacks 1 image.*{second}"):
        evaluate_store(short, data["root"])
    extra = _store(tmp_path / "extra.test.zarr", "test", {**labels, "ID999/image1": labels[first]})
    with pytest.raises(SegensError, match=r"extra.test.zarr: 1 image\(s\) are not in .*test, first ID999/image1"):
        evaluate_store(extra, data["root"])
    with pytest.raises(SegensError, match="labels.oof.zarr: 4 image.* not in .*test.*--split"):
        evaluate_store(data["oof"], data["root"], split="test")
    rows = [line for line in data["blur_csv"].read_text().splitlines()[1:] if Path(second).name not in line]
    (tmp_path / "short.csv").write_text("image_name,class,rle\n" + "\n".join(rows) + "\n")
    with pytest.raises(SegensError, match=rf"short.csv: no rows for image {Path(second).name}.png"):
        evaluate_prediction(tmp_path / "short.csv", data["root"])
    with pytest.raises(SegensError, match="nothing.csv: not found"):
        evaluate_prediction(tmp_path / "nothing.csv", data["root"])


def test_cli_evaluate_json_table_and_plot(data, tmp_path: Path) -> None:
    runner = CliRunner()
    preds = [str(data["labels"]), str(data["blur_csv"]), str(data["shift"])]
    result = runner.invoke(app, ["evaluate", *preds, "--data", str(data["root"]), "--json"])
    assert result.exit_code == 0, result.output
    objects = [json.loads(line) for line in result.stdout.splitlines()]
    assert [o["pred"] for o in objects] == preds and [o["kind"] for o in objects] == ["store", "csv", "store"]
    assert objects[0]["mean_dice"] == 1.0 and objects[0]["threshold"] == 0.5 and "threshold" not in objects[1]
    assert objects[1]["images"] == 2 and len(objects[1]["per_class"]) == NUM_CLASSES
    plot = tmp_path / "dice.png"
    result = runner.invoke(app, ["evaluate", *preds, "--data", str(data["root"]), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "labels.test.zarr" in result.output and "blur.csv" in result.output and "shift.test.zarr" in result.output
    assert "1.0000" in result.output
    picture = cv2.imread(str(plot))
    assert picture is not None and picture.shape == (1100, 990, 3)  # 9 x 10 inches at 110 dpi
    # one bar colour per prediction (matplotlib's tab:blue, tab:orange, tab:green in BGR); the labels' bars
    # reach Dice 1 in every class, so theirs is the most painted colour
    painted = [int(np.all(picture == bgr, axis=-1).sum()) for bgr in ((180, 119, 31), (14, 127, 255), (44, 160, 44))]
    assert min(painted) > 0 and painted[0] == max(painted), painted
    result = runner.invoke(app, ["evaluate", str(data["oof"]), "--data", str(data["root"]), "--split", "test"])
    assert isinstance(result.exception, SegensError)
    assert re.search("labels.oof.zarr: 4 image.* not in .*test.*--split", str(result.exception))


# ---- show ----------------------------------------------------------------------------------------------------


def _png(path: Path) -> np.ndarray:
    picture = cv2.imread(str(path))
    assert picture is not None, path
    return picture


def _share(picture: np.ndarray, colour: str) -> float:
    """Fraction of a BGR picture's pixels that are saturated and of ``colour``'s hue (blends of it over grey)."""
    bgr = np.uint8([[np.rint(np.array(to_rgb(colour)[::-1]) * 255)]])
    target = int(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)[0, 0, 0])
    hsv = cv2.cvtColor(picture, cv2.COLOR_BGR2HSV)
    gap = np.abs(hsv[..., 0].astype(int) - target)
    return float(((np.minimum(gap, 180 - gap) <= 6) & (hsv[..., 1] > 90)).mean())


def test_show_plain_classes_and_error_views(data, tmp_path: Path) -> None:
    root = data["root"]
    key = discover(root, "test").records[0].key
    plain = draw_overlay(key, root, [data["shift"]], tmp_path / "plain.png")
    assert _png(plain).shape[:2] == figure_pixels(1, 1, crop_view=False)[::-1]
    two = draw_overlay(Path(key).name + ".png", root, [data["shift"], data["blur_csv"]], tmp_path / "two.png")
    assert _png(two).shape[:2] == figure_pixels(2, 2, crop_view=False)[::-1]
    grid = draw_overlay(key, root, [data["shift"], data["blur"]], tmp_path / "grid.png", classes="Capitate,Radius")
    assert _png(grid).shape[:2] == figure_pixels(4, 2, crop_view=True)[::-1]
    # what is drawn: every class's colour in the plain view; in the class grid only the two classes asked for
    for name in ("finger-2", "Lunate", "Capitate"):
        assert _share(_png(plain), PALETTE[CLASS_TO_INDEX[name]]) > 2e-4, name
    assert _share(_png(grid), PALETTE[CLASS_TO_INDEX["Capitate"]]) > 1e-3
    for name in ("finger-2", "Lunate"):
        assert _share(_png(grid), PALETTE[CLASS_TO_INDEX[name]]) == 0.0, name
    outline = draw_overlay(key, root, [data["shift"]], tmp_path / "outline.png", classes=["Capitate"])
    error = draw_overlay(key, root, [data["shift"]], tmp_path / "error.png", error="Capitate")
    perfect = draw_overlay(key, root, [data["labels"]], tmp_path / "perfect.png", error="Capitate")
    assert _png(error).shape == _png(outline).shape == figure_pixels(1, 1, crop_view=True)[::-1] + (3,)
    assert not np.array_equal(_png(error), _png(outline)) and not np.array_equal(_png(error), _png(plain))
    # the shifted prediction has false positives and negatives; the labels themselves have neither
    for colour in (FALSE_POSITIVE, FALSE_NEGATIVE):
        assert _share(_png(error), colour) > 10 * _share(_png(perfect), colour)


def test_cli_show_and_images_without_labels(data, tmp_path: Path) -> None:
    record = discover(data["root"], "train").records[1]
    out = tmp_path / "cli.png"
    result = CliRunner().invoke(app, ["show", record.key + ".png", "--data", str(data["root"]), "--pred",
                                      str(data["oof"]), "--out", str(out), "--classes", "Hamate,finger-3"])
    assert result.exit_code == 0, result.output
    assert _png(out).shape[:2] == figure_pixels(2, 2, crop_view=True)[::-1]
    unlabelled = tmp_path / "unlabelled"
    shutil.copytree(data["root"] / "test" / "DCM", unlabelled / "test" / "DCM")
    name = discover(unlabelled, "test").records[0].name
    draw_overlay(name, unlabelled, [data["blur_csv"]], tmp_path / "nolabels.png")
    assert _png(tmp_path / "nolabels.png").shape[:2] == figure_pixels(1, 1, crop_view=False)[::-1]
    with pytest.raises(SegensError, match="no label file, so --error has no truth"):
        draw_overlay(name, unlabelled, [data["blur_csv"]], tmp_path / "x.png", error="Hamate")


def test_show_bad_names_are_clear_errors(data, tmp_path: Path) -> None:
    root, out = data["root"], tmp_path / "x.png"
    first = discover(root, "train").records[0]
    with pytest.raises(SegensError, match=rf"image 'image000.png' is not in .*give a key like {first.key}"):
        draw_overlay("image000.png", root, [], out)
    with pytest.raises(SegensError, match="unknown class 'Femur'; valid classes are: finger-1.*Capitate.*Ulna"):
        draw_overlay(first.key, root, [data["oof"]], out, classes=["Capitate", "Femur"])
    with pytest.raises(SegensError, match="unknown class 'capitate'"):
        draw_overlay(first.key, root, [data["oof"]], out, error="capitate")
    with pytest.raises(SegensError, match="missing.zarr: no probability store"):
        draw_overlay(first.key, root, [tmp_path / "missing.zarr"], out)
    with pytest.raises(SegensError, match=rf"blur.csv: no rows for image {first.name}"):
        draw_overlay(first.key, root, [data["blur_csv"]], out)  # a test CSV has no train image
    with pytest.raises(SegensError, match=rf"labels.test.zarr: image '{first.key}' is not in the store"):
        draw_overlay(first.key, root, [data["labels"]], out)
    with pytest.raises(SegensError, match="--error needs a prediction"):
        draw_overlay(first.key, root, [], out, error="Capitate")
    with pytest.raises(SegensError, match="not both"):
        draw_overlay(first.key, root, [data["oof"]], out, classes=["Hamate"], error="Capitate")
    assert not out.exists()
