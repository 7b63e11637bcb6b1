"""Weighted voting: per class, weights normalised to sum to 1 and a threshold; keep a pixel when
sum_m w_m * p_m > threshold. The search tries the equal weights, each single member and a grid on the simplex
(coarse to fine), each with every threshold, then refines the best locally (or grows a Caruana bag)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segens.voting.base import Choice, Scorer
from segens.voting.mean import MeanVote, base_candidates, caruana, check_grid_size, choose, coarse_step, refine
from segens.voting.registry import register


@register
class WeightedVote(MeanVote):
    """Per-class weights and threshold: sum_m w_m * p_m > threshold."""

    name = "weighted"
    description = "per-class weights + thresholds"
    levels = ("plain", "threshold", "searched")

    def check_search(self, step: float, members: int) -> None:
        check_grid_size(step, members)

    def search(self, scorer: Scorer, evidence_values: np.ndarray, step: float, method: str) -> dict[int, Choice]:
        grid_step = coarse_step(scorer.members, step)
        candidates = base_candidates(scorer.members, grid_step)
        choices = {}
        for subset in scorer.selecting:
            choice = choose(scorer, candidates, subset)
            if scorer.members > 1:
                if method == "caruana":
                    greedy = caruana(scorer, subset)
                    choice = greedy if greedy.score > choice.score else choice
                choice = refine(scorer, choice, subset, step, grid_step)
            choices[subset] = choice
        return choices

    def recipe_fields(self, choices: Sequence[Choice], thresholds: np.ndarray, members: int) -> dict[str, Any]:
        return {"thresholds": [float(thresholds[choice.threshold]) for choice in choices],
                "weights": [[float(w) for w in choice.weights] for choice in choices]}
