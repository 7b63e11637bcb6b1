"""``ens demo``: the whole workflow on a fresh machine in one command, on a synthetic data set.

synth -> patient-grouped folds -> three members trained on every fold (two UNet++ with light encoders, YOLOv8n-seg)
-> OOF and test stores (test: the folds' mean, and each fold model's own maps) -> each member's own thresholds and
the ensemble's recipe searched on OOF (``--strategy auto --calibrate isotonic`` with CV: the strategy and each
class's level picked on held-out images; and for comparison weighted voting without calibration, calibrated
soft and calibrated weighted voting) -> the plain mean, the majority vote and the recipes (the main one on the
folds' mean maps and fold by fold) -> Dice on the test labels, each member's calibration error on the test maps
before and after an isotonic calibration fitted on its OOF maps, with the time of every step. FULL fits 15 minutes of a 2-core CPU, QUICK 3 minutes; CUDA is for one GPU.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from segens.demo.config import config_for, encoder_of, member_specs
from segens.ensemble.combine import combine
from segens.ensemble.evaluate import evaluate_submission
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.infra.outputs import Output, check_outputs
from segens.members.predict import fold_store_path, predict_member
from segens.members.spec import save_spec
from segens.members.train import train_member
from segens.search.run import search_weights
from segens.synth import generate

STEPS = ("synthetic data", "folds", "train members", "predict OOF and test stores", "search member thresholds",
         "search the recipe (auto, calibrated, with CV)", "search weighted and calibrated recipes", "combine",
         "evaluate on the test labels", "calibration error", "quality control (qc)", "plots and overlay")
COMPARED = {"weighted": ("weighted", "none", "searched weighted vote"),
            "calibrated_soft": ("soft", "isotonic", "calibrated soft vote"),
            "calibrated_weighted": ("weighted", "isotonic", "calibrated weighted vote")}
"""Recipes searched beside the main one, for the table: file stem -> (strategy, calibration, row)."""
SUSPICIOUS = 5
"""How many of the most suspicious test predictions the demo names."""


@dataclass
class DemoRow:
    """One line of the demo's table: what was scored, its test Dice, and how it was made."""

    what: str
    dice: float
    how: str = ""


@dataclass
class DemoResult:
    """The demo's rows (test Dice of members and ensembles), the recipe's held-out estimate and its gain on the
    test split, the verdict, warnings, seconds per step and the files written."""

    out: Path
    config: str = "full"
    rows: list[DemoRow] = field(default_factory=list)
    strategy: str = ""
    held_out: dict[str, float] = field(default_factory=dict)  # the recipe's gain over the plain mean on OOF
    test_gain: float = 0.0  # the recipe's test Dice minus the plain mean's
    verdict: str = ""
    warnings: list[str] = field(default_factory=list)
    calibration: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Per member: its calibration error (ECE, all classes' pixels) on the test maps, as stored and after an isotonic
    calibration fitted on its OOF maps."""
    qc: dict[str, Any] = field(default_factory=dict)
    """``ens qc`` with the recipe: its validation against the labels on OOF and on test (Spearman, recall at 5%),
    and the most suspicious test predictions (image, class, score, true Dice)."""
    seconds: dict[str, float] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)

    def dice(self, what: str) -> float:
        return next(row.dice for row in self.rows if row.what == what)


def holds(report) -> str:
    """What a recipe holds, in a few words: gated to the plain rule, or how many classes moved from it."""
    if report.gated:
        return "gated: the plain rule"
    moved = sum(result.level != "plain" for result in report.classes)
    calibrated = sum(result.level == "calibrated" for result in report.classes)
    return f"{moved} classes searched" + (f", {calibrated} calibrated" if calibrated else "")


class DemoProgress(Protocol):
    """Where the demo reports what it is doing (the CLI prints it; a notebook may ignore it)."""

    def step(self, number: int, total: int, name: str) -> None: ...

    def done(self, name: str, seconds: float) -> None: ...

    def note(self, text: str) -> None: ...


class _Silent:
    def step(self, number: int, total: int, name: str) -> None:
        pass

    def done(self, name: str, seconds: float) -> None:
        pass

    def note(self, text: str) -> None:
        pass


def run_demo(out: str | Path = "demo", quick: bool = False, device: str = "cpu",
             progress: DemoProgress | None = None) -> DemoResult:
    """Run every step into ``out`` (data/, folds.json, members/, stores/, recipes, CSVs, plots); the sizes are
    QUICK, FULL (a CPU) or CUDA (a GPU device), see ``segens.demo.config.config_for``. ``progress`` hears of each
    step."""
    progress = progress or _Silent()
    config = config_for(quick, device)
    out = Path(out)
    check_outputs([Output(out, "folder", "--out", resumable=True)])  # e.g. not inside a data root
    out.mkdir(parents=True, exist_ok=True)
    root, stores, folds_path = out / "data", out / "stores", out / "folds.json"
    result = DemoResult(out, config.name)
    specs = member_specs(config)
    networks = {name: encoder_of(spec) for name, spec in specs.items()}

    def step(number: int, action: Callable[[], Any]) -> Any:
        name = STEPS[number - 1]
        progress.step(number, len(STEPS), name)
        started = time.perf_counter()
        value = action()
        result.seconds[name] = time.perf_counter() - started
        progress.done(name, result.seconds[name])
        return value

    step(1, lambda: generate(root, config.train_patients, config.test_patients, size=config.image_size, seed=0,
                             progress=True, overwrite=True))
    step(2, lambda: save_folds(make_folds(root, k=config.k, seed=0)[0], folds_path))

    def train() -> None:
        for name, spec in specs.items():
            path = save_spec(spec, out / "members" / f"{name}.yaml")
            progress.note(f"training {name} ({networks[name]}) on {config.k} folds")
            train_member(path, root, folds_path, fold="all", device=device, jobs=config.jobs,
                         trust_pickle=True)  # resumes only the demo's own earlier run
    step(3, train)

    def predict() -> None:
        for name in specs:
            spec = out / "members" / f"{name}.yaml"
            for split, per_fold in (("oof", False), ("test", False), ("test", True)):
                predict_member(spec, split, root, stores / f"{name}.{split}.zarr", folds_path=folds_path,
                               overwrite=True, device=device, trust_pickle=True, per_fold=per_fold)  # our own
    step(4, predict)
    oof = [str(stores / f"{name}.oof.zarr") for name in specs]
    test = [str(stores / f"{name}.test.zarr") for name in specs]
    test_folds = [fold_store_path(path, fold) for path in test for fold in range(config.k)]

    def member_thresholds() -> None:
        for name, store in zip(specs, oof):  # each member alone: its per-class thresholds, from OOF only
            search_weights([store], root, folds_path, out / f"recipe_{name}.json", strategy="weighted", step=0.5,
                           postprocess=False, jobs=2, progress=False, overwrite=True)
    step(5, member_thresholds)
    report = step(6, lambda: search_weights(oof, root, folds_path, out / "recipe.json", strategy="auto",
                                            step=config.step, cv=True, jobs=2, overwrite=True, calibrate="isotonic"))

    held = {}

    def compared() -> None:
        for stem, (strategy, calibrate, _) in COMPARED.items():
            held[stem] = holds(search_weights(oof, root, folds_path, out / f"recipe_{stem}.json", strategy=strategy,
                                              step=config.step, cv=True, jobs=2, overwrite=True, calibrate=calibrate,
                                              progress=False))
    step(7, compared)
    result.strategy, result.verdict = report.strategy, report.verdict()
    found = report.comparisons()["recipe over mean"]
    result.held_out = {"gain": found.gain, "se": found.se}

    def combine_all() -> None:
        combine(test, out / "submission_plain_mean.csv", "soft", overwrite=True)  # a rerun replaces its own CSVs
        combine(test, out / "submission_majority.csv", "hard", overwrite=True)
        summary = combine(test, out / "submission.csv", recipe_path=out / "recipe.json", overwrite=True)
        combine(test_folds, out / "submission_per_fold.csv", recipe_path=out / "recipe.json", overwrite=True)
        for stem in COMPARED:
            combine(test, out / f"submission_{stem}.csv", recipe_path=out / f"recipe_{stem}.json", overwrite=True)
        result.warnings += [f"{member}'s test maps are not like its OOF maps in {len(classes)} class(es): "
                            f"{'; '.join(classes[:4])}{' ...' if len(classes) > 4 else ''}"
                            for member, classes in summary.shifted.items()]
        for name, store in zip(specs, test):
            combine([store], out / f"member_{name}.csv", "soft", overwrite=True)
            combine([store], out / f"member_{name}_searched.csv", recipe_path=out / f"recipe_{name}.json",
                    overwrite=True)
    step(8, combine_all)

    def evaluate() -> dict[str, list[float]]:
        per_class = {}
        scored = [(f"{name}, at 0.5", f"member_{name}.csv", networks[name]) for name in specs]
        scored += [(f"{name}, own thresholds", f"member_{name}_searched.csv", "searched on its OOF")
                   for name in specs]
        scored += [("plain mean of members, at 0.5", "submission_plain_mean.csv", "soft vote"),
                   ("majority vote, at 0.5", "submission_majority.csv", "hard vote"),
                   *((row, f"submission_{stem}.csv", held[stem]) for stem, (_, _, row) in COMPARED.items()),
                   (f"searched recipe ({report.strategy})", "submission.csv", "the folds' mean maps"),
                   (f"searched recipe ({report.strategy}), per fold", "submission_per_fold.csv",
                    "each fold's own maps")]
        for what, csv, how in scored:
            table = evaluate_submission(out / csv, root, "test")
            result.rows.append(DemoRow(what, table.mean(), how))
            if not what.endswith("own thresholds"):
                per_class[what.removesuffix(", at 0.5")] = table.per_class().tolist()
        result.test_gain = result.dice(f"searched recipe ({report.strategy})") - \
            result.dice("plain mean of members, at 0.5")
        return per_class
    per_class = step(9, evaluate)

    def calibration_error() -> None:
        from segens.ensemble.reliability import fitted_tables, level_counts, plot_reliability
        from segens.store import open_store

        before, after = {}, {}
        for name, oof_path, test_path in zip(specs, oof, test):
            fitted = fitted_tables(level_counts(open_store(oof_path), root))  # on OOF only
            before[name] = level_counts(open_store(test_path), root)
            after[name] = before[name].calibrated(fitted)
            result.calibration[name] = (before[name].pooled_ece(), after[name].pooled_ece())
        result.files["reliability"] = str(plot_reliability(before, out / "reliability.png", after))
    step(10, calibration_error)

    def quality_control() -> None:
        from segens.conventions.classes import CLASSES
        from segens.ensemble.qc import quality_control as judge

        result.qc["oof"] = judge(oof, out / "recipe.json", root, out / "qc_oof.csv", jobs=2, progress=False,
                                 overwrite=True).validation
        tested = judge(test, out / "recipe.json", root, out / "qc.csv", plot=out / "qc.png", jobs=2, progress=False,
                       overwrite=True)
        result.qc["test"] = tested.validation
        result.qc["suspicious"] = [{"image": row.image, "class": CLASSES[row.channel], "score": row.score,
                                    "dice": row.dice} for row in tested.ranked()[:SUSPICIOUS]]
        result.files["qc"] = str(out / "qc.csv")
        result.files["qc plot"] = str(out / "qc.png")
    step(11, quality_control)

    def pictures() -> None:
        from segens.conventions.dataset import discover
        from segens.ensemble.overlay import draw_overlay
        from segens.ensemble.plots import plot_dice_bars, plot_search_report

        result.files["dice plot"] = str(plot_dice_bars(per_class, out / "dice.png", "Test Dice per class"))
        result.files["search report"] = str(plot_search_report(report, out / "search_report.png"))
        result.files["submission"] = str(out / "submission.csv")
        result.files["recipe"] = str(out / "recipe.json")
        record = discover(root, "test").records[0]
        result.files["overlay"] = str(draw_overlay(record.key, root, [out / "submission.csv"], out / "overlay.png"))
    step(12, pictures)
    (out / "demo_result.json").write_text(json.dumps(
        {"config": result.config, "rows": [asdict(row) for row in result.rows], "strategy": result.strategy,
         "held_out": result.held_out, "test_gain": result.test_gain, "verdict": result.verdict,
         "warnings": result.warnings, "calibration": result.calibration, "qc": result.qc, "seconds": result.seconds,
         "files": result.files}, indent=1))
    return result
