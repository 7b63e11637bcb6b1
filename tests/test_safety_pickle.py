"""No code runs from files without --trust-pickle: real pickles that would create a marker file if unpickled,
placed where segens would load them (search-weights' resume folder, train-member's last.pt, YOLO's resume state)."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from segens.errors import SegensError
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.members.spec import load_spec
from segens.members.train import train_member
from segens.search.resume import FORMAT as RESUME_FORMAT
from segens.search.resume import FinishedClasses, partial_root, result_from_json, result_to_json
from segens.search.run import search_weights
from segens.store import create_store
from segens.synth import generate
from segens.training.loop import load_resume_state

ROOT = Path(__file__).resolve().parents[1]


class Evil:
    """Unpickling this calls ``open(marker, "w")``: the marker file appears if (and only if) the pickle runs."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps({"result": Evil(marker)})


def test_the_evil_pickle_is_live(tmp_path: Path) -> None:
    """Control: the file used below does run code when unpickled (so its absence below proves something)."""
    marker = tmp_path / "ran"
    pickle.loads(evil_pickle(marker))
    assert marker.exists()


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A synthetic data root (64 px), 3 folds and two OOF stores with noisy maps of the labels."""
    from segens.conventions.dataset import discover, read_record_mask

    base = tmp_path_factory.mktemp("pickle")
    generate(base / "data", n_train_patients=3, n_test_patients=1, size=64, seed=5)
    folds, _ = make_folds(base / "data", k=3, seed=0)
    save_folds(folds, base / "folds.json")
    rng = np.random.default_rng(0)
    records = discover(base / "data", "train").records
    for name, noise in (("a", 60), ("b", 120)):
        store = create_store(base / f"{name}.oof.zarr", name, "smp", "oof", {"name": name},
                             {0: {"path": f"{name}.pt", "sha256": f"sha-{name}"}}, images=[r.key for r in records])
        for record in records:
            truth = read_record_mask(record).astype(np.int16) * 200
            store.write_image(record.key, np.clip(truth + rng.integers(0, noise, truth.shape), 0, 255).astype(np.uint8))
    return base


def _search(project: Path, out: Path) -> None:
    search_weights([str(project / "a.oof.zarr"), str(project / "b.oof.zarr")], project / "data", None, out,
                   step=0.25, postprocess=False, progress=False)


def _recipe(path: Path) -> dict:
    recipe = json.loads(path.read_text())
    recipe["search"].pop("seconds")
    return recipe


def test_search_resume_files_are_json_and_pickles_there_never_run(project: Path, tmp_path: Path) -> None:
    """A search SIGKILLed after its first finished class leaves JSON files; pickles planted in that folder (under
    the old .pkl names and in place of a .json) are never unpickled, and the resumed recipe is the clean one."""
    _search(project, tmp_path / "clean.json")
    out = tmp_path / "killed.json"
    script = (
        "import os, signal, sys, threading, time\n"
        "from pathlib import Path\n"
        "from segens.search.resume import partial_root\n"
        "from segens.search.run import search_weights\n"
        f"out = Path({str(out)!r})\n"
        "def kill_at_first_class():\n"
        "    while not list(partial_root(out).glob('*/class-*.json')):\n"
        "        time.sleep(0.0005)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "threading.Thread(target=kill_at_first_class, daemon=True).start()\n"
        f"search_weights([{str(project / 'a.oof.zarr')!r}, {str(project / 'b.oof.zarr')!r}], "
        f"{str(project / 'data')!r}, None, out, step=0.25, postprocess=False, progress=False)\n"
    )
    process = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == -9, process.stderr.decode()[-2000:]
    assert not out.exists()
    (folder,) = partial_root(out).iterdir()
    finished = sorted(folder.glob("class-*.json"))
    assert finished and all(json.loads(path.read_text())["format"] == RESUME_FORMAT for path in finished)
    key = json.loads(finished[-1].read_text())["search"]
    marker = tmp_path / "code-ran"
    for channel in range(29):
        (folder / f"class-{channel:02d}.pkl").write_bytes(evil_pickle(marker))
    finished[0].write_bytes(evil_pickle(marker))  # a "JSON" file that is a pickle: searched again, never loaded
    (batch,) = (folder / "evidence").glob("batch-*.npz")  # evidence that is a pickle, or an npz holding one
    batch.write_bytes(evil_pickle(marker))
    assert len(FinishedClasses(out, key, strategies=("weighted",)).load()) == len(finished) - 1

    _search(project, out)
    assert not marker.exists()
    assert _recipe(out) == _recipe(tmp_path / "clean.json")
    assert not partial_root(out).exists()


def test_resume_json_round_trips_exactly_and_bad_files_are_searched_again(project: Path, tmp_path: Path) -> None:
    from segens.conventions.dataset import discover
    from segens.search.class_search import search_class
    from segens.search.evidence import extract_class, threshold_grid
    from segens.store import open_store

    stores = [open_store(project / "a.oof.zarr"), open_store(project / "b.oof.zarr")]
    records = discover(project / "data", "train").records
    evidence = extract_class(stores, records, 3, threshold_grid())
    result = search_class(evidence, "hard", threshold_grid(), folds_of_images=[i % 3 for i in range(len(records))])
    back = result_from_json(json.loads(json.dumps(result_to_json(result))), tmp_path / "x.json")
    assert result_to_json(back) == result_to_json(result)
    assert back.recipe_choice.member_thresholds.tolist() == result.recipe_choice.member_thresholds.tolist()
    finished = FinishedClasses(tmp_path / "r.json", "k" * 64, strategies=("hard",))
    finished.save({"hard": result})
    assert list(finished.load()) == [3]
    path = finished.folder / "class-03.json"

    def write(document: dict) -> None:
        path.write_text(json.dumps({"format": RESUME_FORMAT, "search": "k" * 64, "results": {"hard": document}}))

    document = result_to_json(result)
    document["channel"] = "__import__('os')"
    write(document)
    assert finished.load() == {}
    with pytest.raises(SegensError, match=r"x.json: channel: Input should be a valid integer"):
        result_from_json(document, tmp_path / "x.json")

    tampered = {
        "recipe_choice.member_thresholds.0: Input should be less than or equal to 254":
            lambda d: d["recipe_choice"]["member_thresholds"].__setitem__(0, 400),
        "recipe_choice.min_votes: Input should be greater than or equal to 1":
            lambda d: d["recipe_choice"].__setitem__("min_votes", 0),
        "recipe_choice.weights.0: Input should be greater than or equal to 0":
            lambda d: d["recipe_choice"]["weights"].__setitem__(0, -1.0),
        "postprocess.0: Input should be 'largest_component' or 'fill_holes'":
            lambda d: d.__setitem__("postprocess", ["rm -rf"]),
    }
    for message, edit in tampered.items():
        document = result_to_json(result)
        edit(document)
        write(document)
        assert finished.load() == {}, message  # searched again, never an IndexError in the recipe
        with pytest.raises(SegensError, match=re.escape(message)):
            result_from_json(document, tmp_path / "x.json")
    document = result_to_json(result)  # valid, but for three members: the two-member search redoes it
    document["recipe_choice"]["weights"].append(1.0)
    document["recipe_choice"]["member_thresholds"].append(127)
    document["member_dice"].append(0.5)
    write(document)
    assert list(FinishedClasses(tmp_path / "r.json", "k" * 64, strategies=("hard",)).load()) == [3]
    assert FinishedClasses(tmp_path / "r.json", "k" * 64, members=2, strategies=("hard",)).load() == {}
    another = FinishedClasses(tmp_path / "r.json", "k" * 32 + "j" * 32, strategies=("hard",))  # the same folder
    assert another.folder == finished.folder and another.load() == {} and another.ignored == [path]


# ---- train-member ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("train")
    generate(base / "data", n_train_patients=3, n_test_patients=1, size=64, seed=1)
    folds, _ = make_folds(base / "data", k=3, seed=0)
    save_folds(folds, base / "folds.json")
    return base


def _smp_spec(path: Path, epochs: int) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "r18", "kind": "smp", "input_size": 32,
        "model": {"architecture": "Unet", "encoder": "resnet18", "options": {"decoder_channels": [16, 8, 8, 8, 8]}},
        "train": {"epochs": epochs, "batch_size": 4, "lr": 0.01, "optimizer": "adamw", "scheduler": "plateau",
                  "seed": 0}}))
    return path


def test_smp_last_pt_loads_weights_only_and_resumes(small: Path, tmp_path: Path) -> None:
    spec = _smp_spec(tmp_path / "m.yaml", epochs=1)
    train_member(spec, small / "data", small / "folds.json", fold="0", progress=False)
    last = tmp_path / "r18" / "fold0" / "last.pt"
    torch.load(last, map_location="cpu", weights_only=True)  # nothing in it needs a pickle
    _smp_spec(spec, epochs=2)
    (summary,) = train_member(spec, small / "data", small / "folds.json", fold="0", progress=False)
    assert summary.epochs == 2
    history = json.loads((tmp_path / "r18" / "fold0" / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert load_spec(spec).checkpoints[0].path == tmp_path / "r18" / "fold0" / "best.pt"


def test_smp_pickled_last_pt_never_runs(small: Path, tmp_path: Path) -> None:
    spec = _smp_spec(tmp_path / "m.yaml", epochs=1)
    marker = tmp_path / "code-ran"
    last = tmp_path / "r18" / "fold0" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"model": Evil(marker), "epoch": 0}, last)
    with pytest.raises(SegensError, match=r"last.pt: resume state holds pickled objects; .*Pass --trust-pickle"):
        train_member(spec, small / "data", small / "folds.json", fold="0", progress=False)
    assert not marker.exists()
    with pytest.raises(SegensError, match=r"last.pt: resume state holds pickled objects"):
        load_resume_state(last, trust_pickle=False)
    assert not marker.exists()

    # the command: exit code 2, one line naming the file and the flag, no traceback, nothing run
    process = subprocess.run([sys.executable, "-m", "segens.cli", "train-member", str(spec), "--data",
                              str(small / "data"), "--folds", str(small / "folds.json"), "--fold", "0"],
                             cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert process.returncode == 2, process.stderr
    assert "--trust-pickle" in process.stderr and "last.pt" in process.stderr and "Traceback" not in process.stderr
    assert not marker.exists()


def test_yolo_resume_state_needs_trust_pickle(small: Path, tmp_path: Path) -> None:
    spec = tmp_path / "y.yaml"
    spec.write_text(yaml.safe_dump({"name": "y", "kind": "yolo", "input_size": 64, "train": {"epochs": 1}}))
    marker = tmp_path / "code-ran"
    last = tmp_path / "y" / "fold0" / "train" / "weights" / "last.pt"
    last.parent.mkdir(parents=True)
    torch.save({"model": Evil(marker), "epoch": 0, "optimizer": {}}, last)
    with pytest.raises(SegensError, match=r"last.pt: resuming a YOLO fold loads ultralytics' pickled state.*"
                                          r"Pass --trust-pickle.*or delete .*fold0/train"):
        train_member(spec, small / "data", small / "folds.json", fold="0", progress=False)
    assert not marker.exists()
