"""ens search-weights: exactness against brute force on small stores, each strategy, post-processing, the CV
estimate where overfitting is built in, and the recipe's round trip into ens combine."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import flat
from scipy import ndimage
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import discover, read_record_mask
from segens.ensemble.combine import combine
from segens.ensemble.evaluate import evaluate_submission
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.search import run as search_weights_module
from segens.search.evidence import extract_class, threshold_grid
from segens.search.kernels import hard_dice
from segens.search.levels import make_subsets
from segens.search.resume import partial_root
from segens.search.run import search_weights
from segens.search.scorer import ClassScorer as WeightedSearch
from segens.store import create_store, open_store
from segens.synth import generate
from segens.voting.base import best_cell as _best
from segens.voting.mean import base_candidates

THRESHOLDS = threshold_grid()


def member_maps(truth: np.ndarray, rng: np.random.Generator, blur: float, noise: float, shift: int = 0) -> np.ndarray:
    """(29, H, W) uint8 'network output' from ground truth: shifted, blurred, noisy, small values cut to 0."""
    maps = np.zeros(truth.shape, np.uint8)
    for channel, mask in enumerate(truth):
        soft = ndimage.gaussian_filter(np.roll(mask, shift, axis=1).astype(np.float32), blur)
        soft = np.clip(soft + rng.normal(0, noise, soft.shape) * (soft > 0.02), 0, 1)
        soft[soft < 0.03] = 0
        maps[channel] = np.rint(soft * 255).astype(np.uint8)
    return maps


def build_oof(root: Path, base: Path, members: dict[str, dict], seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    records = discover(root, "train").records
    paths = []
    for name, settings in members.items():
        store = create_store(base / f"{name}.oof.zarr", name, "smp", "oof", {"name": name},
                             {0: {"path": f"{name}.pt", "sha256": f"sha-{name}"}}, images=[r.key for r in records])
        for record in records:
            truth = read_record_mask(record)
            maps = settings.get("fixed") if "fixed" in settings else member_maps(truth, rng, **settings)
            store.write_image(record.key, maps if maps is not None else np.zeros(truth.shape, np.uint8))
        paths.append(base / f"{name}.oof.zarr")
    return paths


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("search")
    generate(base / "data", n_train_patients=4, n_test_patients=1, size=64, seed=3)
    folds, _ = make_folds(base / "data", k=4, seed=0)
    save_folds(folds, base / "folds.json")
    build_oof(base / "data", base, {"sharp": {"blur": 0.8, "noise": 0.15}, "blurry": {"blur": 2.0, "noise": 0.05},
                                    "shifted": {"blur": 1.0, "noise": 0.1, "shift": 2}, "zero": {"fixed": None}})
    return base


def stores_of(project: Path, names=("sharp", "blurry", "shifted", "zero")):
    return [open_store(project / f"{name}.oof.zarr") for name in names]


def reference_truth(record, channel: int) -> np.ndarray:
    """(H, W) bool truth of one class, straight from the label file: its polygon filled at the PNG's size."""
    document = json.loads(record.label_path.read_text())
    (points,) = [a["points"] for a in document["annotations"] if a["label"] == CLASSES[channel]]
    height, width = cv2.imread(str(record.image_path), cv2.IMREAD_UNCHANGED).shape[:2]
    mask = np.zeros((height, width), np.uint8)
    cv2.fillPoly(mask, [np.rint(np.asarray(points, np.float64)).astype(np.int32).reshape(-1, 1, 2)], 1)
    return mask.astype(bool)


def brute_force_weighted(stores, records, channel: int, weights: np.ndarray) -> np.ndarray:
    """(K,) mean Dice over images at full resolution, every threshold, the same float32 arithmetic as combine;
    weights normalised here (float64 division, then float32), truth rasterised here."""
    scores = np.zeros((len(records), THRESHOLDS.size))
    raw = np.asarray(weights, np.float64)
    w = (raw / raw.sum()).astype(np.float32)
    for index, record in enumerate(records):
        truth = reference_truth(record, channel)
        total = np.zeros(truth.shape, np.float32)
        for m, store in enumerate(stores):
            total += w[m] * (store.read_class(record.key, channel).astype(np.float32) / np.float32(255))
        for k, threshold in enumerate(THRESHOLDS):
            mask = total > threshold
            intersection, size = np.count_nonzero(mask & truth), np.count_nonzero(mask)
            scores[index, k] = (2 * intersection + 1e-4) / (size + np.count_nonzero(truth) + 1e-4)
    return scores.mean(axis=0)


@pytest.mark.parametrize("channel", [0, 20, 27])
def test_weighted_scores_equal_brute_force(project: Path, channel: int) -> None:
    stores = stores_of(project)
    records = discover(project / "data", "train").records
    evidence = extract_class(stores, records, channel, THRESHOLDS)
    total_pixels = len(records) * 64 * 64
    assert 0 < evidence.truth.size < total_pixels / 2  # most pixels are fixed
    search = WeightedSearch(evidence, make_subsets(None), THRESHOLDS)
    search.subsets.masks = np.ones((1, len(records)), bool)
    candidates = base_candidates(4, 0.25, "weighted")
    ours = np.stack([search.scores(w)[0] for w in candidates])
    brute = np.stack([brute_force_weighted(stores, records, channel, w) for w in candidates])
    np.testing.assert_array_equal(ours, brute)


def test_best_prefers_the_earlier_candidate_then_the_threshold_nearest_half() -> None:
    """The documented tie rule on hand-built (candidates, 255 thresholds) tables; index 127 is threshold 0.5."""
    scores = np.zeros((3, 255))
    scores[0, 3] = scores[1, 127] = scores[2, 127] = 0.9  # the later candidates are tied at exactly 0.5
    assert _best(scores) == (0, 3)
    scores[0, [200, 140, 20]] = 0.9  # within the first candidate: the one nearest 127
    assert _best(scores) == (0, 140)
    scores[0, 114] = 0.9  # 13 below and 13 above 0.5: the lower threshold
    assert _best(scores) == (0, 114)
    scores[0, 127] = 0.9
    assert _best(scores) == (0, 127)
    scores[2, 250] = 0.9000001  # any higher score beats every tie
    assert _best(scores) == (2, 250)
    assert _best(np.full((4, 255), 0.25)) == (0, 127)  # all equal: equal weights (first) at 0.5


def test_adversarial_cases_equal_brute_force(tmp_path: Path, project: Path) -> None:
    """Identical members (ties), a member that is always zero, and a class empty everywhere."""
    records = discover(project / "data", "train").records
    twin_maps = {}
    for record in records:
        maps = member_maps(read_record_mask(record), np.random.default_rng(1), blur=1.0, noise=0.1)
        maps[5] = 0  # class finger-6 predicted empty by everyone
        twin_maps[record.key] = maps
    paths = []
    for name in ["twin_a", "twin_b"]:
        store = create_store(tmp_path / f"{name}.zarr", name, "smp", "oof", {}, {0: {"path": name, "sha256": name}},
                             images=list(twin_maps))
        for key, maps in twin_maps.items():
            store.write_image(key, maps)
        paths.append(tmp_path / f"{name}.zarr")
    stores = [open_store(p) for p in paths] + [open_store(project / "zero.oof.zarr")]
    for channel in (3, 5):
        evidence = extract_class(stores, records, channel, THRESHOLDS)
        search = WeightedSearch(evidence, make_subsets(None), THRESHOLDS)
        search.subsets.masks = np.ones((1, len(records)), bool)
        for w in base_candidates(3, 0.5, "weighted"):
            np.testing.assert_array_equal(search.scores(w)[0], brute_force_weighted(stores, records, channel, w))


def test_hard_scores_equal_brute_force(project: Path) -> None:
    stores = stores_of(project, ("sharp", "blurry", "shifted"))
    records = discover(project / "data", "train").records
    evidence = extract_class(stores, records, 22, THRESHOLDS)
    member_thresholds = THRESHOLDS[[100, 127, 160]]
    for votes in (1, 2, 3):
        ours = hard_dice(evidence, member_thresholds, 1, votes, THRESHOLDS)  # (images, K)
        for k in (0, 60, 127, 254):
            dice = []
            chosen = member_thresholds.copy()
            chosen[1] = THRESHOLDS[k]
            for record in records:
                truth = reference_truth(record, 22)
                count = sum((s.read_class(record.key, 22).astype(np.float32) / np.float32(255) > t).astype(int)
                            for s, t in zip(stores, chosen))
                mask = count >= votes
                both, size = np.count_nonzero(mask & truth), np.count_nonzero(mask) + np.count_nonzero(truth)
                dice.append((2 * both + 1e-4) / (size + 1e-4))
            np.testing.assert_array_equal(ours[:, k], dice)


@pytest.mark.parametrize("strategy", ["weighted", "soft", "hard"])
def test_recipe_round_trip_into_combine(project: Path, tmp_path: Path, strategy: str) -> None:
    paths = [str(project / f"{name}.oof.zarr") for name in ("sharp", "blurry", "shifted")]
    report = search_weights(paths, project / "data", project / "folds.json", tmp_path / "recipe.json",
                            strategy=strategy, step=0.25, progress=False)
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    assert recipe["strategy"] == strategy and len(recipe["postprocess"]) == NUM_CLASSES
    # the recipe applied by ens combine to the OOF stores scores exactly what the search reported
    combine(paths, tmp_path / "oof.csv", strategy, recipe_path=tmp_path / "recipe.json", progress=False)
    table = evaluate_submission(tmp_path / "oof.csv", project / "data", "train")
    np.testing.assert_allclose(table.per_class(), [r.oof_dice for r in report.classes], rtol=0, atol=1e-12)
    # never worse on OOF than the plain mean or the best single member at 0.5
    for result in report.classes:
        assert result.oof_dice >= result.mean_dice - 1e-12
        if strategy == "weighted":
            assert result.oof_dice >= max(result.member_dice) - 1e-12


SPURIOUS = range(0, 10)  # classes given a false blob far from the bone: keeping the largest component helps
HOLED = range(19, 29)  # classes given a hole inside the bone (the larger bones): filling holes helps


def defective_maps(truth: np.ndarray) -> np.ndarray:
    """(29, H, W) uint8: the truth, blurred a little, plus a 3x3 false blob far from the bone (SPURIOUS
    classes) or with a one-pixel hole punched into the bone (HOLED classes)."""
    maps = np.zeros(truth.shape, np.uint8)
    for channel, mask in enumerate(truth):
        soft = ndimage.gaussian_filter(mask.astype(np.float32), 0.7)
        soft[soft < 0.03] = 0
        maps[channel] = np.rint(soft * 255).astype(np.uint8)
        if channel in SPURIOUS:
            distance = ndimage.distance_transform_edt(~ndimage.binary_dilation(mask, iterations=3))
            y, x = np.clip(np.unravel_index(np.argmax(distance), mask.shape), 1, np.array(mask.shape) - 2)
            maps[channel, y - 1 : y + 2, x - 1 : x + 2] = 255
        elif channel in HOLED:
            inside = np.argwhere(ndimage.binary_erosion(mask))
            if len(inside):
                y, x = inside[len(inside) // 2]
                maps[channel, y, x] = 0
    return maps


def test_postprocessing_is_kept_only_where_it_helps(project: Path, tmp_path: Path) -> None:
    """Largest-component is kept for the classes with a false blob, hole filling for the classes with a hole,
    each only where it raises the class's OOF Dice."""
    paths = []
    for name in ("d1", "d2"):
        records = discover(project / "data", "train").records
        store = create_store(tmp_path / f"{name}.zarr", name, "smp", "oof", {}, {0: {"path": name, "sha256": name}},
                             images=[record.key for record in records])
        for record in records:
            store.write_image(record.key, defective_maps(read_record_mask(record)))
        paths.append(str(tmp_path / f"{name}.zarr"))
    with_pp = search_weights(paths, project / "data", None, tmp_path / "a.json", step=0.5, progress=False)
    without = search_weights(paths, project / "data", None, tmp_path / "b.json", step=0.5, postprocess=False,
                             progress=False)
    for kept, plain in zip(with_pp.classes, without.classes):
        if kept.postprocess:
            assert kept.oof_dice > plain.oof_dice, CLASSES[kept.channel]
        else:
            assert kept.oof_dice == plain.oof_dice, CLASSES[kept.channel]
    kept_by_class = {CLASSES[result.channel]: result.postprocess for result in with_pp.classes}
    for channel in SPURIOUS:
        assert "largest_component" in kept_by_class[CLASSES[channel]], kept_by_class
    for channel in HOLED:
        assert "fill_holes" in kept_by_class[CLASSES[channel]], kept_by_class
    assert json.loads((tmp_path / "a.json").read_text())["postprocess"] == [r.postprocess for r in with_pp.classes]


def test_cv_shows_no_gain_from_a_member_right_by_chance(tmp_path: Path) -> None:
    """Two identical binary members (ground truth, eroded or dilated) and a 'lucky' member that is exactly right
    on fold 0's images and empty elsewhere: on OOF, giving it weight pays; on held-out folds it cannot."""
    from segens.folds.file import load_folds

    generate(tmp_path / "data", n_train_patients=8, n_test_patients=1, size=64, seed=5)
    folds, _ = make_folds(tmp_path / "data", k=4, seed=0)
    save_folds(folds, tmp_path / "folds.json")
    folds = load_folds(tmp_path / "folds.json")
    planned = [record.key for record in discover(tmp_path / "data", "train").records]
    stores = {name: create_store(tmp_path / f"{name}.zarr", name, "smp", "oof", {}, {0: {"path": name, "sha256": name}},
                                 images=planned)
              for name in ("a", "b", "lucky")}
    for index, record in enumerate(discover(tmp_path / "data", "train").records):
        truth = read_record_mask(record)
        change = ndimage.binary_erosion if index % 2 else ndimage.binary_dilation
        member = np.stack([change(mask) for mask in truth]).view(np.uint8) * np.uint8(255)
        stores["a"].write_image(record.key, member)
        stores["b"].write_image(record.key, member)
        lucky = truth.view(np.uint8) * np.uint8(255 if folds.fold_of(record.key) == 0 else 0)
        stores["lucky"].write_image(record.key, lucky)
    report = search_weights([str(tmp_path / f"{n}.zarr") for n in ("a", "b", "lucky")], tmp_path / "data",
                            tmp_path / "folds.json", tmp_path / "r.json", step=0.25, cv=True, postprocess=False,
                            progress=False)
    summary = report.summary()
    assert summary["cv_gain_searched_over_mean"] <= 1e-12  # held out, searching gains nothing
    # the no-loss rule sees it on the held-out folds: no class keeps the fitted weights, so the recipe does not
    # carry the lucky member's flattering OOF weight (searched everywhere it would: see below)
    assert summary["classes_searched"] == 0
    assert all(result.recipe_choice.weights.tolist() == [1 / 3] * 3 for result in report.classes)
    assert summary["recipe"] <= summary["plain_mean"] + 0.01
    assert "does not beat the plain rule" in report.verdict() or "NOT reliably better" in report.verdict()
    unguarded = search_weights([str(tmp_path / f"{n}.zarr") for n in ("a", "b", "lucky")], tmp_path / "data",
                               tmp_path / "folds.json", tmp_path / "r2.json", step=0.25, cv=True, postprocess=False,
                               progress=False, fallback=False)
    assert unguarded.summary()["recipe"] > summary["plain_mean"] + 0.01  # on OOF the fitted recipe flatters itself
    assert unguarded.summary()["cv_gain_over_mean"] <= 1e-12
    assert "NOT reliably better" in unguarded.verdict()
    gain = unguarded.summary()["cv_gain_over_best_member"]
    assert f"against the best single member of each class: {gain:+.4f}" in unguarded.verdict()
    assert "No fallback" in unguarded.verdict() and "other folds" not in unguarded.verdict()


def test_cli_writes_recipe_report_and_plot(project: Path, tmp_path: Path) -> None:
    stores = [str(project / f"{name}.oof.zarr") for name in ("sharp", "blurry")]
    result = CliRunner().invoke(app, ["search-weights", *stores, "--data", str(project / "data"), "--folds",
                                      str(project / "folds.json"), "--cv", "--step", "0.5", "--out",
                                      str(tmp_path / "recipe.json"), "--report-csv", str(tmp_path / "report.csv"),
                                      "--plot", str(tmp_path / "report.png")])
    assert result.exit_code == 0, result.output
    assert "mean over classes" in flat(result.output) and "held-out images" in flat(result.output)
    recipe = json.loads((tmp_path / "recipe.json").read_text())
    report = pd.read_csv(tmp_path / "report.csv")
    assert list(report["class"]) == list(CLASSES)
    np.testing.assert_allclose(report["recipe"], [recipe["oof_dice"]["per_class"][c] for c in CLASSES], atol=5e-7)
    np.testing.assert_allclose(report["plain_mean"], recipe["oof_dice"]["plain_mean"], atol=5e-7)
    np.testing.assert_allclose(report["sharp"], recipe["oof_dice"]["members"]["sharp"], atol=5e-7)
    assert list(report["threshold"]) == [round(t, 4) for t in recipe["thresholds"]]
    # the plot: 12 x 9 inches at 110 dpi; a green bar per class the recipe gains on, a red one per class it loses
    picture = cv2.imread(str(tmp_path / "report.png"))
    assert picture.shape == (990, 1320, 3)
    gains = np.array([recipe["oof_dice"]["per_class"][c] for c in CLASSES]) - np.array(recipe["oof_dice"]["plain_mean"])
    green = np.all(picture == (44, 160, 44), axis=-1).sum()  # matplotlib's tab:green in BGR
    red = np.all(picture == (40, 39, 214), axis=-1).sum()  # tab:red
    assert (green > 0) == bool((gains > 0).any()) and (red > 0) == bool((gains < 0).any())
    assert (gains > 0).any()


def test_search_refuses_test_stores(project: Path, tmp_path: Path) -> None:
    key = discover(project / "data", "train").records[0].key
    store = create_store(tmp_path / "t.zarr", "t", "smp", "test", {}, {0: {"path": "t", "sha256": "t"}}, images=[key])
    store.write_image(key, np.zeros((29, 64, 64), np.uint8))
    from segens.errors import SegensError

    with pytest.raises(SegensError, match="needs OOF stores"):
        search_weights([tmp_path / "t.zarr"], project / "data", None, tmp_path / "r.json", progress=False)


def _without_time(recipe_path: Path) -> dict:
    recipe = json.loads(recipe_path.read_text())
    recipe["search"].pop("seconds")
    return recipe


STOP_AFTER = 3  # classes a killed search has finished


@pytest.fixture(scope="module")
def killed_search(project: Path, tmp_path_factory) -> dict:
    """A search (2 stores, step 0.5, with --cv) SIGKILLed once it has finished exactly STOP_AFTER classes, and
    the same search run to the end. The killed process stops itself (SIGSTOP) as it starts class STOP_AFTER,
    so every earlier class was finished and saved; the test waits for that stop, not for a clock."""
    base = tmp_path_factory.mktemp("resume")
    stores = []
    for name in ("sharp", "blurry"):
        shutil.copytree(project / f"{name}.oof.zarr", base / f"{name}.oof.zarr")
        stores.append(str(base / f"{name}.oof.zarr"))
    inputs = {"stores": stores, "data": str(project / "data"), "folds": str(project / "folds.json")}
    search_weights(stores, inputs["data"], inputs["folds"], base / "clean" / "recipe.json", step=0.5, cv=True,
                   progress=False)
    killed = base / "killed" / "recipe.json"
    killed.parent.mkdir()
    script = f"""
import os, signal
from segens.search import run as module
searched, original = [], module._one_class
def stop_before_class(*args, **kwargs):
    if len(searched) == {STOP_AFTER}:
        os.kill(os.getpid(), signal.SIGSTOP)
    searched.append(args[0].channel)
    return original(*args, **kwargs)
module._one_class = stop_before_class
module.search_weights({stores!r}, {inputs["data"]!r}, {inputs["folds"]!r}, {str(killed)!r}, step=0.5, cv=True,
                      progress=False)
"""
    process = subprocess.Popen([sys.executable, "-c", script])
    _, status = os.waitpid(process.pid, os.WUNTRACED)
    assert os.WIFSTOPPED(status), f"the search ended before its class {STOP_AFTER} (status {status})"
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not killed.exists()
    files = [path for path in killed.parent.rglob("class-*") if path.is_file()]
    assert len(files) == STOP_AFTER, files  # one file per finished class, whatever its format
    assert list(killed.parent.rglob("evidence/batch-*.npz"))  # and the evidence, read once
    shutil.copytree(killed.parent, base / "snapshot")
    return {"base": base, "inputs": inputs, "killed": killed, "snapshot": base / "snapshot"}


def _restore(state: dict) -> Path:
    """The killed search's folder as the kill left it; returns the recipe path to search into."""
    shutil.rmtree(state["killed"].parent)
    shutil.copytree(state["snapshot"], state["killed"].parent)
    return state["killed"]


@pytest.fixture
def searched_channels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The channels search_weights actually searches in this process (jobs=1), in order."""
    searched = []
    original = search_weights_module._one_class

    def record(*args, **kwargs):
        searched.append(args[0].channel)
        return original(*args, **kwargs)

    monkeypatch.setattr(search_weights_module, "_one_class", record)
    return searched


def test_killed_search_resumes_from_its_finished_classes(killed_search: dict, searched_channels: list[int]) -> None:
    """The rerun searches only the classes the killed run had not finished and writes the uninterrupted run's
    recipe; the resume folder is gone once the recipe is written."""
    out, inputs = _restore(killed_search), killed_search["inputs"]
    search_weights(inputs["stores"], inputs["data"], inputs["folds"], out, step=0.5, cv=True, progress=False)
    assert searched_channels == list(range(STOP_AFTER, NUM_CLASSES))
    assert _without_time(out) == _without_time(killed_search["base"] / "clean" / "recipe.json")
    assert sorted(path.name for path in out.parent.iterdir()) == ["recipe.json"]


def _repredict_under_another_checkpoint(path: Path) -> None:
    """Rewrite a store in place with the same maps under another checkpoint hash (same path, same images)."""
    source = open_store(path)
    maps = {key: source.read(key) for key in source.keys()}
    store = create_store(path, source.member, "smp", "oof", {"name": source.member},
                         {0: {"path": "other.pt", "sha256": "sha-other"}}, images=list(maps), overwrite=True)
    for key, values in maps.items():
        store.write_image(key, values)


@pytest.mark.parametrize("change", ["step", "strategy", "folds", "store"])
def test_a_changed_input_never_reuses_a_finished_class(killed_search: dict, searched_channels: list[int],
                                                       project: Path, tmp_path: Path, change: str) -> None:
    out, inputs = _restore(killed_search), dict(killed_search["inputs"])
    options = {"step": 0.5, "cv": True, "strategy": "weighted"}
    store = Path(inputs["stores"][1])
    if change == "step":
        options["step"] = 0.25
    elif change == "strategy":
        options["strategy"] = "soft"
    elif change == "folds":
        folds, _ = make_folds(project / "data", k=2, seed=0)
        save_folds(folds, tmp_path / "folds-k2.json")
        inputs["folds"] = str(tmp_path / "folds-k2.json")
    else:
        shutil.copytree(store, tmp_path / "backup.zarr")
        _repredict_under_another_checkpoint(store)
    try:
        search_weights(inputs["stores"], inputs["data"], inputs["folds"], out, progress=False, **options)
    finally:
        if change == "store":
            shutil.rmtree(store)
            shutil.copytree(tmp_path / "backup.zarr", store)
    assert searched_channels == list(range(NUM_CLASSES))  # every class searched again
    recipe = json.loads(out.read_text())
    assert recipe["strategy"] == options["strategy"] and recipe["search"]["step"] == options["step"]
    assert recipe["search"]["folds"] == inputs["folds"]
    assert sorted(path.name for path in out.parent.iterdir()) == ["recipe.json"]


def test_another_searchs_resume_files_copied_in_are_ignored_with_a_note(killed_search: dict, project: Path,
                                                                       searched_channels: list[int], tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The killed search's files (weighted, step 0.5, stores sharp and blurry), copied for real into the resume folder
    of a search with other stores and settings (soft, step 0.25, stores sharp and shifted: as many members, so its
    files fit in shape and only their key tells them apart): every class is searched and the evidence extracted
    again, the recipe is a fresh search's, and the verdict names each class file and evidence batch it ignored."""
    copied = [path for path in sorted(killed_search["snapshot"].rglob("*"))
              if path.is_file() and (path.name.startswith("class-") or path.name.startswith("batch-"))]
    assert {path.suffix for path in copied} == {".json", ".npz"} and len(copied) > STOP_AFTER
    original, keys = search_weights_module.search_key, []  # the search's key names its resume folder
    monkeypatch.setattr(search_weights_module, "search_key",
                        lambda *args, **kwargs: keys.append(original(*args, **kwargs)) or keys[-1])
    stores = [str(project / f"{name}.oof.zarr") for name in ("sharp", "shifted")]
    data, folds = killed_search["inputs"]["data"], killed_search["inputs"]["folds"]
    fresh = search_weights(stores, data, folds, tmp_path / "fresh" / "recipe.json", strategy="soft", step=0.25,
                           cv=True, progress=False)
    assert fresh.notes == [] and searched_channels == list(range(NUM_CLASSES))
    out = tmp_path / "copied" / "recipe.json"
    folder = partial_root(out) / keys[0][:32]
    (folder / "evidence").mkdir(parents=True)
    for path in copied:
        shutil.copy2(path, (folder / "evidence" if path.suffix == ".npz" else folder) / path.name)
    searched_channels.clear()
    report = search_weights(stores, data, folds, out, strategy="soft", step=0.25, cv=True, progress=False)
    assert keys[1] == keys[0] and searched_channels == list(range(NUM_CLASSES))
    assert report.notes == [f"ignored {path.name}: it belongs to another search (other stores, labels, folds or "
                            "settings)" for path in copied]
    recipe, expected = _without_time(out), _without_time(tmp_path / "fresh" / "recipe.json")
    verdict, fresh_verdict = recipe["oof_dice"].pop("verdict"), expected["oof_dice"].pop("verdict")
    assert recipe == expected and verdict == " ".join([fresh_verdict, *report.notes])
    assert sorted(path.name for path in out.parent.iterdir()) == ["recipe.json"]


def test_jobs_2_writes_the_same_recipe_as_jobs_1(project: Path, tmp_path: Path) -> None:
    paths = [str(project / f"{name}.oof.zarr") for name in ("sharp", "blurry")]
    for jobs in (1, 2):
        search_weights(paths, project / "data", project / "folds.json", tmp_path / f"jobs{jobs}.json", step=0.5,
                       cv=True, jobs=jobs, progress=False)
    assert _without_time(tmp_path / "jobs2.json") == _without_time(tmp_path / "jobs1.json")


@pytest.mark.parametrize("strategy", ["weighted", "hard"])
def test_masks_rebuilt_from_evidence_equal_combines(project: Path, strategy: str) -> None:
    """Post-processing is scored on masks rebuilt from the evidence (always-positive bits + kept ambiguous
    pixels); for every image they equal combine's mask of the same settings, pixel for pixel."""
    from segens.ensemble.combine import class_mask
    from segens.search.evidence import image_masks
    from segens.voting.base import Settings
    from segens.voting.rules import hard_keep, weighted_keep

    stores = stores_of(project)
    records = discover(project / "data", "train").records
    for channel in (3, 21, 28):
        evidence = extract_class(stores, records, channel, THRESHOLDS)
        weights = np.ones((NUM_CLASSES, 4), np.float32)
        thresholds = np.full(NUM_CLASSES, 0.5, np.float32)
        member_thresholds = np.full((NUM_CLASSES, 4), 0.5, np.float32)
        if strategy == "weighted":
            weights[channel] = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
            thresholds[channel] = THRESHOLDS[101]
            kept = weighted_keep(list(evidence.values), weights[channel], thresholds[channel])
            min_votes = None
        else:
            member_thresholds[channel] = THRESHOLDS[[40, 127, 200, 90]]
            min_votes = np.full(NUM_CLASSES, 2.0)
            kept = hard_keep(list(evidence.values), np.ones(4), member_thresholds[channel], 2.0, 4.0)
        settings = Settings(strategy, weights, thresholds, member_thresholds, min_votes)
        present = np.ones(4, bool)
        for record, made in zip(records, image_masks(evidence, kept)):
            box, mask = class_mask(stores, record.key, channel, settings, present, [s.boxes(record.key) for s in stores])
            if made is None:
                assert box is None
                continue
            rebuilt, truth = made
            np.testing.assert_array_equal(rebuilt, mask)
            np.testing.assert_array_equal(truth, reference_truth(record, channel)[box[0]:box[1], box[2]:box[3]])


def test_fill_holes_equals_scipys() -> None:
    from segens.voting.morphology import fill_holes

    rng = np.random.default_rng(0)
    for _ in range(2000):
        mask = rng.random(tuple(rng.integers(1, 30, 2))) < rng.uniform(0.1, 0.9)
        np.testing.assert_array_equal(fill_holes(mask), ndimage.binary_fill_holes(mask))


def test_choose_level_needs_more_than_a_standard_error() -> None:
    from segens.search.levels import choose_level

    plain = np.array([0.95, 0.96, 0.94, 0.95, 0.96])
    assert choose_level({"plain": plain, "threshold": plain + 0.001, "searched": plain + 0.002}) == "searched"
    noisy = np.array([0.004, -0.003, 0.003, -0.002, 0.0005])  # mean +0.0005, standard error 0.0014
    assert choose_level({"plain": plain, "threshold": plain + noisy, "searched": plain - 0.001}) == "plain"
    assert choose_level({"plain": plain, "threshold": plain + 0.001, "searched": plain + 0.001}) == "threshold"
    assert choose_level({"plain": plain, "searched": plain}) == "plain"  # a tie keeps the simpler rule


def test_cv_figure_of_the_recipe_decides_levels_without_the_scored_fold(project: Path, tmp_path: Path) -> None:
    """Each fold's recipe figure applies the same rule without that fold's images: its level is the one a search of
    the other folds' images alone writes, scored with the setting chosen on them. Deciding with the scored fold
    too would flatter the estimate (it does here)."""
    from segens.search.levels import LEVEL_NAMES

    report = search_weights([str(project / "sharp.oof.zarr")], project / "data", project / "folds.json",
                            tmp_path / "r.json", strategy="soft", step=0.25, cv=True, progress=False)
    source = open_store(project / "sharp.oof.zarr")
    folds = json.loads((project / "folds.json").read_text())["folds"]
    honest, flattering = [], []
    for index, fold in enumerate(sorted(set(folds.values()))):
        kept = [key for key in source.planned if folds[key] != fold]
        store = create_store(tmp_path / f"without-{fold}.zarr", "sharp", "smp", "oof", {}, source.checkpoints,
                             images=kept)
        for key in kept:
            store.write_image(key, source.read(key))
        alone = search_weights([str(tmp_path / f"without-{fold}.zarr")], project / "data", project / "folds.json",
                               tmp_path / f"without-{fold}.json", strategy="soft", step=0.25, cv=True,
                               progress=False)
        for full, without in zip(report.ungated or report.classes, alone.ungated or alone.classes):
            row = full.cv[index]
            decided = LEVEL_NAMES[int(row["recipe_level"])]
            assert (decided, row["fold"]) == (without.level, fold), CLASSES[full.channel]
            assert row["recipe"] == row[decided]
    for result in report.ungated or report.classes:
        honest.append(np.mean([fold["recipe"] - fold["mean"] for fold in result.cv]))
        flattering.append(np.mean([fold[result.level] - fold["mean"] for fold in result.cv]))
    assert np.mean(honest) < np.mean(flattering) - 0.001  # 0.0009 against 0.0023 here
    print(f"held-out gain over the plain mean: {np.mean(honest):+.4f} (levels chosen on all folds: "
          f"{np.mean(flattering):+.4f})")


@pytest.mark.parametrize("members", [1, 5, 9])
def test_distinct_rows_rebuild_every_pixel(members: int) -> None:
    """Each pixel's (values, truth) is its row's; counts add up; both key paths (up to 7 members, and more)."""
    from segens.search.evidence import distinct_rows

    rng = np.random.default_rng(members)
    values = rng.choice(np.array([0, 1, 128, 254, 255], np.uint8), size=(members, 5000))
    truth = rng.random(5000) < 0.5
    rows, row_truth, count, row = distinct_rows(values, truth)
    np.testing.assert_array_equal(rows[:, row], values)
    np.testing.assert_array_equal(row_truth[row], truth)
    np.testing.assert_array_equal(np.bincount(row, minlength=count.size), count)
    assert len({(*rows[:, i], row_truth[i]) for i in range(count.size)}) == count.size


def test_damaged_evidence_batches_are_extracted_again(project: Path, tmp_path: Path) -> None:
    """A batch file that is cut short, holds a pickled object, or whose arrays do not fit its batch (a position
    outside its box, a row out of range, counts that do not add up, another member count) is not valid: the
    search extracts it again instead of scoring from it or failing deep inside."""
    from segens.search.evidence_files import batch_path, batches, extract_batch, save_batch, valid_batch

    stores = stores_of(project)[:2]
    records = discover(project / "data", "train").records
    (batch,) = batches(len(records))
    folder = tmp_path / "evidence"
    good = extract_batch(stores, records, THRESHOLDS)
    key = "k" * 64
    save_batch(folder, batch, good, key)
    assert valid_batch(folder, batch, 2, key)
    assert not valid_batch(folder, batch, 3, key)  # a search of three members
    assert not valid_batch(folder, batch, 2, "j" * 64)  # another search's batch, copied into this folder
    path = batch_path(folder, batch)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert not valid_batch(folder, batch, 2, key)

    def changed(name: str, value) -> dict:
        return {**good, name: value}

    boxes = good["21/boxes"]
    area = int(((boxes[:, 1] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 2])).max())
    assert good["21/position"].size > 0
    for arrays in (changed("21/position", good["21/position"] + np.int32(area)),
                   changed("21/row", good["21/row"] + np.int32(good["21/truth"].size)),
                   changed("21/count", good["21/count"] + 1),
                   changed("21/values", np.array([object()], dtype=object))):
        with open(path, "wb") as handle:
            np.savez(handle, search=np.frombuffer(key.encode(), np.uint8), **arrays)
        assert not valid_batch(folder, batch, 2, key)
    save_batch(folder, batch, good, key)
    assert valid_batch(folder, batch, 2, key)  # the loop's files failed for their damage alone
