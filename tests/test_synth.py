"""The synthetic data set: exact layout, formats, determinism, valid and anatomically arranged labels, preview."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from segens.conventions.classes import CLASS_TO_INDEX, CLASSES
from segens.conventions.labels import check_points_inside, parse_label_json, rasterize
from segens.conventions.metadata import read_metadata
from segens.errors import SegensError
from segens.synth import SynthSummary, generate, preview

SIZE = 160
NAME = re.compile(r"^image\d{13}(_\w+)?\.png$")
OVERLAPPING = [("Trapezium", "Trapezoid"), ("Capitate", "Hamate"), ("Triquetrum", "Pisiform"), ("Scaphoid", "Radius")]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "data"
    summary = generate(root, n_train_patients=3, n_test_patients=2, size=SIZE, seed=7)
    assert summary == SynthSummary(root=root, n_train_images=6, n_test_images=4, n_train_patients=3,
                                   n_test_patients=2, size=SIZE, seed=7)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _labelled_images(root: Path):
    for png in sorted(root.glob("*/DCM/*/*.png")):
        split, _, patient = png.parts[-4:-1]
        yield png, root / split / "outputs_json" / patient / f"{png.stem}.json"


def test_layout_is_exactly_the_competitions(root: Path) -> None:
    assert sorted(p.name for p in root.iterdir()) == ["meta_data.xlsx", "test", "train"]
    expected = {"train": ["ID001", "ID002", "ID003"], "test": ["ID004", "ID005"]}
    names = []
    for split, patients in expected.items():
        assert sorted(p.name for p in (root / split).iterdir()) == ["DCM", "outputs_json"]
        assert sorted(p.name for p in (root / split / "DCM").iterdir()) == patients
        assert sorted(p.name for p in (root / split / "outputs_json").iterdir()) == patients
        for patient in patients:
            images = sorted(p.name for p in (root / split / "DCM" / patient).iterdir())
            labels = sorted(p.name for p in (root / split / "outputs_json" / patient).iterdir())
            assert len(images) == 2 and all(NAME.match(name) for name in images), images
            assert labels == [name[:-4] + ".json" for name in images]
            names += images
    assert len(set(names)) == len(names)  # unique across folders: submissions key rows by file name
    assert any("_" in name for name in names)  # some names carry a suffix, which nothing may split on


def test_png_is_8bit_grayscale_of_the_requested_size(root: Path) -> None:
    for png, _ in _labelled_images(root):
        data = png.read_bytes()
        assert data[24] == 8 and data[25] == 0  # IHDR bit depth 8, colour type 0 (grayscale)
        image = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        assert image.shape == (SIZE, SIZE) and image.dtype == np.uint8


def test_same_seed_gives_identical_bytes_and_another_seed_differs(root: Path, tmp_path: Path) -> None:
    generate(tmp_path / "again", n_train_patients=3, n_test_patients=2, size=SIZE, seed=7)
    assert _files(tmp_path / "again") == _files(root)
    generate(tmp_path / "other", n_train_patients=3, n_test_patients=2, size=SIZE, seed=8)
    other = _files(tmp_path / "other")
    assert set(other) != set(_files(root))  # other timestamps in the names
    pngs = {data for path, data in _files(root).items() if path.endswith(".png")}
    assert not pngs & {data for path, data in other.items() if path.endswith(".png")}


def test_an_image_does_not_depend_on_how_many_patients_were_generated(root: Path, tmp_path: Path) -> None:
    generate(tmp_path / "small", n_train_patients=1, n_test_patients=0, size=SIZE, seed=7)
    small = _files(tmp_path / "small")
    assert all(small[path] == _files(root)[path] for path in small if path.startswith("train/"))


def test_labels_parse_lie_inside_and_carry_stale_metadata(root: Path) -> None:
    for png, label in _labelled_images(root):
        polygons = parse_label_json(label)
        check_points_inside(label, polygons, SIZE, SIZE)
        assert list(polygons) == list(CLASSES)
        assert all(30 <= len(points) <= 80 for points in polygons.values())
        assert json.loads(label.read_text())["metadata"] != {"width": SIZE, "height": SIZE}
        masks = rasterize(polygons, SIZE, SIZE)
        empty = [name for name in CLASSES if not masks[CLASS_TO_INDEX[name]].any()]
        assert not empty, f"{label}: empty classes {empty}"


def test_carpal_neighbours_overlap_as_in_a_radiograph(root: Path) -> None:
    overlapping = {pair: 0 for pair in OVERLAPPING}
    images = list(_labelled_images(root))
    for _, label in images:
        masks = rasterize(parse_label_json(label), SIZE, SIZE)
        for a, b in OVERLAPPING:
            overlapping[(a, b)] += bool((masks[CLASS_TO_INDEX[a]] & masks[CLASS_TO_INDEX[b]]).any())
    assert all(count >= 0.8 * len(images) for count in overlapping.values()), overlapping


def test_the_two_hands_of_a_patient_are_mirrored(root: Path) -> None:
    for patient in sorted(root.glob("*/outputs_json/*")):
        sides = []
        for label in sorted(patient.glob("*.json")):
            polygons = parse_label_json(label)
            sides.append(np.sign(polygons["Radius"][:, 0].mean() - polygons["Ulna"][:, 0].mean()))
            if label.stem.endswith("_R"):  # PA view of a right hand: thumb and radius on the image left
                assert sides[-1] < 0
        assert sorted(sides) == [-1, 1], patient


def test_bone_is_brighter_than_soft_tissue_brighter_than_background(root: Path) -> None:
    for png, label in list(_labelled_images(root))[:4]:
        image = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE).astype(float)
        bone = rasterize(parse_label_json(label), SIZE, SIZE).any(axis=0)
        near = cv2.dilate(bone.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~bone
        far = ~cv2.dilate(bone.astype(np.uint8), np.ones((41, 41), np.uint8)).astype(bool)
        assert image[bone].mean() > image[near].mean() + 20 > image[far].mean() + 40


def test_metadata_has_one_clean_row_per_patient(root: Path) -> None:
    raw = pd.read_excel(root / "meta_data.xlsx", engine="openpyxl")
    assert list(raw.columns[:5]) == ["ID", "나이", "성별", "체중(몸무게)", "키(신장)"]
    assert raw["ID"].tolist() == [1, 2, 3, 4, 5]
    frame, notes = read_metadata(root / "meta_data.xlsx")
    assert frame["ID"].tolist() == ["ID001", "ID002", "ID003", "ID004", "ID005"]
    assert set(frame["sex"].dropna()) <= {"M", "F"} and frame["sex"].notna().all()
    assert any("sex" in note for note in notes)  # ID002 and ID004 are written dirty


def test_preview_writes_a_png(root: Path, tmp_path: Path) -> None:
    out = preview(root, tmp_path / "sheet" / "preview.png", n_images=3)
    sheet = cv2.imread(str(out), cv2.IMREAD_COLOR)
    assert out == tmp_path / "sheet" / "preview.png" and sheet.shape == (1024, 1024, 3)
    assert preview(root, tmp_path / "test.png", n_images=1, split="test").is_file()


def test_refuses_to_mix_with_an_existing_data_set(root: Path, tmp_path: Path) -> None:
    with pytest.raises(SegensError, match="already holds a data set"):
        generate(root, n_train_patients=1, n_test_patients=0, size=SIZE)
    target = tmp_path / "replace"
    generate(target, n_train_patients=2, n_test_patients=0, size=SIZE, seed=1)
    generate(target, n_train_patients=1, n_test_patients=1, size=SIZE, seed=1, overwrite=True)
    assert sorted(p.name for p in (target / "train" / "DCM").iterdir()) == ["ID001"]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"size": 16}, "image size 16 is too small; use at least 64 pixels"),
    ({"n_train_patients": 0}, "need 1 or more train patients.*got 0 train and 5 test"),
    ({"n_test_patients": -1}, "need 1 or more train patients.*got 20 train and -1 test"),
    ({"seed": -3}, "seed must be a non-negative integer, got -3"),
])
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    with pytest.raises(SegensError, match=message):
        generate(tmp_path / "bad", **kwargs)
    assert not (tmp_path / "bad").exists()
