"""A toy voting strategy, the whole of it: keep a pixel where the most confident member's p > threshold (the union
of the members at that threshold). Import this module and ``--strategy max`` works in ``ens combine`` and
``ens search-weights`` (the search sweeps the threshold with the base class's generic, exact path).
tests/test_extending.py runs it."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segens.store import dequantize
from segens.voting import register
from segens.voting.base import Settings, Strategy


@register
class MaxVote(Strategy):
    name = "max"
    description = "most confident member"

    def keep(self, values: Sequence[np.ndarray | None], settings: Settings, channel: int,
             present: np.ndarray) -> np.ndarray:
        highest = np.maximum.reduce([dequantize(value) for value in values if value is not None])
        return highest > settings.thresholds[channel]
