"""bench/peers.py in its quick mode: nnU-Net's and MONAI's own ensembling against ens combine on the same maps
(real nnunetv2 and monai, real npz files, members imported as kind nnunet)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.peers import run, table


@pytest.mark.slow
def test_peers_agree_with_combine_outside_the_quantization_band(tmp_path: Path) -> None:
    result = run(tmp_path, images=10, repeats=1, rss_images=0, size=128, verbose=False)
    for peer, (differ, outside, band) in result["checks"].items():
        assert outside == 0, f"{peer}: {outside} pixels differ from combine away from 0.5"
        assert differ <= band
    assert result["checks"]["MONAI VoteEnsemble"][0] == 0  # member votes at 0.5 are the same on levels and floats
    assert result["disk"]["store"] * 10 < result["disk"]["npz float16"]
    assert len(table(result)) == 5
