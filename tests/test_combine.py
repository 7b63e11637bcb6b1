"""ens combine: each strategy against the straightforward full-array pipeline, tie rules, post-processing,
store and recipe checks, --allow-missing, the atomic write and the CSV order."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.submission import read_submission
from segens.ensemble.combine import combine, parse_weights
from segens.errors import SegensError
from segens.reference import reference_combine, reference_encode
from segens.store import create_store, open_store
from segens.voting.recipe import Recipe, save_recipe

KEYS = ["ID001/image1661130828152_R", "ID001/image1661130828152", "ID002/image1661130900000", "ID002/image1661130900001_L"]
SHAPE = (40, 56)


def smooth_maps(seed: int, shape=SHAPE) -> np.ndarray:
    """(29, H, W) uint8 maps with a few smooth blobs per class, zero elsewhere, some classes empty."""
    rng = np.random.default_rng(seed)
    maps = np.zeros((NUM_CLASSES, *shape), dtype=np.uint8)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    for channel in range(NUM_CLASSES):
        if rng.random() < 0.15:
            continue
        field = np.zeros(shape)
        for _ in range(rng.integers(1, 3)):
            r, c, s = rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5), rng.uniform(2, 7)
            field += np.exp(-((rows - r) ** 2 + (cols - c) ** 2) / (2 * s * s))
        values = np.clip(field * rng.uniform(0.6, 1.2) * 255, 0, 255)
        values[values < 8] = 0
        maps[channel] = np.rint(values).astype(np.uint8)
    return maps


def make_store(path: Path, member: str, seed: int, keys=KEYS, split="test", shapes=None, planned=None) -> Path:
    store = create_store(path, member, "smp", split, {"name": member}, {0: {"path": f"{member}.pt", "sha256": f"sha-{member}"}},
                         images=list(planned or keys))
    for index, key in enumerate(keys):
        store.write_image(key, smooth_maps(seed * 100 + index, (shapes or {}).get(key, SHAPE)))
    return path


@pytest.fixture(scope="module")
def stores(tmp_path_factory) -> list[Path]:
    base = tmp_path_factory.mktemp("combine")
    return [make_store(base / f"{name}.zarr", name, seed) for seed, name in enumerate(["vgg", "hrnet", "yolo"], 1)]


def test_weighted_and_soft_are_byte_identical_to_the_straightforward_pipeline(stores, tmp_path: Path) -> None:
    # the reference gets its weights computed here, by hand, not from combine's own resolve_settings
    third = np.float32(1.0 / 3.0)
    cases = [("soft", None, np.full((NUM_CLASSES, 3), third, np.float32)),
             ("weighted", {"vgg": 2.0, "hrnet": 1.0, "yolo": 0.5},
              np.tile(np.array([2.0 / 3.5, 1.0 / 3.5, 0.5 / 3.5]).astype(np.float32), (NUM_CLASSES, 1)))]
    for strategy, weights, reference_weights in cases:
        combine(stores, tmp_path / f"{strategy}.csv", strategy, weights=weights, threshold=0.4, progress=False)
        reference_combine(stores, reference_weights, np.full(NUM_CLASSES, 0.4, np.float32),
                          tmp_path / f"{strategy}.ref.csv")
        ours = (tmp_path / f"{strategy}.csv").read_bytes()
        assert ours == (tmp_path / f"{strategy}.ref.csv").read_bytes()
        assert ours.count(b"\n") == 1 + len(KEYS) * NUM_CLASSES


def test_jobs_2_writes_the_same_bytes_as_jobs_1(stores, tmp_path: Path) -> None:
    for strategy in ("weighted", "hard"):
        one, two = tmp_path / f"one-{strategy}.csv", tmp_path / f"two-{strategy}.csv"
        combine(stores, one, strategy, threshold=0.3, progress=False)
        combine(stores, two, strategy, threshold=0.3, jobs=2, progress=False)
        assert two.read_bytes() == one.read_bytes()


def _full_maps(paths, key):
    return [open_store(path).read(key).astype(np.float32) / np.float32(255) for path in paths]


def test_hard_voting_matches_a_straightforward_vote(stores, tmp_path: Path) -> None:
    combine(stores, tmp_path / "hard.csv", "hard", threshold=0.3, progress=False)
    combine(stores, tmp_path / "hard1.csv", "hard", threshold=0.3, min_votes=1, progress=False)
    majority, anyone = read_submission(tmp_path / "hard.csv"), read_submission(tmp_path / "hard1.csv")
    for key in KEYS:
        votes = sum((p > np.float32(0.3)).astype(int) for p in _full_maps(stores, key))
        name = key.split("/")[1] + ".png"
        assert majority.image(name) == [reference_encode(v >= 2) for v in votes]
        assert anyone.image(name) == [reference_encode(v >= 1) for v in votes]


def _two_member_stores(base: Path, weights_case: bool = False) -> list[Path]:
    """Member a covers columns 0-5, b columns 3-8 of class 0 in a 4x10 image (p = 1); c covers 6-9."""
    paths = []
    spans = {"a": (0, 6), "b": (3, 9), "c": (6, 10)}
    for name in (["a", "b", "c"] if weights_case else ["a", "b"]):
        maps = np.zeros((NUM_CLASSES, 4, 10), np.uint8)
        maps[0, :, spans[name][0] : spans[name][1]] = 255
        store = create_store(base / f"{name}.zarr", name, "csv", "test", {}, {0: {"path": name, "sha256": name}},
                             images=["ID001/img"])
        store.write_image("ID001/img", maps)
        paths.append(base / f"{name}.zarr")
    return paths


def _class0(path: Path) -> np.ndarray:
    from segens.conventions.rle import decode

    return decode(read_submission(path).image("img.png")[0], 4, 10)[0]


def test_tie_rules(tmp_path: Path) -> None:
    two = _two_member_stores(tmp_path / "two")
    combine(two, tmp_path / "strict.csv", "hard", progress=False)  # 2 members: both must agree
    assert _class0(tmp_path / "strict.csv").nonzero()[0].tolist() == [3, 4, 5]
    combine(two, tmp_path / "one.csv", "hard", min_votes=1, progress=False)  # reaches 1: either suffices
    assert _class0(tmp_path / "one.csv").nonzero()[0].tolist() == list(range(9))
    three = _two_member_stores(tmp_path / "three", weights_case=True)
    # weights a=2, b=1, c=1 (total 4): a alone has 2 = half -> dropped; a+b = 3 > 2 -> kept; b+c = 2 -> dropped
    combine(three, tmp_path / "weighted.csv", "hard", weights={"a": 2, "b": 1, "c": 1}, progress=False)
    assert _class0(tmp_path / "weighted.csv").nonzero()[0].tolist() == [3, 4, 5]
    combine(three, tmp_path / "reach.csv", "hard", weights={"a": 2, "b": 1, "c": 1}, min_votes=2, progress=False)
    assert _class0(tmp_path / "reach.csv").nonzero()[0].tolist() == list(range(9))
    # soft: mean of exactly 0.5 is not > 0.5
    combine(two, tmp_path / "soft.csv", "soft", progress=False)
    assert _class0(tmp_path / "soft.csv").nonzero()[0].tolist() == [3, 4, 5]


def test_postprocessing_from_the_recipe(tmp_path: Path) -> None:
    maps = np.zeros((NUM_CLASSES, 20, 20), np.uint8)
    maps[0, 2:8, 2:8] = 255  # big blob
    maps[0, 15:17, 15:17] = 255  # small blob
    maps[1, 3:12, 3:12] = 255
    maps[1, 6:9, 6:9] = 0  # a hole
    store = create_store(tmp_path / "m.zarr", "m", "csv", "test", {}, {0: {"path": "m", "sha256": "h"}},
                         images=["ID001/img"])
    store.write_image("ID001/img", maps)
    postprocess = [[] for _ in CLASSES]
    postprocess[0], postprocess[1] = ["largest_component"], ["fill_holes"]
    recipe = Recipe("soft", [{"name": "m", "checkpoints": {"0": "h"}}], postprocess=postprocess)
    save_recipe(recipe, tmp_path / "recipe.json")
    combine([tmp_path / "m.zarr"], tmp_path / "out.csv", "soft", recipe_path=tmp_path / "recipe.json", progress=False)
    rles = read_submission(tmp_path / "out.csv").image("img.png")
    expected0 = np.zeros((20, 20), bool)
    expected0[2:8, 2:8] = True
    assert rles[0] == reference_encode(expected0)
    assert rles[1] == reference_encode(ndimage.binary_fill_holes(maps[1] > 0))


def test_store_mismatches_are_errors_naming_store_and_image(stores, tmp_path: Path) -> None:
    short = make_store(tmp_path / "short.zarr", "short", 9, keys=KEYS[:3], planned=KEYS)
    with pytest.raises(SegensError, match=rf"short.zarr: lacks 1 image.*{KEYS[3]}.*--allow-missing"):
        combine([stores[0], short], tmp_path / "x.csv", "soft", progress=False)
    assert not (tmp_path / "x.csv").exists()
    summary = combine([stores[0], short], tmp_path / "x.csv", "soft", allow_missing=True, progress=False)
    assert summary.missing == {"short": 1} and summary.images == 4
    resized = make_store(tmp_path / "resized.zarr", "resized", 9, shapes={KEYS[1]: (40, 50)})
    with pytest.raises(SegensError, match=rf"{KEYS[1]}.*different sizes"):
        combine([stores[0], resized], tmp_path / "y.csv", "soft", progress=False)
    oof = make_store(tmp_path / "oof.zarr", "oofm", 9, split="oof")
    with pytest.raises(SegensError, match="split"):
        combine([stores[0], oof], tmp_path / "z.csv", "soft", progress=False)
    with pytest.raises(SegensError, match="same member name"):
        combine([stores[0], stores[0]], tmp_path / "z.csv", "soft", progress=False)
    with pytest.raises(SegensError, match="one weight per member"):
        combine(stores, tmp_path / "z.csv", "weighted", weights=parse_weights("vgg=1,hrnet=2"), progress=False)


# per-class weights that already sum to exactly 1 in binary, so the reference needs no normalisation
EXACT_WEIGHTS = [(0.5, 0.25, 0.25), (0.125, 0.375, 0.5), (0.75, 0.0, 0.25), (0.0625, 0.6875, 0.25)]


def test_recipe_checks(stores, tmp_path: Path) -> None:
    members = [{"name": n, "checkpoints": {"0": f"sha-{n}"}} for n in ["vgg", "hrnet", "yolo"]]
    weights = [list(EXACT_WEIGHTS[c % len(EXACT_WEIGHTS)]) for c in range(NUM_CLASSES)]
    thresholds = [0.3 + 0.01 * c for c in range(NUM_CLASSES)]
    save_recipe(Recipe("weighted", members, weights=weights, thresholds=thresholds), tmp_path / "ok.json")
    reference_thresholds = np.array(thresholds, np.float32)
    combine(stores, tmp_path / "ok.csv", "weighted", recipe_path=tmp_path / "ok.json", progress=False)
    reference_combine(stores, np.array(weights, np.float32), reference_thresholds, tmp_path / "ok.ref.csv")
    assert (tmp_path / "ok.csv").read_bytes() == (tmp_path / "ok.ref.csv").read_bytes()
    # stores in another order than the recipe's members: each weight column follows its member
    order = [2, 0, 1]  # yolo, vgg, hrnet
    combine([stores[i] for i in order], tmp_path / "permuted.csv", "weighted", recipe_path=tmp_path / "ok.json",
            progress=False)
    reference_combine([stores[i] for i in order], np.array(weights, np.float32)[:, order], reference_thresholds,
                      tmp_path / "permuted.ref.csv")
    assert (tmp_path / "permuted.csv").read_bytes() == (tmp_path / "permuted.ref.csv").read_bytes()
    reference_combine([stores[i] for i in order], np.array(weights, np.float32), reference_thresholds,
                      tmp_path / "unmatched.ref.csv")  # weights by position, not by member: must differ
    assert (tmp_path / "permuted.csv").read_bytes() != (tmp_path / "unmatched.ref.csv").read_bytes()
    changed = json.loads((tmp_path / "ok.json").read_text())
    changed["members"][1]["checkpoints"]["0"] = "another"
    (tmp_path / "changed.json").write_text(json.dumps(changed))
    with pytest.raises(SegensError, match="hrnet.zarr: its checkpoints differ.*--force"):
        combine(stores, tmp_path / "c.csv", "weighted", recipe_path=tmp_path / "changed.json", progress=False)
    assert not (tmp_path / "c.csv").exists()
    with pytest.warns(UserWarning, match="hrnet.zarr: its checkpoints differ from those the recipe was searched on"):
        combine(stores, tmp_path / "c.csv", "weighted", recipe_path=tmp_path / "changed.json", force=True, progress=False)
    assert (tmp_path / "c.csv").read_bytes() == (tmp_path / "ok.csv").read_bytes()
    with pytest.raises(SegensError, match="recipe's members are vgg, hrnet, yolo"):
        combine(stores[:2], tmp_path / "d.csv", "weighted", recipe_path=tmp_path / "ok.json", progress=False)
    with pytest.raises(SegensError, match="not 'soft'"):
        combine(stores, tmp_path / "e.csv", "soft", recipe_path=tmp_path / "ok.json", progress=False)


def _expected_rles(paths, key: str, weights, threshold: float) -> list[str]:
    """A full-array weighted vote of one image, weights given by hand (float32, summed in the given order)."""
    total = None
    for weight, p in zip(np.asarray(weights, np.float32), _full_maps(paths, key)):
        total = weight * p if total is None else total + weight * p
    return [reference_encode(mask) for mask in total > np.float32(threshold)]


def _name(key: str) -> str:
    return key.split("/")[1] + ".png"


def test_allow_missing_renormalises_over_the_members_present(stores, tmp_path: Path) -> None:
    """The image a member lacks is voted by the others alone: weights renormalised for soft and weighted, and
    more than half of the weight present for hard."""
    short = make_store(tmp_path / "short.zarr", "short", 9, keys=KEYS[:3], planned=KEYS)
    paths = [stores[0], stores[1], short]
    lacking = KEYS[3]
    summary = combine(paths, tmp_path / "soft.csv", "soft", allow_missing=True, progress=False)
    assert summary.missing == {"short": 1} and summary.images == 4
    soft = read_submission(tmp_path / "soft.csv")
    assert soft.image(_name(lacking)) == _expected_rles(paths[:2], lacking, [0.5, 0.5], 0.5)
    third = np.float32(1.0 / 3.0)
    assert soft.image(_name(KEYS[0])) == _expected_rles(paths, KEYS[0], [third] * 3, 0.5)

    # weights 3, 1, 4 -> 0.375, 0.125, 0.5; without 'short': 0.75, 0.25 (all exact in binary)
    combine(paths, tmp_path / "weighted.csv", "weighted", weights={"vgg": 3, "hrnet": 1, "short": 4},
            allow_missing=True, threshold=0.3, progress=False)
    weighted = read_submission(tmp_path / "weighted.csv")
    assert weighted.image(_name(lacking)) == _expected_rles(paths[:2], lacking, [0.75, 0.25], 0.3)
    assert weighted.image(_name(KEYS[1])) == _expected_rles(paths, KEYS[1], [0.375, 0.125, 0.5], 0.3)
    assert weighted.image(_name(lacking)) != _expected_rles(paths[:2], lacking, [0.375, 0.125], 0.3)

    # hard, weights 1, 1, 2: with 'short' present a pixel needs > 2; without it, > 1 (vgg and hrnet both)
    combine(paths, tmp_path / "hard.csv", "hard", weights={"vgg": 1, "hrnet": 1, "short": 2}, allow_missing=True,
            threshold=0.3, progress=False)
    hard = read_submission(tmp_path / "hard.csv")
    vgg, hrnet = (p > np.float32(0.3) for p in _full_maps(paths[:2], lacking))
    assert hard.image(_name(lacking)) == [reference_encode(m) for m in vgg & hrnet]
    assert any(hard.image(_name(lacking)))
    vgg, hrnet, other = (p > np.float32(0.3) for p in _full_maps(paths, KEYS[2]))
    assert hard.image(_name(KEYS[2])) == [reference_encode(m) for m in (vgg.astype(int) + hrnet + 2 * other) > 2]


def test_hard_vote_is_strict_at_an_exactly_representable_threshold(tmp_path: Path) -> None:
    """A stored 128 is p = 128/255 in float32, the same float32 as the threshold 128/255: p > t is false, no
    vote; 129 votes."""
    paths = []
    for name, value in (("a", 128), ("b", 129)):
        maps = np.zeros((NUM_CLASSES, 4, 10), np.uint8)
        maps[0, :, :5] = value
        maps[1] = value
        store = create_store(tmp_path / f"{name}.zarr", name, "csv", "test", {}, {0: {"path": name, "sha256": name}},
                             images=["ID001/img"])
        store.write_image("ID001/img", maps)
        paths.append(tmp_path / f"{name}.zarr")
    threshold = 128 / 255
    assert np.float32(128) / np.float32(255) == np.float32(threshold)
    combine(paths[:1], tmp_path / "a.csv", "hard", threshold=threshold, min_votes=1, progress=False)
    assert read_submission(tmp_path / "a.csv").image("img.png") == [""] * NUM_CLASSES
    combine(paths, tmp_path / "ab.csv", "hard", threshold=threshold, min_votes=1, progress=False)
    rles = read_submission(tmp_path / "ab.csv").image("img.png")
    assert rles[:2] == [reference_encode(np.arange(40).reshape(4, 10) % 10 < 5), reference_encode(np.ones((4, 10)))]
    combine(paths, tmp_path / "both.csv", "hard", threshold=threshold, progress=False)  # b alone is not a majority
    assert read_submission(tmp_path / "both.csv").image("img.png") == [""] * NUM_CLASSES


def test_csv_order_with_underscores_and_masks_out(stores, tmp_path: Path) -> None:
    combine(stores, tmp_path / "o.csv", "soft", masks_out=tmp_path / "masks.zarr", progress=False)
    names = [line.split(",")[0] for line in (tmp_path / "o.csv").read_text().splitlines()[1::NUM_CLASSES]]
    assert names == ["image1661130828152.png", "image1661130828152_R.png", "image1661130900000.png",
                     "image1661130900001_L.png"]
    masks = open_store(tmp_path / "masks.zarr")
    rles = read_submission(tmp_path / "o.csv").image("image1661130828152_R.png")
    assert [reference_encode(m) for m in masks.read(KEYS[0]) > 0] == rles


def test_a_killed_combine_leaves_no_partial_csv(tmp_path: Path) -> None:
    """SIGKILL while the CSV is being written (its temporary file exists): the old CSV stays as it was."""
    keys = [f"ID{i:03d}/image{i}" for i in range(400)]
    path = make_store(tmp_path / "many.zarr", "many", 3, keys=keys)
    out = tmp_path / "sub.csv"
    out.write_text("old contents\n")
    process = subprocess.Popen([sys.executable, "-m", "segens.cli", "combine", str(path), "--out", str(out),
                                "--overwrite"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    seen_part = False
    while process.poll() is None and time.monotonic() < deadline:
        if any(p.name.endswith(".part") for p in tmp_path.iterdir()):
            seen_part = True
            break
        time.sleep(0.01)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert seen_part, f"the combine never started writing its CSV (exit status {process.returncode})"
    assert process.returncode == -signal.SIGKILL  # killed mid-write, not finished or failed on its own
    assert out.read_text() == "old contents\n"
