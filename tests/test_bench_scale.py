"""bench/scale.py --quick: the benchmark of the users' workload runs end to end on a small fixture (16 + 8
images at 512, 3 members), with the real commands, and its figures are sane."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import scale
from bench.fixture import MEMBERS, member_dice


def test_scale_quick_runs_and_its_members_are_strong_and_diverse(tmp_path: Path) -> None:
    report = scale.main(["--quick", "--workdir", str(tmp_path), "--jobs", "1"])
    (timing,) = report["timing"]
    assert set(timing["searches"]) == {"soft", "weighted", "hard"}
    assert all(item["seconds"] > 0 and item["peak_rss_mb"] > 50 for item in timing["searches"].values())
    rows = {row["setting"].split(",")[0]: row for row in report["quality"][3]}
    for row in rows.values():
        assert all(0.9 < value <= 1 for value in row["oof"] + row["cv"] + row["test"])
    # a fixture member is imperfect and members differ; the plain mean beats the best of them on OOF
    data_folder = next(tmp_path.glob("scale-512-16-8-s0"))
    fixture = scale.fixture(tmp_path, 16, 8, 512, 3, 0, 1)
    assert fixture.folder == data_folder
    dice = member_dice(fixture)
    assert set(dice) == {member.name for member in MEMBERS[:3]}
    assert all(0.9 < value < 0.995 for value in dice.values()) and np.ptp(list(dice.values())) > 0.002
    assert rows["plain mean"]["oof"][0] > rows["best single member (chosen on OOF)"]["oof"][0]
