"""ens predict-member: real smp models and CSV members end to end into real zarr stores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_smp_project
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.dataset import discover, read_image, read_record_mask
from segens.conventions.rle import encode_stack
from segens.conventions.submission import image_rows, read_submission, write_submission
from segens.errors import SegensError
from segens.folds.file import load_folds
from segens.members.predict import predict_member
from segens.reference import reference_member_probabilities
from segens.store import open_store


def fold_models(project: Path) -> dict:
    """The project's three fold models, loaded here from their state_dicts (not through the member)."""
    import segmentation_models_pytorch as smp
    import torch

    models = {}
    for fold in range(3):
        model = smp.Unet("resnet18", encoder_weights=None, classes=29, decoder_channels=(32, 16, 16, 8, 8))
        model.load_state_dict(torch.load(project / f"fold{fold}.pt", map_location="cpu"))
        models[fold] = model.eval()
    return models


def assert_quantized(stored: np.ndarray, probabilities: np.ndarray) -> None:
    """The stored uint8 map is the reference probabilities x 255, rounded (float32 sums may differ by a bit)."""
    assert stored.dtype == np.uint8 and stored.shape == probabilities.shape
    assert np.abs(stored.astype(np.float64) - probabilities.astype(np.float64) * 255).max() <= 0.5 + 1e-3
    assert (stored > 0).any()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A data root, folds and an smp member whose three fold checkpoints are real (untrained) models."""
    return make_smp_project(tmp_path_factory.mktemp("predict"))


def test_oof_store_uses_the_held_out_fold(project: Path) -> None:
    spec_path = project / "unet.yaml"
    document = yaml.safe_load(spec_path.read_text())
    out = project / "unet.oof.zarr"
    summary = predict_member(spec_path, "oof", project / "data", out, folds_path=project / "folds.json", progress=False)
    assert summary.written == 6 and summary.skipped == 0
    store = open_store(out)
    folds = load_folds(project / "folds.json")
    assert store.split == "oof" and store.member == "unet" and len(store.keys()) == 6
    models = fold_models(project)
    for record in discover(project / "data", "train").records:
        fold = folds.fold_of(record.key)
        expected = reference_member_probabilities([models[fold]], read_image(record.image_path), (64, 64), hflip=True)
        assert_quantized(store.read(record.key), expected)
        others = [reference_member_probabilities([models[f]], read_image(record.image_path), (64, 64), hflip=True)
                  for f in range(3) if f != fold]
        assert all(np.abs(store.read(record.key) - np.rint(other * 255)).max() > 1 for other in others)
    assert store.image_size(record.key) == (80, 80)
    assert {int(fold) for fold in store.checkpoints} == {0, 1, 2}
    assert document["checkpoints"][0]["sha256"] == store.checkpoints[0]["sha256"]

    again = predict_member(spec_path, "oof", project / "data", out, folds_path=project / "folds.json", progress=False)
    assert again.written == 0 and again.skipped == 6


def test_test_store_averages_every_fold(project: Path) -> None:
    result = CliRunner().invoke(app, ["predict-member", str(project / "unet.yaml"), "--split", "test", "--data",
                                      str(project / "data"), "--out", str(project / "unet.test.zarr")])
    assert result.exit_code == 0, result.output
    store = open_store(project / "unet.test.zarr")
    models = [fold_models(project)[fold] for fold in range(3)]
    records = discover(project / "data", "test", require_labels=False).records
    assert sorted(store.keys()) == sorted(record.key for record in records)
    for record in records:
        expected = reference_member_probabilities(models, read_image(record.image_path), (64, 64), hflip=True)
        assert_quantized(store.read(record.key), expected)


def test_per_fold_test_stores_hold_each_fold_models_own_maps(project: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["predict-member", str(project / "unet.yaml"), "--split", "test", "--data",
                                      str(project / "data"), "--out", str(tmp_path / "unet.test.zarr"), "--per-fold"])
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "unet.test.zarr").exists()
    models = fold_models(project)
    records = discover(project / "data", "test", require_labels=False).records
    for fold in range(3):
        store = open_store(tmp_path / f"unet.test.fold{fold}.zarr")
        assert store.fold == fold and list(store.checkpoints) == [fold] and store.split == "test"
        for record in records:
            expected = reference_member_probabilities([models[fold]], read_image(record.image_path), (64, 64),
                                                      hflip=True)
            assert_quantized(store.read(record.key), expected)
    with pytest.raises(SegensError, match="--per-fold is for --split test"):
        predict_member(project / "unet.yaml", "oof", project / "data", tmp_path / "o.zarr",
                       folds_path=project / "folds.json", per_fold=True, progress=False)


def test_jobs_2_writes_the_same_store_as_jobs_1(project: Path, tmp_path: Path) -> None:
    """Same batches (3 of 2 images), one process or two: the same bytes. (The batch size itself can move a value
    by one uint8 level: convolutions of a batch of 1 and of 4 round differently, so both runs use 2.)"""
    arguments = (project / "unet.yaml", "oof", project / "data")
    predict_member(*arguments, tmp_path / "one.zarr", folds_path=project / "folds.json", batch_size=2, progress=False)
    summary = predict_member(*arguments, tmp_path / "two.zarr", folds_path=project / "folds.json", jobs=2,
                             batch_size=2, progress=False)
    assert summary.written == 6
    one, two = open_store(tmp_path / "one.zarr"), open_store(tmp_path / "two.zarr")
    assert sorted(two.keys()) == sorted(one.keys()) and len(one.keys()) == 6
    for key in one.keys():
        assert np.array_equal(two.read(key), one.read(key)), key
        assert two.boxes(key) == one.boxes(key), key


def test_bad_inputs_name_the_file(project: Path, tmp_path: Path) -> None:
    with pytest.raises(SegensError, match="needs --folds"):
        predict_member(project / "unet.yaml", "oof", project / "data", tmp_path / "x.zarr", progress=False)
    document = yaml.safe_load((project / "unet.yaml").read_text())
    document["checkpoints"][1]["sha256"] = "0" * 64
    changed = project / "changed.yaml"
    changed.write_text(yaml.safe_dump(document))
    with pytest.raises(SegensError, match="fold1.pt: sha256"):
        predict_member(changed, "test", project / "data", tmp_path / "y.zarr", progress=False)
    document["checkpoints"].pop(1)
    changed.write_text(yaml.safe_dump(document))
    with pytest.raises(SegensError, match="no checkpoint for fold 1"):
        predict_member(changed, "oof", project / "data", tmp_path / "z.zarr", folds_path=project / "folds.json",
                       progress=False)
    document["colour"] = "blue"
    changed.write_text(yaml.safe_dump(document))
    with pytest.raises(SegensError, match="unknown field"):
        predict_member(changed, "test", project / "data", tmp_path / "w.zarr", progress=False)
    assert not (tmp_path / "w.zarr").exists()


def _labels_csv(root: Path, path: Path, drop_last: bool = False) -> list[tuple[str, str, str]]:
    rows = []
    for record in discover(root, "test").records:
        rows.extend(image_rows(record.name, encode_stack(read_record_mask(record))))
    write_submission(path, rows[:-1] if drop_last else rows)
    return rows


def test_csv_member_round_trip(project: Path, tmp_path: Path) -> None:
    rows = _labels_csv(project / "data", tmp_path / "team.csv")
    (tmp_path / "team.yaml").write_text(yaml.safe_dump({"name": "team", "kind": "csv", "model": {"test": "team.csv"}}))
    summary = predict_member(tmp_path / "team.yaml", "test", project / "data", tmp_path / "team.test.zarr", progress=False)
    assert summary.written == 2
    store = open_store(tmp_path / "team.test.zarr")
    back = []
    for record in discover(project / "data", "test").records:
        back.extend(image_rows(record.name, encode_stack(store.read(record.key) >= 128)))
    write_submission(tmp_path / "back.csv", back)
    assert back == rows
    assert read_submission(tmp_path / "back.csv").rles == read_submission(tmp_path / "team.csv").rles


def test_csv_member_errors(project: Path, tmp_path: Path) -> None:
    _labels_csv(project / "data", tmp_path / "short.csv", drop_last=True)
    (tmp_path / "short.yaml").write_text(yaml.safe_dump({"name": "s", "kind": "csv", "model": {"test": "short.csv"}}))
    with pytest.raises(SegensError, match="short.csv: image .* has no row for class"):
        predict_member(tmp_path / "short.yaml", "test", project / "data", tmp_path / "s.zarr", progress=False)
    (tmp_path / "big.csv").write_text("image_name,class,rle\n" + "".join(
        f"{record.name},{c},{'1 999999' if c == 'Ulna' else ''}\n"
        for record in discover(project / "data", "test").records for c in __import__("segens.conventions.classes").conventions.classes.CLASSES))
    (tmp_path / "big.yaml").write_text(yaml.safe_dump({"name": "b", "kind": "csv", "model": {"test": "big.csv"}}))
    with pytest.raises(SegensError, match="runs past the end"):
        predict_member(tmp_path / "big.yaml", "test", project / "data", tmp_path / "b.zarr", progress=False)
    with pytest.raises(SegensError, match="names no CSV for split 'oof'"):
        predict_member(tmp_path / "big.yaml", "oof", project / "data", tmp_path / "c.zarr", progress=False)
