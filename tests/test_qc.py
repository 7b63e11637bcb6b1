"""ens qc on real zarr stores with planted errors: the planted (image, class) pairs rank at the top, the score
ranks true errors on OOF, and qc.csv and the plot are written."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from test_search import member_maps
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import discover, read_record_mask
from segens.ensemble.qc import AreaModel, pairwise_agreement, quality_control
from segens.search.run import search_weights
from segens.store import create_store
from segens.synth import generate

MISSED = "Trapezoid"   # two members of three miss it on one image: the ensemble's mask is empty
MERGED = "Capitate"    # every member merges it with the Hamate on another image
MERGED_WITH = "Hamate"


@pytest.fixture(scope="module")
def planted(tmp_path_factory) -> tuple[Path, list[tuple[str, str]]]:
    base = tmp_path_factory.mktemp("qc")
    generate(base / "data", n_train_patients=8, n_test_patients=1, size=160, seed=7, render=False)
    records = discover(base / "data", "train").records
    missed_on, merged_on = records[3].key, records[9].key
    rng = np.random.default_rng(1)
    for name, blur, noise in (("a", 1.0, 0.2), ("b", 1.1, 0.25), ("c", 0.9, 0.3)):
        store = create_store(base / f"{name}.oof.zarr", name, "smp", "oof", {"name": name},
                             {0: {"path": f"{name}.pt", "sha256": f"sha-{name}"}}, images=[r.key for r in records])
        for record in records:
            truth = read_record_mask(record)
            if record.key == merged_on:
                truth[CLASSES.index(MERGED)] |= truth[CLASSES.index(MERGED_WITH)]
            maps = member_maps(truth, rng, blur, noise)
            if record.key == missed_on and name in ("a", "b"):
                maps[CLASSES.index(MISSED)] = 0
            store.write_image(record.key, maps)
    return base, [(missed_on, MISSED), (merged_on, MERGED)]


def test_planted_errors_rank_at_the_top_and_the_score_ranks_errors(planted, tmp_path: Path) -> None:
    base, pairs = planted
    stores = [base / f"{name}.oof.zarr" for name in "abc"]
    search_weights(stores, base / "data", None, tmp_path / "recipe.json", strategy="soft", progress=False)
    result = quality_control(stores, tmp_path / "recipe.json", base / "data", tmp_path / "qc.csv",
                             plot=tmp_path / "qc.png", progress=False)
    ranked = [(row.image, CLASSES[row.channel]) for row in result.ranked()]
    assert len(ranked) == 16 * NUM_CLASSES
    assert set(ranked[:2]) == set(pairs)
    assert result.validation["spearman"] < -0.3
    assert result.validation["recall_at_5"] > 2 * result.validation["chance_recall"]
    rows = list(csv.reader((tmp_path / "qc.csv").open()))
    assert rows[0][:3] == ["image", "class", "score"] and len(rows) == 1 + 16 * (NUM_CLASSES + 1)
    image_row = rows[1]
    assert image_row[1] == "" and float(image_row[2]) == max(float(r[2]) for r in rows[2:2 + NUM_CLASSES])
    assert (tmp_path / "qc.png").stat().st_size > 10_000
    missed = next(row for row in result.rows if (row.image, CLASSES[row.channel]) == pairs[0])
    assert missed.signals["disagreement"] > 0.5 and missed.dice < 0.7


def test_qc_with_a_hard_recipe_and_the_command(planted, tmp_path: Path) -> None:
    base, pairs = planted
    stores = [str(base / f"{name}.oof.zarr") for name in "abc"]
    search_weights(stores, base / "data", None, tmp_path / "hard.json", strategy="hard", progress=False)
    result = CliRunner().invoke(app, ["qc", *stores, "--recipe", str(tmp_path / "hard.json"), "--data",
                                      str(base / "data"), "--out", str(tmp_path / "qc.csv"), "--top", "3"])
    assert result.exit_code == 0, result.output
    assert "most suspicious" in result.output and "Spearman" in result.output
    assert pairs[0][1] in result.output
    again = CliRunner().invoke(app, ["qc", *stores, "--recipe", str(tmp_path / "hard.json"), "--data",
                                     str(base / "data"), "--out", str(tmp_path / "qc.csv")])
    assert again.exit_code == 1 and "pass --overwrite" in str(again.exception)


def test_overlays_draw_the_most_suspicious_pairs(planted, tmp_path: Path) -> None:
    import cv2

    from segens.ensemble.overlay import member_style

    base, pairs = planted
    stores = [str(base / f"{name}.oof.zarr") for name in "abc"]
    search_weights(stores, base / "data", None, tmp_path / "recipe.json", strategy="soft", progress=False)
    command = ["qc", *stores, "--recipe", str(tmp_path / "recipe.json"), "--data", str(base / "data"), "--out",
               str(tmp_path / "qc.csv"), "--overlays", "3", str(tmp_path / "suspects")]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    drawn = sorted(path.name for path in (tmp_path / "suspects").iterdir())
    assert len(drawn) == 3 and [name[:3] for name in drawn] == ["01-", "02-", "03-"]
    planted_names = {f"{image.replace('/', '_')}-{name}.png" for image, name in pairs}
    assert {name[3:] for name in drawn[:2]} == planted_names  # the planted pairs rank first
    for name in drawn:
        picture = cv2.imread(str(tmp_path / "suspects" / name))
        assert picture is not None and picture.shape[0] > 300
    assert len({member_style(index) for index in range(6)}) == 6  # every member of six drawn its own way
    bad = CliRunner().invoke(app, [*command[:-3], "--overlays", "0", str(tmp_path / "none"), "--overwrite"])
    assert bad.exit_code != 0 and not (tmp_path / "none").exists()


def test_signals_on_hand_made_cases() -> None:
    empty, full = np.zeros((4, 4), bool), np.ones((4, 4), bool)
    assert pairwise_agreement([empty, empty]) == 1.0 and pairwise_agreement([full]) == 1.0
    assert pairwise_agreement([full, empty, full]) == pytest.approx(1 / 3)
    model = AreaModel(np.full(NUM_CLASSES, -2.0), np.full(NUM_CLASSES, -1.5), np.full(NUM_CLASSES, -1.0),
                      np.full(NUM_CLASSES, 0.9))
    assert model.signal(0.0, 0) == 0.9  # empty where 90% of training images show the class
    assert model.signal(10 ** -1.5, 0) == 0.0  # inside the range
    assert model.signal(10 ** -0.5, 0) == pytest.approx(0.5)  # half the range's width above it
    assert model.signal(1e-4, 0) == 1.0  # two widths below: capped
