"""Members of kind nnunet: folders laid out as nnU-Net v2 writes them (``<case>.npz`` with ``probabilities`` of
shape (C, 1, H, W), ``<case>.pkl``, ``dataset.json``), written here, imported into real zarr stores; region-based
and label-based channel layouts, OOF over per-fold validation folders, every bad folder one clear error, and
nnU-Net's pickles never opened without --trust-pickle."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_smp_project

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import discover, image_size
from segens.ensemble.combine import combine
from segens.errors import SegensError
from segens.members.predict import predict_member
from segens.store import open_store, quantize

SHUFFLED = [CLASSES[index] for index in np.random.default_rng(7).permutation(NUM_CLASSES)]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    return make_smp_project(tmp_path_factory.mktemp("nnunet"))


def records(project: Path, split: str):
    return discover(project / "data", "train" if split == "oof" else "test", require_labels=False).records


def dataset_json(folder: Path, names: list[str], regions: bool) -> None:
    """nnU-Net v2's dataset.json: region-based (each bone a region of its label and an overlap label) or
    label-based (one integer per bone)."""
    if regions:
        labels = {"background": 0, **{name: [index + 1, 100 + index] for index, name in enumerate(names)}}
        extra = {"regions_class_order": list(range(1, len(names) + 1))}
    else:
        labels, extra = {"background": 0, **{name: index + 1 for index, name in enumerate(names)}}, {}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "dataset.json").write_text(json.dumps({"channel_names": {"0": "X-ray"}, "labels": labels,
                                                     "numTraining": 10, "file_ending": ".png", **extra}))


def write_case(folder: Path, case: str, probabilities: np.ndarray, shape: tuple[int, ...] | None = None) -> None:
    """One case as nnU-Net's export_prediction_from_logits saves it: npz + properties pickle."""
    folder.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(folder / f"{case}.npz", probabilities=probabilities)
    properties = {"spacing": [999, 1, 1], "shape_before_cropping": shape or probabilities.shape[1:],
                  "bbox_used_for_cropping": [[0, 1], [0, probabilities.shape[2]], [0, probabilities.shape[3]]]}
    with open(folder / f"{case}.pkl", "wb") as handle:
        pickle.dump(properties, handle)


def region_maps(project: Path, split: str, seed: int) -> dict[str, np.ndarray]:
    """key -> (29, H, W) float32 sigmoid probabilities in the competition's order."""
    rng = np.random.default_rng(seed)
    out = {}
    for record in records(project, split):
        height, width = image_size(record.image_path)
        out[record.key] = (1 / (1 + np.exp(-rng.normal(0, 3, (NUM_CLASSES, height, width))))).astype(np.float32)
    return out


def spec(folder: Path, model: dict, **fields) -> Path:
    path = folder / "nn.yaml"
    path.write_text(yaml.safe_dump({"version": 2, "name": "nn", "kind": "nnunet", "model": model, **fields}))
    return path


def imported(project: Path, spec_path: Path, split: str, out: Path, **options) -> dict[str, np.ndarray]:
    predict_member(spec_path, split, project / "data", out, progress=False,
                   folds_path=project / "folds.json" if split == "oof" else None, **options)
    store = open_store(out)
    return {key: store.read(key) for key in store.keys()}


def test_region_based_predictions_in_their_own_order(project: Path, tmp_path: Path) -> None:
    maps = region_maps(project, "test", seed=0)
    folder = tmp_path / "predictions"
    dataset_json(folder, SHUFFLED, regions=True)
    order = [CLASSES.index(name) for name in SHUFFLED]
    for key, values in maps.items():
        write_case(folder, key.rsplit("/", 1)[-1], values[order][:, None])
    result = imported(project, spec(tmp_path, {"test": "predictions"}), "test", tmp_path / "nn.test.zarr")
    assert set(result) == set(maps)
    for key, values in maps.items():
        assert np.array_equal(result[key], quantize(values))


def test_label_based_oof_over_fold_folders(project: Path, tmp_path: Path) -> None:
    """Softmax channels with background first, OOF cases spread over nnU-Net's fold_N/validation folders (a
    glob), dataset.json in the trainer folder two levels up, cases named {folder}_{stem}."""
    rng = np.random.default_rng(1)
    trainer = tmp_path / "results" / "Dataset501_Hand" / "nnUNetTrainer__nnUNetPlans__2d"
    dataset_json(trainer, SHUFFLED, regions=False)
    order = [CLASSES.index(name) for name in SHUFFLED]
    expected = {}
    for index, record in enumerate(records(project, "oof")):
        height, width = image_size(record.image_path)
        logits = rng.normal(0, 2, (NUM_CLASSES + 1, height, width))
        softmax = (np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32)
        folder, stem = record.key.split("/")
        write_case(trainer / f"fold_{index % 3}" / "validation", f"{folder}_{stem}", softmax[:, None])
        expected[record.key] = quantize(softmax[1:][np.argsort(order)])
    (trainer / "fold_0" / "validation" / "summary.json").write_text("{}")  # nnU-Net's other files are ignored
    path = spec(tmp_path, {"oof": "results/*/*/fold_*/validation", "case": "{folder}_{stem}"})
    result = imported(project, path, "oof", tmp_path / "nn.oof.zarr")
    assert set(result) == set(expected)
    for key, values in expected.items():
        assert np.array_equal(result[key], values)


def test_renamed_labels_maps_at_half_size_and_a_combine(project: Path, tmp_path: Path) -> None:
    """dataset.json labels named otherwise (classes gives their competition names); maps of nnU-Net run on
    downscaled images are resized by the input contract; the member votes in a combine with an smp member."""
    folder = tmp_path / "predictions"
    dataset_json(folder, [f"bone_{index}" for index in range(NUM_CLASSES)], regions=True)
    for key, values in region_maps(project, "test", seed=2).items():
        write_case(folder, key.rsplit("/", 1)[-1], values[:, ::2, ::2][:, None])
    path = spec(tmp_path, {"test": "predictions"}, classes=list(CLASSES), input={"resize": "nearest"})
    result = imported(project, path, "test", tmp_path / "nn.test.zarr")
    for record in records(project, "test"):
        assert result[record.key].shape == (NUM_CLASSES, *image_size(record.image_path))
    predict_member(project / "unet.yaml", "test", project / "data", tmp_path / "unet.test.zarr", progress=False)
    summary = combine([tmp_path / "unet.test.zarr", tmp_path / "nn.test.zarr"], tmp_path / "sub.csv",
                      strategy="soft", progress=False)
    assert summary.images == len(result)


def test_pickles_open_only_when_trusted(project: Path, tmp_path: Path) -> None:
    maps = region_maps(project, "test", seed=3)
    folder = tmp_path / "predictions"
    dataset_json(folder, list(CLASSES), regions=True)
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    for key, values in maps.items():
        write_case(folder, key.rsplit("/", 1)[-1], values[:, None])
    first = sorted(maps)[0].rsplit("/", 1)[-1]
    (folder / f"{first}.pkl").write_bytes(pickle.dumps(Payload()))
    imported(project, spec(tmp_path, {"test": "predictions"}), "test", tmp_path / "plain.zarr")
    assert not marker.exists()  # without --trust-pickle the properties are never unpickled
    # trusted: each case's properties must describe maps of its shape
    write_case(folder, first, maps[sorted(maps)[0]][:, None], shape=(1, 7, 7))
    with pytest.raises(SegensError, match=rf"{first}.pkl: shape_before_cropping \(1, 7, 7\) is not the shape"):
        imported(project, spec(tmp_path, {"test": "predictions"}), "test", tmp_path / "t.zarr", trust_pickle=True)
    write_case(folder, first, maps[sorted(maps)[0]][:, None])
    trusted = imported(project, spec(tmp_path, {"test": "predictions"}), "test", tmp_path / "t2.zarr",
                       trust_pickle=True)
    assert all(np.array_equal(trusted[key], quantize(values)) for key, values in maps.items())


def test_bad_folders_give_one_clear_error(project: Path, tmp_path: Path) -> None:
    maps = region_maps(project, "test", seed=4)
    cases = {key.rsplit("/", 1)[-1]: values[:, None] for key, values in maps.items()}
    first = sorted(cases)[0]

    def attempt(name: str, model: dict, match: str, **fields) -> None:
        with pytest.raises(SegensError, match=match):
            predict_member(spec(tmp_path, model, **fields), "test", project / "data", tmp_path / f"{name}.zarr",
                           progress=False)
        assert not (tmp_path / f"{name}.zarr").exists()

    def folder_with(name: str, chosen: dict, names: list[str] = list(CLASSES)) -> str:
        dataset_json(tmp_path / name, names, regions=True)
        for case, values in chosen.items():
            write_case(tmp_path / name, case, values)
        return name

    attempt("missing", {"test": folder_with("missing", {k: v for k, v in cases.items() if k != first})},
            rf"no test prediction {first}.npz for image ID\d+/{first}")
    attempt("extra", {"test": folder_with("extra", {**cases, "image999": cases[first]})},
            r"extra/image999.npz: case 'image999' is none of the test images")
    attempt("twice", {"test": [folder_with("a", cases), folder_with("b", {first: cases[first]})]},
            rf"b/{first}.npz: case '{first}' is also in .*a/{first}.npz")
    attempt("short", {"test": folder_with("short", {k: v[:28] for k, v in cases.items()})},
            r"28 channels, but .*short/dataset.json describes 29")
    attempt("unnamed", {"test": folder_with("unnamed", cases, [*CLASSES[:28], "ulna"])},
            "class name 'ulna' is not one of the competition's")
    for case, values in cases.items():
        write_case(tmp_path / "nojson", case, values)
    attempt("nojson", {"test": "nojson"}, "no dataset.json here, in its parent or grandparent")
    attempt("nofolder", {"test": "absent"}, "absent: the test folder of nnU-Net predictions is not there")
    attempt("case", {"test": "a", "case": "{folder}"}, "model.case must name each case with {stem}")
    attempt("train", {"test": "a"}, "kind nnunet has no 'train' settings", train={"epochs": 1})


def test_the_example_spec_loads_and_refuses_training(project: Path) -> None:
    from segens.members.registry import build_member
    from segens.members.spec import load_spec
    from segens.members.train import train_member

    example = Path(__file__).resolve().parents[1] / "examples" / "members" / "nnunet-2d.yaml"
    member = build_member(load_spec(example))
    assert member.kind == "nnunet" and member.model_settings["case"] == "{stem}"
    with pytest.raises(SegensError, match=r"kind nnunet is not trained by segens \(nnU-Net trains it"):
        train_member(example, project / "data", project / "folds.json", progress=False)
