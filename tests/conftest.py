"""Shared fixtures: tiny data roots written by hand (no generator) for convention tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from segens.conventions.classes import CLASSES
from segens.conventions.labels import write_label_json


def flat(text: str) -> str:
    """Terminal output with every run of whitespace made one space: phrases match at any terminal width (rich
    wraps long lines where the width ends)."""
    return " ".join(text.split())


def square_polygons(height: int, width: int, seed: int = 0) -> dict[str, np.ndarray]:
    """One small axis-aligned square per class, placed at random inside the image; some overlap."""
    rng = np.random.default_rng(seed)
    polygons = {}
    for name in CLASSES:
        side = int(rng.integers(3, max(4, min(height, width) // 3)))
        x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        polygons[name] = np.array([[x, y], [x + side, y], [x + side, y + side], [x, y + side]], dtype=np.int32)
    return polygons


def write_image(path: Path, height: int, width: int, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image = np.random.default_rng(seed).integers(0, 255, (height, width), dtype=np.uint8)
    assert cv2.imwrite(str(path), image)


@pytest.fixture
def tiny_root(tmp_path: Path) -> Path:
    """A data root with 2 patients x 2 images in train and 1 patient in test, 40x48 px, names with '_'."""
    root = tmp_path / "root"
    names = {
        ("train", "ID001"): ["image1661130828152_R", "image1661130828153"],
        ("train", "ID002"): ["image1661130900000", "image1661130900001_L"],
        ("test", "ID003"): ["image1661140000000", "image1661140000001"],
    }
    for number, ((split, patient), stems) in enumerate(names.items()):
        for offset, stem in enumerate(stems):
            seed = number * 10 + offset
            write_image(root / split / "DCM" / patient / f"{stem}.png", 40, 48, seed)
            write_label_json(root / split / "outputs_json" / patient / f"{stem}.json", square_polygons(40, 48, seed),
                             metadata={"width": 2048, "height": 2048})
    return root


def make_smp_project(base: Path) -> Path:
    """A synthetic data root, 3 patient-grouped folds and an smp member ``unet.yaml`` whose three fold
    checkpoints are real (untrained) small models saved as state_dicts."""
    import segmentation_models_pytorch as smp
    import torch

    from segens.folds.file import save_folds
    from segens.folds.splits import make_folds
    from segens.members.spec import sha256_of
    from segens.synth import generate

    generate(base / "data", n_train_patients=3, n_test_patients=1, size=80, seed=2)
    folds, _ = make_folds(base / "data", k=3, seed=0)
    save_folds(folds, base / "folds.json")
    checkpoints = {}
    for fold in range(3):
        torch.manual_seed(fold)
        model = smp.Unet("resnet18", encoder_weights=None, classes=29, decoder_channels=(32, 16, 16, 8, 8))
        path = base / f"fold{fold}.pt"
        torch.save(model.state_dict(), path)
        checkpoints[fold] = {"path": path.name, "sha256": sha256_of(path)}
    (base / "unet.yaml").write_text(yaml.safe_dump({
        "name": "unet", "kind": "smp", "input_size": 64, "tta": ["hflip"],
        "model": {"architecture": "Unet", "encoder": "resnet18", "options": {"decoder_channels": [32, 16, 16, 8, 8]}},
        "checkpoints": checkpoints}))
    return base
