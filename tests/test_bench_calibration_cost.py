"""bench/calibration_cost.py in its quick mode: the parts of a calibrated search timed on a real fixture (real
stores, the search's own functions), one row per class."""

from __future__ import annotations

from pathlib import Path

from bench.calibration_cost import main
from segens.search.levels import LEVEL_NAMES


def test_calibration_cost_times_every_part_of_each_class(tmp_path: Path) -> None:
    report = main(["--quick", "--workdir", str(tmp_path), "--jobs", "1"])
    assert [row["class"] for row in report["classes"]] == ["finger-4", "Capitate"]
    for row in report["classes"]:
        assert row["rows"] > 0 and row["subsets"] > 5  # all images, 5 training sets and the inner ones
        assert row["level"] in LEVEL_NAMES
        assert min(row["search_s"], row["fit_s"], row["calibrated_search_s"]) > 0
    assert report["totals"]["fit_s"] == sum(row["fit_s"] for row in report["classes"])
