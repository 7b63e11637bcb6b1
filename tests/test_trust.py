"""A verdict and a recipe to trust in every regime: the held-out estimate describes the written recipe at k = 2
and k = 5 (positive where a gain is planted, about zero with a spread where there is none), the overall gate
writes the plain rule where the gain is not reliable, ``--strategy auto`` picks by held-out images, test maps
that are not like the OOF maps are named, and per-fold test stores are combined fold by fold."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import flat
from typer.testing import CliRunner

from bench.fixture import fixture
from segens.cli import app
from segens.conventions.classes import NUM_CLASSES
from segens.conventions.rle import decode
from segens.conventions.submission import read_submission
from segens.ensemble.combine import combine
from segens.ensemble.evaluate import evaluate_submission
from segens.errors import SegensError
from segens.search.run import search_weights
from segens.store import create_store, open_store


def built(tmp_path_factory, mode: str, k: int, fold_maps: bool = False):
    return fixture(tmp_path_factory.getbasetemp() / "fixtures", 24, 8, 512, 3, seed=1, jobs=1, log=lambda _: None,
                   mode=mode, k=k, fold_maps=fold_maps)


def search(data, out: Path, **options):
    return search_weights([str(path) for path in data.oof], data.root, data.folds, out, cv=True, step=0.25,
                          progress=False, **options)


@pytest.mark.parametrize("k", [2, 5])
def test_a_planted_gain_shows_as_a_positive_held_out_estimate(tmp_path_factory, tmp_path: Path, k: int) -> None:
    """Members mis-calibrated per class (the strong fixture): thresholds searched without the scored fold beat the
    plain mean on it, at two folds as at five; the recipe written moves classes and is not gated."""
    report = search(built(tmp_path_factory, "strong", k), tmp_path / "r.json")
    summary = report.summary()
    assert summary["cv_gain_over_mean"] > 2 * summary["cv_gain_over_mean_se"] > 0
    assert not report.gated and summary["classes_plain"] < NUM_CLASSES
    assert "beats the plain mean on held-out images" in report.verdict()


@pytest.mark.parametrize("k", [2, 5])
def test_no_gain_shows_as_about_zero_with_a_spread(tmp_path_factory, tmp_path: Path, k: int) -> None:
    """Equal, calibrated members (the null fixture): the held-out estimate of the recipe that is written is about
    zero with a non-zero spread. Where the overall gate writes the plain rule (weighted voting's: the plain mean
    itself), that recipe's own estimate is 0 ± 0 by construction (the plain mean scored against itself, image by
    image), so the figure that describes it is the gate's: the held-out gain over the plain rule of the recipe the
    no-loss rule made (each image scored by levels decided without its fold), which decided that the plain rule is
    written. Searching every class shows no gain either (it fits noise)."""
    report = search(built(tmp_path_factory, "null", k), tmp_path / "r.json")
    summary = report.summary()
    if report.gated:
        assert summary["cv_gain_over_mean"] == summary["cv_gain_over_mean_se"] == 0  # the plain mean, by itself
        gain, spread = summary["gate_gain"], summary["gate_se"]
        assert (gain, spread) == (report.gate.gain, report.gate.se) and not report.gate.reliable
    else:
        gain, spread = summary["cv_gain_over_mean"], summary["cv_gain_over_mean_se"]
    assert spread > 0 and abs(gain) <= 2 * spread and abs(gain) < 0.002
    assert summary["cv_gain_searched_over_mean"] < 2 * summary["cv_gain_searched_over_mean_se"]
    assert summary["classes_plain"] >= NUM_CLASSES - 1


def test_the_overall_gate_writes_the_plain_rule_and_no_fallback_keeps_the_search(tmp_path_factory,
                                                                                 tmp_path: Path) -> None:
    data = built(tmp_path_factory, "null", 5)
    report = search(data, tmp_path / "r.json")
    recipe = json.loads((tmp_path / "r.json").read_text())
    assert report.gated and report.gate is not None and not report.gate.reliable
    assert all(level == "plain" for level in recipe["oof_dice"]["levels"].values())
    assert recipe["thresholds"] == [float(np.float32(127.5 / 255))] * NUM_CLASSES
    assert all(weights == [1 / 3] * 3 for weights in recipe["weights"])
    assert "so the recipe written is the plain rule" in report.verdict()
    assert report.summary()["cv_gain_over_mean"] == 0
    kept = search(data, tmp_path / "kept.json", fallback=False)
    assert not kept.gated and kept.gate is None and kept.summary()["classes_searched"] == NUM_CLASSES
    assert "No fallback" in kept.verdict()


def test_auto_picks_soft_over_hard_on_independent_members_and_says_why(tmp_path_factory, tmp_path: Path) -> None:
    report = search(built(tmp_path_factory, "null", 5), tmp_path / "r.json", strategy="auto")
    recipe = json.loads((tmp_path / "r.json").read_text())
    assert report.strategy == recipe["strategy"] == "soft" and recipe["search"]["strategy"] == "auto"
    hard = report.alternatives["hard"].comparisons()["recipe over mean"]
    assert hard.gain < 0
    assert "Strategy soft chosen" in report.verdict() and "hard" in report.choice_reason
    combine([str(path) for path in built(tmp_path_factory, "null", 5).test], tmp_path / "out.csv",
            recipe_path=tmp_path / "r.json", progress=False)  # no --strategy: the recipe's
    with pytest.raises(SegensError, match="the recipe is for strategy 'soft', not 'hard'"):
        combine([str(path) for path in built(tmp_path_factory, "null", 5).test], tmp_path / "x.csv", "hard",
                recipe_path=tmp_path / "r.json", progress=False)


def test_hard_voting_by_habit_is_told_it_loses_to_the_plain_mean(tmp_path_factory, tmp_path: Path) -> None:
    """Independent, equally good members (the null fixture) and ``ens search-weights --strategy hard``: the recipe
    written is hard's plain rule (a majority of votes at 0.5), and the verdict printed gives its held-out gain over
    the plain mean (soft voting at 0.5), which it loses to; soft's verdict, whose plain rule is that mean, needs no
    such sentence."""
    data = built(tmp_path_factory, "null", 5)
    result = CliRunner().invoke(app, ["search-weights", *map(str, data.oof), "--data", str(data.root), "--folds",
                                      str(data.folds), "--out", str(tmp_path / "hard.json"), "--cv", "--step", "0.25",
                                      "--strategy", "hard"])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "hard.json").read_text())["oof_dice"]["summary"]
    assert summary["classes_plain"] == NUM_CLASSES
    gain, spread = summary["cv_gain_over_mean"], summary["cv_gain_over_mean_se"]
    assert gain < -2 * spread < 0  # reliably behind the plain mean on held-out images
    assert (f"The hard recipe written loses to the plain mean (soft voting at 0.5) on held-out images: "
            f"{gain:+.4f} ± {spread:.4f} Dice: the plain mean does better here (--strategy soft, or auto to "
            "compare).") in flat(result.output)
    soft = search(data, tmp_path / "soft.json", strategy="soft")
    assert soft.plain_is_mean() and "soft voting at 0.5" not in soft.verdict()


def softened(source: Path, target: Path) -> Path:
    """A copy of a test store whose maps are softer: each value's logit divided by 3 (a wide transition band, as a
    mean of disagreeing fold models gives)."""
    store = open_store(source)
    copy = create_store(target, store.member, store.kind, store.split, store.spec, store.checkpoints,
                        images=list(store.planned))
    for key in store.keys():
        p = np.clip(store.read(key).astype(np.float64) / 255, 1e-6, 1 - 1e-6)
        soft = 1 / (1 + np.exp(-np.log(p / (1 - p)) / 3))
        copy.write_image(key, np.rint(np.where(store.read(key) > 0, soft, 0) * 255).astype(np.uint8))
    return target


def test_the_shift_warning_fires_on_softer_test_maps_only(tmp_path_factory, tmp_path: Path) -> None:
    data = built(tmp_path_factory, "strong", 5)
    search(data, tmp_path / "r.json")
    quiet = combine([str(path) for path in data.test], tmp_path / "a.csv", recipe_path=tmp_path / "r.json",
                    progress=False)
    assert quiet.shifted == {}
    test = [str(path) for path in data.test]
    test[0] = str(softened(data.test[0], tmp_path / "soft.zarr"))
    loud = combine(test, tmp_path / "b.csv", recipe_path=tmp_path / "r.json", progress=False, force=True)
    assert list(loud.shifted) == [data.members[0]] and len(loud.shifted[data.members[0]]) >= 10
    assert any("soft share" in phrase for phrase in loud.shifted[data.members[0]])


def test_per_fold_test_stores_are_combined_fold_by_fold(tmp_path_factory, tmp_path: Path) -> None:
    """Each fold's stores voted on with the recipe, the masks merged by majority (ties: the folds' mean values),
    against a straightforward reference; the recipe's checkpoint of each fold must be the store's."""
    data = built(tmp_path_factory, "strong", 2, fold_maps=True)
    search(data, tmp_path / "r.json")
    recipe = json.loads((tmp_path / "r.json").read_text())
    per_fold = [str(path) for fold in data.test_folds for path in fold]
    combine(per_fold, tmp_path / "pf.csv", recipe_path=tmp_path / "r.json", progress=False)
    rows = read_submission(tmp_path / "pf.csv")
    weights = np.array(recipe["weights"], np.float64)
    weights = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)
    thresholds = np.array(recipe["thresholds"], np.float32)
    stores = [[open_store(path) for path in fold] for fold in data.test_folds]
    for key in stores[0][0].keys():
        height, width = stores[0][0].image_size(key)
        values = [[store.read(key) for store in fold] for fold in stores]
        kept = []
        for fold in values:
            total = np.zeros((NUM_CLASSES, height, width), np.float32)
            for member, maps in enumerate(fold):
                total += weights[:, member, None, None] * (maps.astype(np.float32) / np.float32(255))
            kept.append(total > thresholds[:, None, None])
        votes = np.sum(kept, axis=0)
        mean = [np.rint(sum(fold[m].astype(np.float64) for fold in values) / 2).astype(np.uint8)
                for m in range(len(values[0]))]
        total = np.zeros((NUM_CLASSES, height, width), np.float32)
        for member, maps in enumerate(mean):
            total += weights[:, member, None, None] * (maps.astype(np.float32) / np.float32(255))
        expected = (votes * 2 > 2) | ((votes * 2 == 2) & (total > thresholds[:, None, None]))
        rles = rows.image(key.rsplit("/", 1)[-1] + ".png")
        for channel in range(NUM_CLASSES):
            if recipe["postprocess"][channel]:
                continue  # post-processing is the same function combine applies everywhere
            np.testing.assert_array_equal(decode(rles[channel], height, width), expected[channel])
    average = combine([str(path) for path in data.test], tmp_path / "avg.csv", recipe_path=tmp_path / "r.json",
                      progress=False)
    assert average.images == len(stores[0][0].keys())
    assert abs(evaluate_submission(tmp_path / "pf.csv", data.root).mean()
               - evaluate_submission(tmp_path / "avg.csv", data.root).mean()) < 0.01
    with pytest.raises(SegensError, match="has stores of folds"):
        combine(per_fold[:-1], tmp_path / "x.csv", recipe_path=tmp_path / "r.json", progress=False)
    with pytest.raises(SegensError, match="the mean of its member's folds"):
        combine([*per_fold, str(data.test[0])], tmp_path / "x.csv", recipe_path=tmp_path / "r.json", progress=False)
