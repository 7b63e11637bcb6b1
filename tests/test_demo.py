"""ens demo --quick (the whole workflow on tiny sizes) and ens selfcheck, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
from conftest import flat
from typer.testing import CliRunner

from segens.cli import app
from segens.conventions.classes import CLASSES
from segens.conventions.dataset import discover
from segens.conventions.submission import read_submission
from segens.demo.run import COMPARED, STEPS
from segens.reference import reference_combine, reference_decode, reference_dice


def _reference_test_dice(csv: Path, root: Path) -> float:
    """Mean over classes of the mean over test images of Dice, from the CSV and the label files alone."""
    rows = {(name, cls): rle for name, cls, rle in pd.read_csv(csv, keep_default_na=False).itertuples(index=False)}
    scores = []
    for record in discover(root, "test").records:
        document = json.loads(record.label_path.read_text())
        height, width = cv2.imread(str(record.image_path), cv2.IMREAD_UNCHANGED).shape[:2]
        truth = np.zeros((len(CLASSES), height, width), np.uint8)
        for annotation in document["annotations"]:
            points = np.rint(np.asarray(annotation["points"], np.float64)).astype(np.int32).reshape(-1, 1, 2)
            cv2.fillPoly(truth[CLASSES.index(annotation["label"])], [points], 1)
        pred = np.stack([reference_decode(rows[(record.name, cls)], height, width) for cls in CLASSES])
        scores.append(reference_dice(pred, truth))
    return float(np.mean(np.mean(scores, axis=0)))


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(out)], terminal_width=80)
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "demo_result.json").read_text())
    assert summary["config"] == "quick" and list(summary["seconds"]) == list(STEPS)
    members = ["unetpp-mobilenetv2", "unetpp-mobilenetv3", "yolov8n-seg"]
    rows = {row["what"]: row for row in summary["rows"]}
    assert rows["unetpp-mobilenetv2, at 0.5"]["how"] == "UNet++ mobilenet_v2"
    root = out / "data"
    # every Dice in the summary is what an independent scorer finds in the CSV the demo wrote
    strategy = summary["strategy"]
    files = {f"{name}, at 0.5": f"member_{name}.csv" for name in members}
    files |= {f"{name}, own thresholds": f"member_{name}_searched.csv" for name in members}
    files |= {"plain mean of members, at 0.5": "submission_plain_mean.csv", "majority vote, at 0.5":
              "submission_majority.csv", f"searched recipe ({strategy})": "submission.csv",
              f"searched recipe ({strategy}), per fold": "submission_per_fold.csv"}
    files |= {row: f"submission_{stem}.csv" for stem, (_, _, row) in COMPARED.items()}
    assert set(rows) == set(files)
    for what, csv in files.items():
        assert rows[what]["dice"] == pytest.approx(_reference_test_dice(out / csv, root), abs=1e-9), what
    for name in members:
        member_recipe = json.loads((out / f"recipe_{name}.json").read_text())  # searched on OOF, one member
        assert [member["name"] for member in member_recipe["members"]] == [name]
    assert summary["test_gain"] == pytest.approx(rows[f"searched recipe ({strategy})"]["dice"]
                                                 - rows["plain mean of members, at 0.5"]["dice"], abs=1e-12)
    # the recipe's submission is the recipe applied by the straightforward pipeline, weights normalised here
    recipe = json.loads((out / "recipe.json").read_text())
    assert recipe["strategy"] == strategy and recipe["search"]["strategy"] == "auto"
    assert recipe["search"]["calibrate"] == "isotonic"
    assert [member["name"] for member in recipe["members"]] == members
    if strategy != "hard":
        raw = np.asarray(recipe["weights"] or np.ones((len(CLASSES), 3)), np.float64)
        stores = [out / "stores" / f"{name}.test.zarr" for name in members]
        tables = None
        if recipe.get("calibration"):  # each member's class table, or its stored levels
            tables = np.stack([[np.arange(256) if (rows := recipe["calibration"]["tables"][name])[c] is None
                                else rows[c] for name in members] for c in range(len(CLASSES))]).astype(np.uint8)
        reference_combine(stores, (raw / raw.sum(axis=1, keepdims=True)).astype(np.float32),
                          np.asarray(recipe["thresholds"], np.float32), tmp_path / "reference.csv", tables)
        submission, reference = read_submission(out / "submission.csv"), read_submission(tmp_path / "reference.csv")
        plain = [c for c, steps in enumerate(recipe["postprocess"]) if not steps]  # the reference has no post-processing
        assert plain
        for name, rles in submission.rles.items():
            assert [rles[c] for c in plain] == [reference.rles[name][c] for c in plain], name
    assert len(read_submission(out / "submission.csv").rles) == 4  # 2 test patients, two hands each
    assert summary["verdict"] == recipe["oof_dice"]["verdict"]
    assert set(summary["calibration"]) == set(members)
    assert all(0 <= value <= 1 for pair in summary["calibration"].values() for value in pair)
    assert len(summary["qc"]["suspicious"]) == 5 and set(summary["qc"]) == {"oof", "test", "suspicious"}
    assert "most suspicious test predictions" in flat(result.output)
    for name in ("dice.png", "search_report.png", "overlay.png", "reliability.png", "qc.png"):
        picture = cv2.imread(str(out / name))
        assert picture is not None and picture.shape[0] > 500 and len(np.unique(picture.reshape(-1, 3), axis=0)) > 20, name
    assert "time: total" in flat(result.output) and "recipe - plain mean, held out" in flat(result.output)
    assert max(len(line) for line in result.output.splitlines() if "│" in line or "┃" in line) <= 80


def test_selfcheck(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["selfcheck", "--out", str(tmp_path), "--size", "128"])
    assert result.exit_code == 0, result.output
    assert "self-check passed" in flat(result.output)


def test_demo_configurations_are_valid_member_specs(tmp_path: Path) -> None:
    from segens.demo.config import CUDA, FULL, QUICK, config_for, member_specs
    from segens.members.registry import factory
    from segens.members.spec import load_spec, save_spec

    assert config_for(True, "cuda") is QUICK and config_for(False, "cpu") is FULL
    assert config_for(False, "cuda") is config_for(False, "cuda:1") is CUDA
    full, cuda = (member_specs(config) for config in (FULL, CUDA))
    smp_full, smp_cuda = ([spec for spec in specs.values() if spec.kind == "smp"] for specs in (full, cuda))
    assert CUDA.image_size > FULL.image_size
    assert min(spec.input.size[0] for spec in smp_cuda) > max(spec.input.size[0] for spec in smp_full)
    assert min(spec.train["steps"] for spec in smp_cuda) > max(spec.train["steps"] for spec in smp_full)
    for config in (QUICK, FULL, CUDA):
        for name, spec in member_specs(config).items():
            path = save_spec(spec, tmp_path / f"{config.name}-{name}.yaml")
            factory(spec.kind)(load_spec(path))  # every field checked as train-member checks it
