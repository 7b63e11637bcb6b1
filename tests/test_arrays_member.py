"""Members of kind arrays: numpy files written here (float16 .npy, nnU-Net-style .npz, uint8/uint16, logits)
imported into real zarr stores, every bad file one clear error, and an arrays member searched and combined with
a real smp member."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import make_smp_project

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import discover, image_size
from segens.ensemble.combine import combine
from segens.errors import SegensError
from segens.members.predict import predict_member
from segens.search.run import search_weights
from segens.store import open_store, quantize


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_smp_project(tmp_path_factory.mktemp("arrays"))


def maps_for(project: Path, split: str, seed: int = 0) -> dict[str, np.ndarray]:
    """key -> (29, H, W) float32 probabilities at the image's size: a noisy copy of the truth (test: random)."""
    rng = np.random.default_rng(seed)
    out = {}
    for record in discover(project / "data", "train" if split == "oof" else "test", require_labels=False).records:
        height, width = image_size(record.image_path)
        out[record.key] = rng.random((NUM_CLASSES, height, width), dtype=np.float32)
    return out


def write_spec(folder: Path, name: str, model: dict, **fields) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"version": 2, "name": name, "kind": "arrays", "model": model, **fields}))
    return path


def save_all(folder: Path, maps: dict[str, np.ndarray], transform, suffix: str = ".npy", key: str | None = None) -> None:
    for image_key, values in maps.items():
        path = folder / f"{image_key}{suffix}"
        path.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".npz":
            np.savez_compressed(path, **{key: transform(values)})
        else:
            np.save(path, transform(values))


def stored(project: Path, spec: Path, split: str, out: Path) -> dict[str, np.ndarray]:
    predict_member(spec, split, project / "data", out, progress=False)
    store = open_store(out)
    return {key: store.read(key) for key in store.keys()}


def identity(store: Path) -> list[str]:
    return [checkpoint["sha256"] for checkpoint in open_store(store).attributes["checkpoints"].values()]


def test_float16_npy_at_original_size(project: Path, tmp_path: Path) -> None:
    maps = maps_for(project, "test")
    save_all(tmp_path / "preds" / "test", maps, lambda m: m.astype(np.float16))
    spec = write_spec(tmp_path, "team", {"test": "preds/test/{key}.npy"})
    result = stored(project, spec, "test", tmp_path / "team.test.zarr")
    assert set(result) == set(maps)
    for key, values in maps.items():
        assert np.array_equal(result[key], quantize(values.astype(np.float16).astype(np.float32)))


def test_nnunet_style_npz_at_half_size_in_another_order(project: Path, tmp_path: Path) -> None:
    maps = maps_for(project, "test", seed=1)
    order = list(reversed(range(NUM_CLASSES)))
    small = {key: cv2.resize(values.transpose(1, 2, 0), (values.shape[2] // 2, values.shape[1] // 2),
                             interpolation=cv2.INTER_AREA).transpose(2, 0, 1) for key, values in maps.items()}
    flat = {key.rsplit("/", 1)[-1]: values for key, values in small.items()}  # nnU-Net's flat case files
    save_all(tmp_path / "nn", flat, lambda m: m[order][:, None], ".npz", "probabilities")
    spec = write_spec(tmp_path, "nn", {"test": "nn/{stem}.npz", "array": "probabilities"},
                      classes=[CLASSES[index] for index in order], input={"resize": "bilinear"})
    result = stored(project, spec, "test", tmp_path / "nn.test.zarr")
    for key, values in small.items():
        height, width = maps[key].shape[1:]
        expected = quantize(cv2.resize(values.transpose(1, 2, 0), (width, height),
                                       interpolation=cv2.INTER_LINEAR).transpose(2, 0, 1))
        assert result[key].shape == (NUM_CLASSES, height, width)
        assert np.abs(result[key].astype(int) - expected).max() <= 1  # cv2's float rounding, not the rule


def test_integer_arrays_and_logits(project: Path, tmp_path: Path) -> None:
    maps = maps_for(project, "test", seed=2)
    save_all(tmp_path / "u8", maps, quantize)
    save_all(tmp_path / "u16", maps, lambda m: np.rint(m * 65535).astype(np.uint16))
    save_all(tmp_path / "lg", maps, lambda m: np.log(m / (1 - m + 1e-6) + 1e-6).astype(np.float32))
    u8 = stored(project, write_spec(tmp_path, "u8", {"test": "u8/{key}.npy", "scale": 255}), "test", tmp_path / "a.zarr")
    u16 = stored(project, write_spec(tmp_path, "u16", {"test": "u16/{key}.npy", "scale": 65535}), "test",
                 tmp_path / "b.zarr")
    logits = stored(project, write_spec(tmp_path, "lg", {"test": "lg/{key}.npy", "values": "logits"}), "test",
                    tmp_path / "c.zarr")
    for key, values in maps.items():
        assert np.array_equal(u8[key], quantize(values))
        assert np.abs(u16[key].astype(int) - quantize(values)).max() <= 1
        assert np.abs(logits[key].astype(int) - quantize(values)).max() <= 1


def test_bad_files_give_one_clear_error(project: Path, tmp_path: Path) -> None:
    maps = maps_for(project, "test", seed=3)
    keys = sorted(maps)

    def attempt(name: str, model: dict, match: str) -> None:
        spec = write_spec(tmp_path, name, model)
        with pytest.raises(SegensError, match=match):
            predict_member(spec, "test", project / "data", tmp_path / f"{name}.zarr", progress=False)
        assert not (tmp_path / f"{name}.zarr").exists()

    save_all(tmp_path / "logit", maps, lambda m: (m * 8 - 4).astype(np.float16))
    attempt("logit", {"test": "logit/{key}.npy"}, r"logit/ID\w+/\S+\.npy .*values from -4 to 4 are declared "
                                                  r"probabilities .*set model.values: logits")
    save_all(tmp_path / "short", maps, lambda m: m[:28])
    attempt("short", {"test": "short/{key}.npy"}, "28 channels, expected 29")
    save_all(tmp_path / "pickled", maps, lambda m: m)
    np.save(tmp_path / "pickled" / f"{keys[0]}.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    attempt("pickled", {"test": "pickled/{key}.npy"}, "holds a pickled \\(object\\) array")
    save_all(tmp_path / "missing", {key: maps[key] for key in keys[1:]}, lambda m: m)
    attempt("missing", {"test": "missing/{key}.npy"}, f"no test array for image {keys[0]}")
    save_all(tmp_path / "extra", {**maps, "ID999/image1": maps[keys[0]]}, lambda m: m)
    attempt("extra", {"test": "extra/{key}.npy"}, "array of image ID999/image1, which is not in the test images")
    attempt("scaled", {"test": "logit/{key}.npy", "scale": 255}, "model.scale must be 1")
    save_all(tmp_path / "cut", maps, lambda m: m)
    cut = tmp_path / "cut" / f"{keys[0]}.npy"
    cut.write_bytes(cut.read_bytes()[:200])  # a file truncated mid-copy
    attempt("cut", {"test": "cut/{key}.npy"}, f"cut/{keys[0]}.npy: not a readable numpy file")
    save_all(tmp_path / "two", maps, lambda m: m, ".npz", "probabilities")
    with np.load(tmp_path / "two" / f"{keys[0]}.npz") as archive:
        np.savez(tmp_path / "two" / f"{keys[0]}.npz", probabilities=archive["probabilities"], logits=archive["probabilities"])
    attempt("two", {"test": "two/{key}.npz"}, "holds 2 arrays .*name one with model.array")
    for model, match in [({"test": "preds/test.npy"}, "must be a path with {key} or {stem} once"),
                         ({"test": "p/{key}.npy", "values": "odds"}, "probabilities or logits"),
                         ({"test": "p/{key}.npy", "weights": 1}, "unknown model field"),
                         ({}, "needs model.oof or model.test")]:
        spec = write_spec(tmp_path, "bad", model)
        with pytest.raises(SegensError, match=match):
            predict_member(spec, "test", project / "data", tmp_path / "bad.zarr", progress=False)


def test_arrays_member_joins_a_search_and_a_combine_with_smp(project: Path, tmp_path: Path) -> None:
    from segens.conventions.dataset import read_record_mask

    rng = np.random.default_rng(4)
    team = {}
    for split in ("oof", "test"):
        for record in discover(project / "data", "train" if split == "oof" else "test").records:
            truth = read_record_mask(record).astype(np.float32)
            noisy = np.clip(truth * 0.7 + rng.random(truth.shape, dtype=np.float32) * 0.3, 0, 1)
            path = tmp_path / "team" / split / f"{record.key}.npy"
            path.parent.mkdir(parents=True, exist_ok=True)
            np.save(path, noisy.astype(np.float16))
            team[(split, record.key)] = noisy
    spec = write_spec(tmp_path, "team", {"oof": "team/oof/{key}.npy", "test": "team/test/{key}.npy"})
    stores = {}
    for split in ("oof", "test"):
        for name, path in (("unet", project / "unet.yaml"), ("team", spec)):
            stores[(name, split)] = tmp_path / f"{name}.{split}.zarr"
            predict_member(path, split, project / "data", stores[(name, split)], progress=False,
                           folds_path=project / "folds.json" if split == "oof" else None)
    assert identity(stores[("team", "oof")]) == identity(stores[("team", "test")])
    report = search_weights([stores[("unet", "oof")], stores[("team", "oof")]], project / "data",
                            project / "folds.json", tmp_path / "recipe.json", progress=False)
    assert sorted(report.members) == ["team", "unet"]
    summary = combine([stores[("unet", "test")], stores[("team", "test")]], tmp_path / "sub.csv",
                      recipe_path=tmp_path / "recipe.json", progress=False)
    assert summary.images == 2 and (tmp_path / "sub.csv").exists()
    # a rewritten file is a changed member: the recipe no longer applies to a store made after the change
    first = sorted(key for split, key in team if split == "test")[0]
    np.save(tmp_path / "team" / "test" / f"{first}.npy", team[("test", first)].astype(np.float16))
    predict_member(spec, "test", project / "data", tmp_path / "team2.test.zarr", progress=False)
    assert identity(tmp_path / "team2.test.zarr") != identity(stores[("team", "test")])
