"""The training package: settings (steps budget, warmup + cosine), the decode-once data cache, precision choices,
the shared loop (steps budget, resume, Dice recorded at the original size) and the one-way folder dependencies."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from segens.conventions.dataset import discover, read_record_mask
from segens.conventions.dice import DiceTable, dice_per_class
from segens.errors import SegensError
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.members.input_contract import InputContract
from segens.members.registry import factory
from segens.members.spec import load_spec
from segens.members.train import train_member
from segens.synth import generate
from segens.training.augment import Augment
from segens.training.data import CachedImages, LabelledImages, cache_records, decode
from segens.training.precision import choose_precision
from segens.training.settings import parse_settings

SEGENS = Path(__file__).resolve().parents[1] / "segens"
SMALL_UNET = {"architecture": "Unet", "encoder": "resnet18", "options": {"decoder_channels": [16, 8, 8, 8, 8]}}


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("training")
    generate(base / "data", n_train_patients=3, n_test_patients=1, size=80, seed=3)
    folds, _ = make_folds(base / "data", k=3, seed=0)
    save_folds(folds, base / "folds.json")
    return base


def _spec(path: Path, **train) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "r18", "kind": "smp", "input": {"size": 32}, "model": SMALL_UNET,
        "train": {"batch_size": 2, "lr": 0.01, "optimizer": "adamw", "scheduler": "cosine", "seed": 0, **train}}))
    return path


# ---- settings --------------------------------------------------------------------------------------------------

def test_steps_budget_and_schedule() -> None:
    settings = parse_settings({"steps": 100, "scheduler": "cosine", "warmup": 0.1, "min_lr": 0.0}, "m.yaml")
    assert settings.epochs is None and settings.total_steps(steps_per_epoch=7) == 100
    assert parse_settings({"epochs": 3}, "m.yaml").total_steps(steps_per_epoch=7) == 21
    factors = [settings.lr_factor(step, 100) for step in range(100)]
    assert settings.warmup_steps(100) == 10
    assert factors[:10] == pytest.approx([(step + 1) / 11 for step in range(10)])  # linear warmup, never 0
    assert factors[10] == pytest.approx(1.0) and factors[-1] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))  # cosine only falls
    constant = parse_settings({"steps": 10, "warmup": 2}, "m.yaml")
    assert [constant.lr_factor(step, 10) for step in range(4)] == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])


@pytest.mark.parametrize("section, message", [
    ({"epochs": 3, "steps": 10}, r"m.yaml: train.epochs and train.steps are alternatives"),
    ({"steps": 0}, r"m.yaml: train.steps must be an integer >= 1, got 0"),
    ({"steps": 2.5}, r"m.yaml: train.steps must be an integer >= 1"),
    ({"warmup": 1.5}, r"m.yaml: train.warmup is a fraction of all steps"),
    ({"amp": "fp8"}, r"m.yaml: unknown train.amp 'fp8'; choose from auto, off, bf16, fp16"),
    ({"cache": "ram"}, r"m.yaml: unknown train.cache 'ram'; choose from memory, disk, none"),
    ({"scheduler": "step"}, r"m.yaml: unknown train.scheduler 'step'"),
    ({"lr": 0}, r"m.yaml: train.lr must be > 0"),
    ({"epoch": 3}, r"m.yaml: unknown train field\(s\) epoch; allowed: epochs, steps"),
])
def test_bad_train_settings_name_the_spec_and_field(section: dict, message: str) -> None:
    with pytest.raises(SegensError, match=message):
        parse_settings(section, "m.yaml")


def test_bad_train_settings_stop_the_smp_member(tmp_path: Path) -> None:
    spec = load_spec(_spec(tmp_path / "m.yaml", epochs=1, steps=4))
    with pytest.raises(SegensError, match=r"m.yaml: train.epochs and train.steps are alternatives"):
        factory("smp")(spec)


# ---- precision -------------------------------------------------------------------------------------------------

def test_precision_on_cpu_is_float32_unless_asked() -> None:
    cpu = torch.device("cpu")
    plain = choose_precision(cpu)
    assert (plain.dtype, plain.scaler, plain.channels_last) == (None, False, False)
    assert plain.describe() == "float32" and not plain.grad_scaler().is_enabled()
    asked = choose_precision(cpu, "bf16", "true")
    assert (asked.dtype, asked.scaler, asked.channels_last) == (torch.bfloat16, False, True)
    assert asked.describe() == "bf16 autocast, channels_last"
    model = asked.layout(torch.nn.Conv2d(3, 4, 3))
    with asked.autocast():
        out = model(asked.layout(torch.ones(1, 3, 8, 8)))
    assert out.dtype == torch.bfloat16 and out.is_contiguous(memory_format=torch.channels_last)


# ---- the data cache --------------------------------------------------------------------------------------------

def test_cache_decodes_once_and_equals_the_per_step_path(small: Path, tmp_path: Path) -> None:
    records = discover(small / "data", "train").records[:3]
    contract = InputContract(size=(32, 48))
    items = cache_records(records, contract)
    assert [item.key for item in items] == [record.key for record in records]
    assert items[0].image.shape == (32, 48) and items[0].image.dtype == np.uint8
    assert items[0].masks.shape == (29, 32, 48) and set(np.unique(items[0].masks)) <= {0, 1}
    augment = Augment({"hflip": 0.5, "rotate": 10, "brightness_contrast": 0.2})
    cached, uncached = CachedImages(items, contract, augment), LabelledImages(records, contract, augment)
    for index in range(3):
        torch.manual_seed(index)
        image, masks = cached[index]
        torch.manual_seed(index)
        expected_image, expected_masks = uncached[index]
        assert torch.equal(image, expected_image) and torch.equal(masks, expected_masks)

    # on disk: written once, read back by a later run, and a broken file is decoded again
    folder = tmp_path / "cache"
    first = cache_records(records, contract, folder)
    files = sorted(folder.glob("*.npz"))
    assert len(files) == 3 and not list(folder.glob("*.tmp*"))
    stamps = [path.stat().st_mtime_ns for path in files]
    again = cache_records(records, contract, folder)
    assert [path.stat().st_mtime_ns for path in files] == stamps
    files[0].write_bytes(b"half a file")
    repaired = cache_records(records, contract, folder)
    for a, b, c in zip(first, again, repaired):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.image, c.image)
        assert np.array_equal(a.masks, b.masks) and np.array_equal(a.masks, c.masks)
    # another contract is another entry, not a stale hit
    cache_records(records[:1], InputContract(size=(64, 64)), folder)
    assert len(list(folder.glob("*.npz"))) == 4


def test_cache_names_an_image_without_labels(small: Path) -> None:
    record = discover(small / "data", "test").records[0]
    if record.label_path is not None:
        record = type(record)(**{**record.__dict__, "label_path": None})
    with pytest.raises(SegensError, match=r"\.png: no label file; a training image needs outputs_json"):
        decode(record, InputContract(size=(32, 32)))


# ---- the loop --------------------------------------------------------------------------------------------------

def test_steps_budget_resumes_and_records_the_dice_at_original_size(small: Path, tmp_path: Path) -> None:
    spec_path = _spec(tmp_path / "m.yaml", steps=5, warmup=2, val_every=2, cache="disk")
    (summary,) = train_member(spec_path, small / "data", small / "folds.json", fold="0", progress=False)
    fold_dir = tmp_path / "r18" / "fold0"
    history = json.loads((fold_dir / "history.json").read_text())
    # 4 training images at batch 2: 2 steps an epoch; 5 steps = 3 epochs, the last one partial
    assert [(row["epoch"], row["step"]) for row in history] == [(1, 2), (2, 4), (3, 5)]
    assert ["val_dice_input" in row for row in history] == [False, True, True]
    assert len(list((tmp_path / "r18" / "cache").glob("*.npz"))) == 6  # every train and val image of the fold
    saved = torch.load(fold_dir / "last.pt", map_location="cpu", weights_only=True)
    assert saved["step"] == 5 and saved["val_dice"] == summary.val_dice

    # the recorded Dice is the competition's at each image's original size, of best.pt
    spec = load_spec(spec_path)
    member = factory("smp")(spec)
    folds = json.loads((small / "folds.json").read_text())
    val = [record for record in discover(small / "data", "train").records if folds["folds"][record.key] == 0]
    table = DiceTable()
    for record, probabilities in zip(val, member.predict([member.read_image(r.image_path) for r in val], [0])):
        table.add(record.key, dice_per_class(probabilities > 0.5, read_record_mask(record)))
    assert summary.val_dice == pytest.approx(table.mean(), abs=1e-12)
    assert spec.checkpoints[0].val_dice == round(summary.val_dice, 6)  # the spec keeps 6 decimals

    # a larger budget continues after the last epoch; a finished fold is returned without training
    _spec(spec_path, steps=8, warmup=2, val_every=2, cache="disk")
    train_member(spec_path, small / "data", small / "folds.json", fold="0", progress=False)
    history = json.loads((fold_dir / "history.json").read_text())
    assert [row["step"] for row in history] == [2, 4, 5, 7, 8]
    before = (fold_dir / "last.pt").stat().st_mtime_ns
    (again,) = train_member(spec_path, small / "data", small / "folds.json", fold="0", progress=False)
    assert (fold_dir / "last.pt").stat().st_mtime_ns == before and again.epochs == 5


def test_a_resume_state_that_no_longer_fits_the_spec_is_an_error_naming_last_pt(small: Path, tmp_path: Path) -> None:
    spec_path = _spec(tmp_path / "m.yaml", steps=2, val_every=1)
    train_member(spec_path, small / "data", small / "folds.json", fold="0", progress=False)
    last = tmp_path / "r18" / "fold0" / "last.pt"
    assert last.is_file()
    document = yaml.safe_load(spec_path.read_text())
    document["train"]["steps"] = 4  # unfinished again, so it resumes ...
    document["model"]["options"]["decoder_channels"] = [16, 16, 8, 8, 8]  # ... into another decoder
    spec_path.write_text(yaml.safe_dump(document))
    with pytest.raises(SegensError, match=r"last\.pt: this fold's resume state does not fit the member spec as it "
                                          r"is now \(RuntimeError: .*\); delete it to train the fold from its first"):
        train_member(spec_path, small / "data", small / "folds.json", fold="0", progress=False)


def test_amp_and_channels_last_run_on_cpu(small: Path, tmp_path: Path) -> None:
    spec_path = _spec(tmp_path / "m.yaml", steps=2, amp="bf16", channels_last=True)
    (summary,) = train_member(spec_path, small / "data", small / "folds.json", fold="1", progress=False)
    assert 0.0 <= summary.val_dice <= 1.0
    best = torch.load(summary.checkpoint, map_location="cpu", weights_only=True)
    assert all(tensor.is_contiguous() for tensor in best["state_dict"].values())
    assert all(tensor.dtype != torch.bfloat16 for tensor in best["state_dict"].values())


# ---- one-way folder dependencies ---------------------------------------------------------------------------------

def _folder_imports() -> dict[str, set[str]]:
    """segens sub-folder -> the other segens sub-folders its modules import."""
    folders = {path.name for path in SEGENS.iterdir() if path.is_dir() and (path / "__init__.py").is_file()}
    edges: dict[str, set[str]] = {folder: set() for folder in folders}
    for folder in folders:
        for module in (SEGENS / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(module.read_text())):
                names = [node.module or ""] if isinstance(node, ast.ImportFrom) else (
                    [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
                for name in names:
                    parts = name.split(".")
                    if parts[0] == "segens" and len(parts) > 1 and parts[1] in folders and parts[1] != folder:
                        edges[folder].add(parts[1])
    return edges


def test_folders_import_one_way() -> None:
    edges = _folder_imports()
    assert edges["infra"] == set() and edges["conventions"] <= {"infra"}  # the two bottom layers
    assert edges["store"] <= {"conventions", "infra"}
    assert edges["training"] <= {"synth", "conventions", "infra"} and "members" not in edges["folds"]
    assert "training" in edges["members"]  # the member kinds use the one training package
    assert "search" not in edges["ensemble"] and "members" not in edges["search"] | edges["ensemble"]
    assert not {"ensemble", "search", "voting"} & edges["members"]  # members sit below the ensemble layers

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})) for nxt in edges[start])

    cycles = sorted(folder for folder in edges if reaches(folder, folder, {folder}))
    assert not cycles, f"folders that import themselves through others: {cycles} ({edges})"
