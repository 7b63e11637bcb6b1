"""Hostile and careless inputs to the surfaces round 2 added (specs v2, kind torch, ``ens inspect``, stores, the
search's resume folder, atomic writes), each with the real bad input: a spec naming ``os:system``, a real FIFO, a
real symlink, an immutable file; and the tests that pin hand mutations of the landed code against independent
references."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import flat
from test_combine import make_store
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import NUM_CLASSES
from segens.conventions.dataset import discover
from segens.conventions.dice import DiceTable
from segens.ensemble.combine import combine
from segens.errors import SegensError
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.infra.outputs import Output, check_outputs
from segens.members.input_contract import InputContract
from segens.members.predict import predict_member
from segens.members.registry import build_member
from segens.members.spec import Checkpoint, load_spec, record_checkpoint, sha256_of
from segens.members.train import train_member
from segens.reference import reference_combine
from segens.search.levels import reliably_better, standard_error
from segens.search.resume import FinishedClasses, partial_root
from segens.search.run import search_weights
from segens.synth import generate
from segens.voting.recipe import Recipe, save_recipe
from segens.voting.rules import normalise_weights

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:FutureWarning")  # users' files still are


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _conv(in_channels: int = 3, bias: float = 0.0) -> torch.nn.Module:
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(in_channels, NUM_CLASSES, 1)
    with torch.no_grad():
        conv.bias += bias
    return conv.eval()


def _scripted(path: Path, in_channels: int = 3, bias: float = 0.0) -> Path:
    torch.jit.save(torch.jit.script(_conv(in_channels, bias)), str(path))
    return path


def _spec(folder: Path, checkpoint: Path, name: str = "m", **fields) -> Path:
    document = {"version": 2, "name": "m", "kind": "torch", "input": {"size": [32, 32]},
                "checkpoints": {0: {"path": checkpoint.name, "sha256": sha256_of(checkpoint)}}, **fields}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def _said(result) -> str:
    """What a CLI run refused with (CliRunner hands the command's SegensError back as its exception)."""
    assert result.exit_code == 1, result.output
    return flat(f"{result.output} {result.exception}")


# ---- 1. code a spec names runs only when asked --------------------------------------------------------------

def test_a_spec_naming_os_system_runs_nothing_without_trust_code(tmp_path: Path, tiny_root: Path) -> None:
    torch.save(_conv().state_dict(), tmp_path / "W.pth")
    planted = tmp_path / "PWNED"
    spec = _spec(tmp_path, tmp_path / "W.pth", model={"factory": "os:system",
                                                      "kwargs": {"command": f"touch {planted}"}})
    inspected = CliRunner().invoke(app, ["inspect", str(tmp_path / "W.pth"), "--spec", str(spec)])
    assert inspected.exit_code == 0, inspected.output
    assert "system(**model.kwargs) from the module os" in flat(inspected.output)
    assert "not run. Pass --trust-code" in flat(inspected.output)
    predicted = CliRunner().invoke(app, ["predict-member", str(spec), "--split", "test", "--data", str(tiny_root),
                                         "--out", str(tmp_path / "m.zarr")])
    assert "--trust-code" in _said(predicted)
    assert not planted.exists() and not (tmp_path / "m.zarr").exists()
    # asked for, the code runs, and what it returns is then refused before any store exists
    trusted = CliRunner().invoke(app, ["predict-member", str(spec), "--split", "test", "--data", str(tiny_root),
                                       "--out", str(tmp_path / "m.zarr"), "--trust-code"])
    assert "returns int, not a torch.nn.Module" in _said(trusted)
    assert planted.exists() and not (tmp_path / "m.zarr").exists()


def test_a_factory_file_beside_the_spec_is_imported_without_writing_bytecode(tmp_path: Path) -> None:
    (tmp_path / "factory.py").write_text("import torch\n\ndef build():\n    return torch.nn.Conv2d(3, 29, 1)\n")
    torch.save(_conv().state_dict(), tmp_path / "W.pth")
    spec = _spec(tmp_path, tmp_path / "W.pth", model={"factory": "factory.py:build"})
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "W.pth"), "--spec", str(spec), "--trust-code"])
    assert result.exit_code == 0, result.output
    assert "logits (1, 29, 32, 32)" in flat(result.output)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["W.pth", "factory.py", "m.yaml"]


# ---- 2. outputs that would be silently wrong ----------------------------------------------------------------

def test_a_vote_count_no_pixel_can_reach_is_an_error(tmp_path: Path) -> None:
    stores = [make_store(tmp_path / f"{name}.zarr", name, seed) for seed, name in enumerate(["a", "b"], 1)]
    with pytest.raises(SegensError, match=r"fewer than the 3 it needs: it could only be empty"):
        combine(stores, tmp_path / "hard.csv", "hard", min_votes=3, progress=False)
    assert not (tmp_path / "hard.csv").exists()


def test_logits_declared_as_probabilities_are_an_error_naming_member_and_image(tmp_path: Path,
                                                                               tiny_root: Path) -> None:
    checkpoint = _scripted(tmp_path / "logits.pt", bias=3.0)
    spec = _spec(tmp_path, checkpoint, model={"output": {"type": "probabilities"}})
    first = discover(tiny_root, "test", require_labels=False).records[0].key
    with pytest.raises(SegensError, match=rf"declared as probabilities .*member m, first at image {first}"):
        predict_member(spec, "test", tiny_root, tmp_path / "m.zarr", progress=False)
    assert not (tmp_path / "m.zarr").exists()


def test_a_field_a_kind_does_not_use_is_an_error(tmp_path: Path) -> None:
    spec = tmp_path / "team.yaml"
    spec.write_text(yaml.safe_dump({"name": "team", "kind": "csv", "classes": None, "tta": ["hflip"],
                                    "input": {"size": 64}, "model": {"oof": "a.csv", "test": "b.csv"}}))
    with pytest.raises(SegensError, match=r"team\.yaml: kind csv does not use classes, input, tta: it would be "
                                          r"ignored"):
        build_member(load_spec(spec))


@pytest.mark.parametrize("document", [{"scale": 1e300}, {"scale": 1e-50},
                                      {"normalize": {"mean": [0, 0, 0], "std": [1e-50, 1, 1]}},
                                      {"normalize": {"mean": [1e39, 0, 0], "std": [1, 1, 1]}},
                                      {"normalize": {"mean": [0, 0, 0], "std": [1e39, 1, 1]}}],
                         ids=["scale-huge", "scale-tiny", "std-zero-in-float32", "mean-inf", "std-inf"])
def test_contract_values_are_checked_in_float32(document: dict) -> None:
    with pytest.raises(SegensError, match="float32"):
        InputContract.from_document(document, (32, 32))


def test_yaml_exponents_without_a_dot_are_read_as_numbers(tmp_path: Path) -> None:
    checkpoint = _scripted(tmp_path / "s.pt")
    spec = _spec(tmp_path, checkpoint)
    spec.write_text(spec.read_text().replace("size:", "normalize: {mean: [5e-1, 5e-1, 5e-1], std: [2e-1, 2E-1, "
                                                         "25e-2]}\n  size:"))
    assert load_spec(spec).input.mean_std == ((0.5, 0.5, 0.5), (0.2, 0.2, 0.25))


# ---- 3. data the user owns -------------------------------------------------------------------------------------

def test_train_member_never_replaces_a_users_checkpoint_entry_without_overwrite(tmp_path: Path,
                                                                               tiny_root: Path) -> None:
    folds, _ = make_folds(tiny_root, k=2, seed=0)
    save_folds(folds, tmp_path / "folds.json")
    torch.save({"w": torch.zeros(1)}, tmp_path / "smp_sd.pth")
    text = ("# our UNet, fold 0 trained on the cluster\nversion: 2\nname: byo\nkind: smp\ninput: {size: [32, 32]}\n"
            "model: {architecture: Unet, encoder: resnet18}   # as trained\ntrain: {epochs: 1}\ncheckpoints:\n"
            f"  0: {{path: smp_sd.pth, sha256: {sha256_of(tmp_path / 'smp_sd.pth')}}}  # do not lose this\n")
    (tmp_path / "byo.yaml").write_text(text)
    with pytest.raises(SegensError, match=r"fold 0's checkpoint is .*smp_sd\.pth, not one train-member wrote.*"
                                          r"--overwrite"):
        train_member(tmp_path / "byo.yaml", tiny_root, tmp_path / "folds.json", fold="0", progress=False)
    assert (tmp_path / "byo.yaml").read_text() == text and not (tmp_path / "byo").exists()


def test_a_checkpoint_entry_is_written_into_the_spec_as_its_author_wrote_it(tmp_path: Path) -> None:
    (tmp_path / "own.pt").write_bytes(b"x")
    text = ("# our member\nversion: 2\nname: byo   # names folders\nkind: smp\ninput: {size: [32, 32]}   # small\n"
            "model:\n  encoder: resnet18    # first\n  architecture: Unet\ncheckpoints:\n"
            "  0: {path: own.pt, sha256: '00'}  # kept\n")
    (tmp_path / "byo.yaml").write_text(text)
    record_checkpoint(tmp_path / "byo.yaml", 1, Checkpoint(tmp_path / "byo" / "fold1" / "best.pt", "ab" * 32, 0.5))
    written = (tmp_path / "byo.yaml").read_text()
    assert written.startswith(text)  # comments, order, flow style and quoting of the rest unchanged
    assert written[len(text):] == f"  1:\n    path: byo/fold1/best.pt\n    sha256: {'ab' * 32}\n    val_dice: 0.5\n"
    spec = load_spec(tmp_path / "byo.yaml")
    assert sorted(spec.checkpoints) == [0, 1] and spec.checkpoints[0].sha256 == "00"


def test_no_command_writes_inside_a_data_root(tmp_path: Path, tiny_root: Path) -> None:
    inside = tiny_root / "test" / "DCM" / "ID003" / "overlay.png"
    result = CliRunner().invoke(app, ["show", "ID003/image1661140000000", "--data", str(tiny_root), "--out",
                                      str(inside)])
    assert f"lies inside the data root {tiny_root}" in _said(result)
    assert not inside.exists()
    result = CliRunner().invoke(app, ["folds", "make", str(tiny_root), "--k", "2", "--out",
                                      str(tiny_root / "folds.json")])
    assert "lies inside the data root" in _said(result)
    with pytest.raises(SegensError, match="lies inside the data root"):
        check_outputs([Output(tiny_root / "stores" / "m.test.zarr", "store")])
    with pytest.raises(SegensError, match="lies inside the data root"):
        generate(tiny_root / "more", n_train_patients=1, n_test_patients=0, size=64)
    assert sorted(path.name for path in tiny_root.iterdir()) == ["test", "train"]


def _oof_stores(base: Path, root: Path) -> list[Path]:
    records = discover(root, "train").records
    keys = [record.key for record in records]
    return [make_store(base / f"{name}.oof.zarr", name, seed, keys=keys, split="oof",
                       shapes={key: (40, 48) for key in keys}) for seed, name in enumerate(["a", "b"], 1)]


def test_a_resume_folder_that_is_a_link_is_refused(tmp_path: Path, tiny_root: Path) -> None:
    stores = _oof_stores(tmp_path, tiny_root)
    elsewhere = tmp_path / "scratch"
    elsewhere.mkdir()
    out = tmp_path / "recipe.json"
    partial_root(out).symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(SegensError, match=r"resume folder is a link.*remove the link"):
        search_weights(stores, tiny_root, None, out, step=0.5, progress=False)
    assert not any(elsewhere.iterdir()) and not out.exists()


def test_a_first_run_refused_at_load_time_leaves_nothing_and_the_fixed_rerun_works(tmp_path: Path,
                                                                                   tiny_root: Path) -> None:
    torch.save(_conv(), tmp_path / "whole.pt")
    spec = _spec(tmp_path, tmp_path / "whole.pt")
    with pytest.raises(SegensError, match="holds a whole pickled model.*--trust-pickle"):
        predict_member(spec, "test", tiny_root, tmp_path / "m.zarr", progress=False)
    assert not (tmp_path / "m.zarr").exists()
    summary = predict_member(spec, "test", tiny_root, tmp_path / "m.zarr", trust_pickle=True, progress=False)
    assert summary.written == 2


# ---- 4. errors, not tracebacks or hangs ---------------------------------------------------------------------

def test_bracketed_text_in_errors_reaches_the_terminal(tmp_path: Path, tiny_root: Path) -> None:
    checkpoint = _scripted(tmp_path / "s.pt")
    spec = _spec(tmp_path, checkpoint)
    spec.write_text(spec.read_text().replace("size:\n  - 32\n  - 32", "size: big"))
    result = subprocess.run([sys.executable, "-m", "segens.cli", "predict-member", str(spec), "--split", "test",
                             "--data", str(tiny_root), "--out", str(tmp_path / "m.zarr")], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "COLUMNS": "60"})
    assert result.returncode == 2 and "a positive integer side or [height, width], each at most 8192" in \
        flat(result.stderr)


def test_fifos_are_refused_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo.pt")
    result = subprocess.run([sys.executable, "-m", "segens.cli", "inspect", str(tmp_path / "fifo.pt")],
                            capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"})
    assert result.returncode == 2 and "is not a regular file (a FIFO, socket or device)" in flat(result.stderr)
    finished = FinishedClasses(tmp_path / "recipe.json", "k" * 64, members=2, strategies=["weighted"])
    finished.folder.mkdir(parents=True)
    os.mkfifo(finished.folder / "class-05.json")
    loaded: list = []
    reader = threading.Thread(target=lambda: loaded.append(finished.load()), daemon=True)
    reader.start()
    reader.join(timeout=30)
    assert not reader.is_alive() and loaded == [{}]  # skipped, searched again


def test_a_channel_mismatch_is_named_before_any_store_exists(tmp_path: Path, tiny_root: Path) -> None:
    checkpoint = _scripted(tmp_path / "rgb.pt", in_channels=3)
    spec = _spec(tmp_path, checkpoint, input={"size": [32, 32], "channels": 1})
    with pytest.raises(SegensError, match=r"rgb\.pt: the model does not run on an input of the spec's contract, "
                                          r"shape \(1, 1, 32, 32\) \(input.channels 1"):
        predict_member(spec, "test", tiny_root, tmp_path / "m.zarr", progress=False)
    assert not (tmp_path / "m.zarr").exists()


def test_work_is_bounded_before_it_starts(tmp_path: Path) -> None:
    checkpoint = _scripted(tmp_path / "s.pt")
    spec = _spec(tmp_path, checkpoint, input={"size": 8192}, tta=[{"scale": 4}])
    with pytest.raises(SegensError, match=r"makes the input 32768 pixels on a side .*up to 8192"):
        load_spec(spec)


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_long_names_immutable_targets_and_append_only_folders(tmp_path: Path) -> None:
    stores = [make_store(tmp_path / f"{name}.zarr", name, seed) for seed, name in enumerate(["a", "b"], 1)]
    long = tmp_path / ("s" * 244 + ".csv")  # a legal 248-character name
    combine(stores, long, "soft", progress=False)
    assert long.stat().st_size > 0 and [path.name for path in tmp_path.glob("*.part")] == []
    target = tmp_path / "locked.csv"
    target.write_text("old\n")
    if not _chattr("+i", target):
        pytest.skip("chattr is not available on this file system")
    try:
        with pytest.raises(SegensError, match=r"locked\.csv: cannot (write beside|replace) it"):
            combine(stores, target, "soft", overwrite=True, progress=False)
    finally:
        _chattr("-i", target)
    assert target.read_text() == "old\n" and not list(tmp_path.glob(".locked*.part"))
    folder = tmp_path / "append-only"
    folder.mkdir()
    (folder / "out.csv").write_text("old\n")
    assert _chattr("+a", folder)
    try:
        with pytest.raises(SegensError, match=r"out\.csv: cannot (write beside|replace) it"):
            combine(stores, folder / "out.csv", "soft", overwrite=True, progress=False)
    finally:
        _chattr("-a", folder)
    assert (folder / "out.csv").read_text() == "old\n"


# ---- 5. tests that pin the landed code against independent references ------------------------------------------

def test_recipe_weights_that_do_not_sum_to_one_are_scaled_by_each_class_own_total(tmp_path: Path) -> None:
    np.testing.assert_array_equal(normalise_weights(np.array([[2.0, 2.0, 0.0], [1.0, 3.0, 4.0]])),
                                  np.array([[0.5, 0.5, 0.0], [0.125, 0.375, 0.5]], np.float32))
    stores = [make_store(tmp_path / f"{name}.zarr", name, seed) for seed, name in enumerate(["a", "b", "c"], 1)]
    raw = [[1.0 + channel, 2.0, 0.5 * (channel % 4)] for channel in range(NUM_CLASSES)]  # totals 3.0 .. 33.5
    members = [{"name": name, "checkpoints": {"0": f"sha-{name}"}} for name in ("a", "b", "c")]
    save_recipe(Recipe("weighted", members, weights=raw, thresholds=[0.4] * NUM_CLASSES), tmp_path / "r.json")
    combine(stores, tmp_path / "ours.csv", "weighted", recipe_path=tmp_path / "r.json", progress=False)
    by_hand = np.array([[value / sum(row) for value in row] for row in raw], np.float32)
    reference_combine(stores, by_hand, np.full(NUM_CLASSES, 0.4, np.float32), tmp_path / "reference.csv")
    assert (tmp_path / "ours.csv").read_bytes() == (tmp_path / "reference.csv").read_bytes()


def test_the_no_loss_rule_uses_the_sample_standard_error() -> None:
    gains = np.array([1.0, 0.6, 0.9, -0.3])  # mean / SE: 1.86 with ddof 1, 2.15 with ddof 0
    assert standard_error(gains) == pytest.approx(np.sqrt(np.sum((gains - gains.mean()) ** 2) / 3 / 4))
    assert not reliably_better(gains, np.zeros(4))
    assert reliably_better(gains + 0.1, np.zeros(4))


def test_dice_is_averaged_over_images_per_class_then_over_classes() -> None:
    scores = np.array([[1.0, 0.0, 0.5, 0.2], [0.3, 0.9, 0.1, 1.0], [0.0, 0.4, 0.8, 0.6]])  # 3 images x 4 classes
    table = DiceTable(classes=("a", "b", "c", "d"))
    for image, row in zip(("i1", "i2", "i3"), scores):
        table.add(image, row)
    per_class = [sum(scores[i][c] for i in range(3)) / 3 for c in range(4)]
    np.testing.assert_allclose(table.per_class(), per_class, rtol=0, atol=1e-15)
    assert table.mean() == pytest.approx(sum(per_class) / 4, abs=1e-15)
