"""``ens demo``: the whole workflow on a fresh machine in one command, on a synthetic data set.

synth -> patient-grouped folds -> three members trained on every fold (UNet++ with VGG19-BN, UNet++ with an
HRNet encoder, YOLOv8-seg) -> OOF and test stores -> weight search with a CV estimate -> soft, weighted and
hard voting -> Dice on the test labels, with the time of every step. Sizes are chosen to fit a 2-core CPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from segens.ensemble.combine import combine
from segens.ensemble.evaluate import evaluate_submission
from segens.ensemble.search_weights import search_weights
from segens.folds.splits import make_folds, save_folds
from segens.members.train import train_member
from segens.members.predict import predict_member
from segens.synth import generate

console = Console(stderr=True)


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of a demo run."""

    train_patients: int
    test_patients: int
    image_size: int
    k: int
    smp_input: int
    smp_epochs: int
    yolo_input: int
    yolo_epochs: int
    step: float


FULL = DemoConfig(train_patients=16, test_patients=6, image_size=512, k=3, smp_input=64, smp_epochs=11,
                  yolo_input=128, yolo_epochs=8, step=0.2)
QUICK = DemoConfig(train_patients=6, test_patients=2, image_size=128, k=2, smp_input=64, smp_epochs=1,
                   yolo_input=64, yolo_epochs=1, step=0.25)


def member_specs(config: DemoConfig) -> dict[str, dict[str, Any]]:
    """The three members of the demo (the real data would use input sizes of 1024 and more epochs). VGG19 with
    batch norm: plain vgg19 learns too slowly for a few CPU epochs (val Dice 0.06 against 0.16 after the same
    time); the real-data spec in examples/ uses vgg19. The Dice-heavy loss learns the thin bones faster."""
    smp_train = {"epochs": config.smp_epochs, "batch_size": 4, "lr": 0.003, "optimizer": "adamw",
                 "scheduler": "none", "loss": {"bce": 0.2, "dice": 1.0},
                 "augment": {"hflip": 0.5, "brightness_contrast": 0.1}, "seed": 0}
    return {
        "unetpp-vgg19": {"name": "unetpp-vgg19", "kind": "smp", "input_size": config.smp_input, "tta": [],
                         "model": {"architecture": "UnetPlusPlus", "encoder": "vgg19_bn"}, "train": smp_train},
        "unetpp-hrnet": {"name": "unetpp-hrnet", "kind": "smp", "input_size": config.smp_input, "tta": [],
                         "model": {"architecture": "UnetPlusPlus", "encoder": "tu-hrnet_w18_small"},
                         "train": smp_train},
        "yolov8-seg": {"name": "yolov8-seg", "kind": "yolo", "input_size": config.yolo_input, "tta": [],
                       "model": {"config": "yolov8n-seg.yaml", "conf": 0.001, "max_det": 60},
                       "train": {"epochs": config.yolo_epochs, "batch": 4, "nbs": 4, "optimizer": "AdamW",
                                 "lr0": 0.002, "warmup_epochs": 0, "seed": 0}},
    }


@dataclass
class DemoResult:
    """Test Dice of each member and strategy, the CV estimate, and seconds per step."""

    out: Path
    member_dice: dict[str, float] = field(default_factory=dict)
    strategy_dice: dict[str, float] = field(default_factory=dict)
    cv: dict[str, float] = field(default_factory=dict)
    verdict: str = ""
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def _step(result: DemoResult, name: str, number: int, total: int, action: Callable[[], Any]) -> Any:
    console.rule(f"[bold]{number}/{total} {name}")
    started = time.perf_counter()
    value = action()
    result.seconds[name] = time.perf_counter() - started
    console.print(f"{name}: {result.seconds[name]:.1f} s", highlight=False)
    return value


def run_demo(out: str | Path = "demo", quick: bool = False, device: str = "cpu") -> DemoResult:
    """Run every step into ``out`` (data/, folds.json, members/, stores/, recipe.json, CSVs, plots)."""
    config = QUICK if quick else FULL
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    root, stores = out / "data", out / "stores"
    result = DemoResult(out)
    specs = member_specs(config)
    total = 8
    _step(result, "synthetic data", 1, total, lambda: generate(
        root, config.train_patients, config.test_patients, size=config.image_size, seed=0, progress=True, overwrite=True))

    def folds_step() -> None:
        folds, _ = make_folds(root, k=config.k, seed=0)
        save_folds(folds, out / "folds.json")
    _step(result, "folds", 2, total, folds_step)

    def train_step() -> None:
        for name, spec in specs.items():
            path = out / "members" / f"{name}.yaml"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(yaml.safe_dump(spec, sort_keys=False))
            console.print(f"training {name} on {config.k} folds", highlight=False)
            train_member(path, root, out / "folds.json", fold="all", device=device,
                         trust_pickle=True)  # resumes only the demo's own earlier run
    _step(result, "train members", 3, total, train_step)

    def predict_step() -> None:
        for name in specs:
            spec_path = out / "members" / f"{name}.yaml"
            for split in ("oof", "test"):
                predict_member(spec_path, split, root, stores / f"{name}.{split}.zarr", folds_path=out / "folds.json",
                               overwrite=True, device=device, trust_pickle=True)  # our own checkpoints
    _step(result, "predict OOF and test stores", 4, total, predict_step)

    oof = [str(stores / f"{name}.oof.zarr") for name in specs]
    test = [str(stores / f"{name}.test.zarr") for name in specs]

    def search_step():
        return search_weights(oof, root, out / "folds.json", out / "recipe.json", strategy="weighted",
                              step=config.step, cv=True, jobs=2, overwrite=True)  # classes on both cores
    report = _step(result, "search weights (with CV)", 5, total, search_step)
    result.cv = {key: value for key, value in report.summary().items() if key.startswith("cv_")}
    result.verdict = report.verdict()

    def combine_step() -> None:
        combine(test, out / "submission_soft.csv", "soft", overwrite=True)  # a rerun replaces its own CSVs
        combine(test, out / "submission_weighted.csv", "weighted", recipe_path=out / "recipe.json", overwrite=True)
        combine(test, out / "submission_hard.csv", "hard", overwrite=True)
        for name, store in zip(specs, test):
            combine([store], out / f"member_{name}.csv", "soft", overwrite=True)
    _step(result, "combine (soft, weighted, hard)", 6, total, combine_step)

    def evaluate_step() -> dict[str, list[float]]:
        per_class = {}
        for name in specs:
            table = evaluate_submission(out / f"member_{name}.csv", root, "test")
            result.member_dice[name] = table.mean()
            per_class[name] = table.per_class().tolist()
        for strategy in ("soft", "weighted", "hard"):
            table = evaluate_submission(out / f"submission_{strategy}.csv", root, "test")
            result.strategy_dice[strategy] = table.mean()
            per_class[f"{strategy} vote"] = table.per_class().tolist()
        return per_class
    per_class = _step(result, "evaluate on the test labels", 7, total, evaluate_step)

    def pictures_step() -> None:
        from segens.ensemble.plots import plot_dice_bars, plot_search_report

        result.files["dice plot"] = str(plot_dice_bars(per_class, out / "dice.png", "Test Dice per class"))
        result.files["search report"] = str(plot_search_report(report, out / "search_report.png"))
        result.files["submission"] = str(out / "submission_weighted.csv")
        result.files["recipe"] = str(out / "recipe.json")
        overlay = _overlay(root, out)
        if overlay:
            result.files["overlay"] = overlay
    _step(result, "plots and overlay", 8, total, pictures_step)
    (out / "demo_result.json").write_text(json.dumps(
        {"member_dice": result.member_dice, "strategy_dice": result.strategy_dice, "cv": result.cv,
         "verdict": result.verdict, "seconds": result.seconds, "files": result.files}, indent=1))
    return result


def _overlay(root: Path, out: Path) -> str | None:
    """An overlay of the weighted submission on the first test image, when the overlay module is available."""
    try:
        from segens.dataset import discover
        from segens.ensemble.overlay import draw_overlay
    except ImportError:
        return None
    record = discover(root, "test").records[0]
    return str(draw_overlay(record.key, root, [out / "submission_weighted.csv"], out / "overlay.png"))
