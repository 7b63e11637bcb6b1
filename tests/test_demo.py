"""ens demo --quick (the whole workflow on tiny sizes) and ens selfcheck, through the real command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from segens.cli import app
from segens.submission import read_submission


@pytest.mark.slow
def test_quick_demo_runs_every_step(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["demo", "--quick", "--out", str(tmp_path / "demo")])
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "demo" / "demo_result.json").read_text())
    assert set(summary["member_dice"]) == {"unetpp-vgg19", "unetpp-hrnet", "yolov8-seg"}
    assert set(summary["strategy_dice"]) == {"soft", "weighted", "hard"}
    assert "cv_gain_over_mean" in summary["cv"]
    assert len(summary["seconds"]) == 8
    for name in ("submission_weighted.csv", "recipe.json", "dice.png", "search_report.png", "overlay.png"):
        assert (tmp_path / "demo" / name).stat().st_size > 0, name
    submission = read_submission(tmp_path / "demo" / "submission_weighted.csv")
    assert len(submission.rles) == 4  # 2 test patients, two hands each
    assert "time: total" in result.output


def test_selfcheck(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["selfcheck", "--out", str(tmp_path), "--size", "128"])
    assert result.exit_code == 0, result.output
    assert "self-check passed" in result.output
