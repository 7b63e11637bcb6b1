"""Patient-grouped k-fold splits, the folds.json format and its integrity checks, and ``ens folds``."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import flat, square_polygons, write_image
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.dataset import discover
from segens.conventions.labels import write_label_json
from segens.conventions.metadata import write_metadata
from segens.errors import SegensError
from segens.folds.file import Folds, image_list_sha256, load_folds, patient_of, save_folds
from segens.folds.splits import make_folds

SIZE = 16


def add_image(root: Path, patient: str, stem: str, seed: int = 0) -> None:
    """One 16x16 training image with its label file."""
    write_image(root / "train" / "DCM" / patient / f"{stem}.png", SIZE, SIZE, seed)
    write_label_json(root / "train" / "outputs_json" / patient / f"{stem}.json", square_polygons(SIZE, SIZE, seed))


def make_root(root: Path, patients: int, hands: int = 2) -> Path:
    """A data root with ``patients`` patients (ID001...) of ``hands`` training images each."""
    for number in range(1, patients + 1):
        for hand in range(hands):
            add_image(root, f"ID{number:03d}", f"image{1661130000000 + number * 10 + hand}_{'RL'[hand % 2]}")
    return root


@pytest.fixture(scope="module")
def root12(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 patients x 2 hands, with a dirty meta_data.xlsx (read-only for the tests that share it)."""
    root = make_root(tmp_path_factory.mktemp("root12"), 12)
    rows = [{"ID": n, "age": 20 + n, "sex": "남" if n % 2 else "여", "weight": 50 + 2 * n, "height": 160 + n}
            for n in range(1, 12)]  # ID012 has no row
    rows[2]["sex"] = "_x0008_여"  # cleaned to F
    rows[4]["sex"] = None  # ID005: missing
    rows[5]["weight"] = "abc"  # ID006: no BMI
    rows[6]["height"] = "172cm"  # read from text
    rows.append({"ID": 99, "age": 30, "sex": "여", "weight": 60, "height": 170})  # no images
    write_metadata(root / "meta_data.xlsx", rows)
    return root


def imbalance(folds: Folds, sex: dict[str, str]) -> int:
    """Sum over folds of |M - F| patients."""
    total = 0
    for fold in range(folds.k):
        counts = Counter(sex[p] for p in folds.patients_in(fold))
        total += abs(counts["M"] - counts["F"])
    return total


# ------------------------------------------------------------------------------------------------ making folds


def test_group_folds_keep_patients_together_and_cover_every_image(root12: Path) -> None:
    folds, _ = make_folds(root12, k=5, seed=0)
    keys = [record.key for record in discover(root12).records]
    assert sorted(folds.assignment) == sorted(keys)
    assert sorted(k for fold in range(5) for k in folds.keys_in(fold)) == sorted(keys)
    by_patient: dict[str, set[int]] = {}
    for key, fold in folds.assignment.items():
        by_patient.setdefault(patient_of(key), set()).add(fold)
    assert all(len(found) == 1 for found in by_patient.values())
    assert len(by_patient) == 12
    assert (folds.method, folds.stratify, folds.k) == ("group", None, 5)
    key = keys[0]
    assert key not in folds.train_keys(folds.fold_of(key))
    assert set(folds.train_keys(0)) | set(folds.keys_in(0)) == set(keys)


def test_same_seed_same_folds_and_shuffle_recorded(root12: Path) -> None:
    first, _ = make_folds(root12, k=3, seed=7)
    again, _ = make_folds(root12, k=3, seed=7)
    assert first == again
    assert first.shuffle  # scikit-learn >= 1.6 shuffles GroupKFold with the seed
    others = [make_folds(root12, k=3, seed=seed)[0].assignment for seed in range(4)]
    assert any(other != first.assignment for other in others)


def test_k_larger_than_patients_and_bad_arguments(root12: Path) -> None:
    with pytest.raises(SegensError, match="--k 13 needs at least 13 patients but there are 12"):
        make_folds(root12, k=13)
    with pytest.raises(SegensError, match="at least 2 folds"):
        make_folds(root12, k=1)
    with pytest.raises(SegensError, match="unknown column; use one of age, sex"):
        make_folds(root12, stratify="shoe size")


def test_stratified_balances_a_binary_column_better_than_chance(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", 20)
    sex = {f"ID{n:03d}": "M" if n <= 10 else "F" for n in range(1, 21)}  # sorted IDs would cluster by sex
    write_metadata(root / "meta_data.xlsx", [{"ID": int(p[2:]), "sex": s} for p, s in sex.items()])
    rng = np.random.default_rng(0)
    patients = np.array(sorted(sex))
    chance = []
    for _ in range(300):  # random patient-grouped splits into 5 folds of 4 patients
        order = rng.permutation(patients)
        chance.append(sum(abs(sum(sex[p] == "M" for p in order[i::5]) * 2 - 4) for i in range(5)))
    for seed in range(3):
        folds, notes = make_folds(root, k=5, stratify="sex", seed=seed)
        assert folds.method == "stratified-group" and folds.bins == ["F", "M"]
        assert imbalance(folds, sex) <= 2 < np.mean(chance)
        assert [sum(d.values()) for d in folds.distribution()] == [4] * 5


def test_dirty_metadata_is_reported_and_gets_an_unknown_bin(root12: Path) -> None:
    folds, notes = make_folds(root12, k=3, stratify="sex", seed=0)
    text = "\n".join(notes)
    assert folds.bins == ["F", "M", "unknown"]
    assert folds.strata["ID003"] == "F"  # control character cleaned
    assert folds.strata["ID005"] == folds.strata["ID012"] == "unknown"
    assert "2 of 12 patient(s) have no usable value and form the 'unknown' bin: ID005, ID012" in text
    assert "1 patient(s) of the data root have no row: ID012" in text
    assert "1 row(s) are for patients without training images" in text
    assert "weight" not in text  # notes about columns that sex does not use are left out

    bmi, notes = make_folds(root12, k=3, stratify="bmi", seed=0)
    text = "\n".join(notes)
    assert bmi.strata["ID006"] == bmi.strata["ID012"] == "unknown"
    assert bmi.strata["ID007"] != "unknown"  # "172cm" was read
    assert "ID006=" in text and "form the 'unknown' bin: ID006, ID012" in text
    assert set(bmi.bins) <= {"<18.5", "18.5-25", "25-30", ">=30", "unknown"}

    age, _ = make_folds(root12, k=3, stratify="age", seed=0)
    assert 2 <= len(age.bins) <= 4 and age.strata["ID012"] == "unknown"


def test_missing_metadata_file_is_a_clear_error(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", 4)
    with pytest.raises(SegensError, match="meta_data.xlsx: metadata file not found"):
        make_folds(root, k=2, stratify="bmi")


# ---------------------------------------------------------------------------------------- the file and checks


@pytest.fixture
def saved(root12: Path, tmp_path: Path) -> Path:
    folds, _ = make_folds(root12, k=4, stratify="sex", seed=1)
    return save_folds(folds, tmp_path / "folds.json")


def edit(path: Path, change) -> Path:
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))
    return path


def test_save_load_round_trip_and_format(saved: Path, root12: Path) -> None:
    document = json.loads(saved.read_text())
    assert document["version"] == 1 and document["k"] == 4 and document["method"] == "stratified-group"
    assert document["stratify"] == "sex" and document["seed"] == 1
    relpaths = [record.relpath for record in discover(root12).records]
    assert document["image_list_sha256"] == image_list_sha256(relpaths)
    assert "ID001/image1661130000010_R" in document["folds"]
    loaded = load_folds(saved, root=root12)
    assert loaded == make_folds(root12, k=4, stratify="sex", seed=1)[0]
    assert loaded.source == saved
    assert not list(saved.parent.glob("*.part"))


def test_unknown_version(saved: Path) -> None:
    edit(saved, lambda d: d.update(version=2))
    with pytest.raises(SegensError, match=r"folds.json: unknown folds.json version 2 .*re-run `ens folds make`"):
        load_folds(saved)


def test_patient_spanning_two_folds(saved: Path) -> None:
    def split_id001(document: dict) -> None:
        first, second = sorted(k for k in document["folds"] if k.startswith("ID001/"))
        document["folds"][second] = (document["folds"][first] + 1) % document["k"]

    edit(saved, split_id001)
    with pytest.raises(SegensError, match=r"folds.json: patient ID001 has images in folds \[\d, \d\]"):
        load_folds(saved)


def test_fold_out_of_range(saved: Path) -> None:
    edit(saved, lambda d: d["folds"].update({"ID001/image1661130000010_R": 4, "ID001/image1661130000011_L": 4}))
    with pytest.raises(SegensError, match=r"folds.json: 2 image\(s\) have a fold outside 0..3"):
        load_folds(saved)


def test_image_missing_from_the_file(saved: Path, root12: Path) -> None:
    edit(saved, lambda d: d["folds"].pop("ID002/image1661130000021_L"))
    load_folds(saved)  # consistent on its own
    with pytest.raises(SegensError, match=r"exactly one fold.*1 training image\(s\) without a fold "
                                          r"\(first ID002/image1661130000021_L\)"):
        load_folds(saved, root=root12)


def test_hash_mismatch(saved: Path, root12: Path) -> None:
    edit(saved, lambda d: d.update(image_list_sha256="0" * 64))
    with pytest.raises(SegensError, match="image list hash 000000000000... does not match"):
        load_folds(saved, root=root12)


def test_changed_image_list(tmp_path: Path) -> None:
    root = make_root(tmp_path / "root", 4)
    path = save_folds(make_folds(root, k=2)[0], tmp_path / "folds.json")
    add_image(root, "ID005", "image1", seed=5)
    add_image(root, "ID002", "image2", seed=6)
    with pytest.raises(SegensError, match=r"training images of .* changed since these folds were made: "
                                          r"2 added \(first ID002/image2\); re-run `ens folds make"):
        load_folds(path, root=root)
    for stem in ("image1661130000010_R", "image1661130000011_L"):
        (root / "train" / "DCM" / "ID001" / f"{stem}.png").unlink()
    with pytest.raises(SegensError, match=r"2 added \(first ID002/image2\), 2 removed \(first ID001/"):
        load_folds(path, root=root)


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(SegensError, match="folds file not found"):
        load_folds(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SegensError, match="bad.json: not a readable folds.json"):
        load_folds(tmp_path / "bad.json")


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_make_and_show(root12: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "folds.json"
    result = runner.invoke(app, ["folds", "make", str(root12), "--k", "3", "--out", str(out),
                                 "--stratify", "sex", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and "3 folds, stratified by sex" in flat(result.output)
    assert "sex unknown" in flat(result.output) and "ID005, ID012" in flat(result.output)
    result = runner.invoke(app, ["folds", "show", str(out), "--data", str(root12)])
    assert result.exit_code == 0, result.output
    assert "matches the training images" in flat(result.output)
    totals = [line.split("│")[1:-1] for line in result.output.splitlines() if "all" in line]
    assert [cell.strip() for cell in totals[0]][:3] == ["all", "24", "12"]

    result = runner.invoke(app, ["folds", "make", str(root12), "--k", "2", "--out", str(out)])
    assert isinstance(result.exception, SegensError) and "pass --overwrite" in str(result.exception)
    result = runner.invoke(app, ["folds", "make", str(root12), "--k", "2", "--out", str(out), "--overwrite"])
    assert result.exit_code == 0 and "grouped by patient" in flat(result.output)
    result = runner.invoke(app, ["folds", "make", str(root12), "--k", "30", "--out", str(out), "--overwrite"])
    assert isinstance(result.exception, SegensError)
    assert re.search(r"train: --k 30 needs at least 30 patients but there are 12; use --k 12 or fewer",
                     str(result.exception))
