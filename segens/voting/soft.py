"""Soft voting: the plain mean of the members' probabilities (equal weights) above a per-class threshold; the
search sweeps the threshold only."""

from __future__ import annotations

from segens.voting.mean import MeanVote
from segens.voting.registry import register


@register
class SoftVote(MeanVote):
    """mean_m p_m > threshold: every member weighs the same, whatever a recipe or --weights say."""

    name = "soft"
    description = "mean of members"
    equal_weights = True
