"""Class list, label files, data-root discovery, image reading: the competition's conventions."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import square_polygons

from segens.conventions.classes import CLASSES, NUM_CLASSES, class_index
from segens.conventions.dataset import discover, image_size, read_image, read_record_mask
from segens.conventions.labels import parse_label_json, read_label_mask
from segens.errors import SegensError


def test_class_order() -> None:
    assert NUM_CLASSES == 29
    assert CLASSES[:19] == tuple(f"finger-{i}" for i in range(1, 20))
    assert CLASSES[19:] == ("Trapezium", "Trapezoid", "Capitate", "Hamate", "Scaphoid", "Lunate", "Triquetrum",
                            "Pisiform", "Radius", "Ulna")
    assert class_index("Ulna") == 28
    with pytest.raises(ValueError, match="unknown class 'Femur'; valid classes are: finger-1, .*, Ulna"):
        class_index("Femur")


def test_discover_pairs_sorts_and_keeps_underscores(tiny_root: Path) -> None:
    listing = discover(tiny_root, "train")
    assert [r.key for r in listing.records] == [
        "ID001/image1661130828152_R", "ID001/image1661130828153", "ID002/image1661130900000",
        "ID002/image1661130900001_L",
    ]
    first = listing.records[0]
    assert first.name == "image1661130828152_R.png"
    assert first.patient == "ID001"
    assert first.relpath == "ID001/image1661130828152_R.png"
    assert first.label_path.name == "image1661130828152_R.json"


def test_sort_order_is_by_relpath_with_extension(tmp_path: Path) -> None:
    folder = tmp_path / "test" / "DCM" / "ID001"
    for stem in ["a", "a-b", "a_R"]:  # '-' < '.' < '_': "a-b.png" < "a.png" < "a_R.png"
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{stem}.png"), np.zeros((4, 4), np.uint8))
    listing = discover(tmp_path, "test")
    assert [r.name for r in listing.records] == ["a-b.png", "a.png", "a_R.png"]


def test_unpaired_files_are_reported_or_refused(tiny_root: Path) -> None:
    orphan_label = tiny_root / "train" / "outputs_json" / "ID009" / "image1.json"
    orphan_label.parent.mkdir(parents=True)
    orphan_label.write_text("{}")
    assert discover(tiny_root, "train").labels_without_images == [orphan_label]
    (tiny_root / "train" / "outputs_json" / "ID001" / "image1661130828153.json").unlink()
    with pytest.raises(SegensError, match="no label file"):
        discover(tiny_root, "train")
    listing = discover(tiny_root, "train", require_labels=False)
    assert [p.name for p in listing.images_without_labels] == ["image1661130828153.png"]


def test_missing_split_folder(tmp_path: Path) -> None:
    with pytest.raises(SegensError, match="ens synth"):
        discover(tmp_path, "train")


def test_mask_uses_the_image_size_not_stale_metadata(tiny_root: Path) -> None:
    """The label files' metadata says 2048x2048, the images are 40x48: the squares are filled where the points
    say, at the image's own size (each square's boundary pixels included), never rescaled."""
    record = discover(tiny_root, "train").records[0]
    assert record.key == "ID001/image1661130828152_R"  # written by tiny_root with seed 0
    assert json.loads(record.label_path.read_text())["metadata"]["width"] == 2048
    mask = read_record_mask(record)
    expected = np.zeros((NUM_CLASSES, 40, 48), bool)
    for channel, name in enumerate(CLASSES):
        (x0, y0), (x1, y1) = square_polygons(40, 48, seed=0)[name][[0, 2]]
        expected[channel, y0 : y1 + 1, x0 : x1 + 1] = True
    assert mask.shape == (29, 40, 48) and mask.dtype == bool
    np.testing.assert_array_equal(mask, expected)


def test_rasterize_fills_polygon_inclusive(tmp_path: Path) -> None:
    from segens.conventions.labels import rasterize

    polygons = {name: np.array([[1, 1], [3, 1], [3, 2], [1, 2]], np.int32) for name in CLASSES}
    mask = rasterize(polygons, 5, 5)
    assert mask[0, 1:3, 1:4].all() and mask[0].sum() == 6  # cv2.fillPoly includes the boundary pixels


def _label_doc(**changes) -> dict:
    annotations = [{"id": str(i), "type": "poly_seg", "attributes": {}, "label": name,
                    "points": [[1, 1], [5, 1], [5, 5], [1, 5]]} for i, name in enumerate(CLASSES)]
    doc = {"annotations": annotations, "metadata": {"width": 1, "height": 1}}
    doc.update(changes)
    return doc


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["annotations"][3].update(label="finger-99"), "unknown class 'finger-99'"),
        (lambda d: d["annotations"].pop(20), "classes missing: Trapezoid"),
        (lambda d: d["annotations"].append(dict(d["annotations"][0])), "appears twice"),
        (lambda d: d["annotations"][0].update(points=[[1, 2]]), "at least 3"),
        (lambda d: d["annotations"][0].update(points="nope"), "points"),
        (lambda d: d.pop("annotations"), "no 'annotations'"),
    ],
)
def test_bad_label_files(tmp_path: Path, mutate, message: str) -> None:
    doc = _label_doc()
    mutate(doc)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SegensError, match=message) as caught:
        parse_label_json(path)
    assert str(path) in str(caught.value)


def test_malformed_json_and_points_outside(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{"annotations": [')
    with pytest.raises(SegensError, match="broken.json: label file is not valid JSON"):
        parse_label_json(path)
    path.write_text(json.dumps(_label_doc()))
    assert read_label_mask(path, 10, 10).shape == (29, 10, 10)
    with pytest.raises(SegensError, match="outside the 4x4 image"):
        read_label_mask(path, 4, 4)
    with pytest.raises(SegensError, match="cannot read"):
        parse_label_json(tmp_path / "absent.json")


def test_read_image_variants(tmp_path: Path) -> None:
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    cv2.imwrite(str(tmp_path / "g.png"), gray)
    cv2.imwrite(str(tmp_path / "c.png"), np.dstack([gray] * 3))
    cv2.imwrite(str(tmp_path / "w.png"), gray.astype(np.uint16) * 257)
    for name in ["g.png", "c.png", "w.png"]:
        image = read_image(tmp_path / name)
        assert image.shape == (3, 4) and image.dtype == np.uint8
        assert np.array_equal(image, gray)
    assert image_size(tmp_path / "g.png") == (3, 4)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(SegensError, match="not a readable image"):
        read_image(tmp_path / "bad.png")
    with pytest.raises(SegensError, match="file not found"):
        read_image(tmp_path / "absent.png")
