"""Voting on a weighted mean of the members' probabilities (soft and weighted voting): the kept-pixel rule
sum_m w_m * p_m > threshold, its exact scores, and the weight search (the equal weights, each single member and a
grid on the simplex, coarse to fine, each with every threshold; then a local refinement, or a Caruana bag)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from segens.errors import SegensError
from segens.voting import calibration
from segens.voting.base import HALF, Choice, Scorer, Settings, Strategy, best_cell
from segens.voting.rules import normalise_weights, weighted_keep

MAX_COARSE_CANDIDATES = 300
"""Above this many grid candidates the grid is searched at a doubled step first (coarse to fine): 5 members at
step 0.1 make 1001, at 0.2 only 126; the refinement then moves weight by 0.1, 0.05, 0.025."""
MAX_GRID_CANDIDATES = 50_000
MIN_STEP = 0.001
"""The finest weight step: finer grids than 1/1000 change no 8-bit vote, and bound the candidate count."""
"""Weight-grid candidates per class a search may score (step 0.1 with 3 members: 66; 0.02 with 4: 23,426)."""


def coarse_step(members: int, step: float) -> float:
    """The grid's step: ``step``, doubled while the simplex grid has more than MAX_COARSE_CANDIDATES points."""
    while math.comb(max(1, int(round(1 / step))) + members - 1, members - 1) > MAX_COARSE_CANDIDATES and step < 0.5:
        step *= 2
    return step


def check_grid_size(step: float, members: int) -> int:
    """The number of weight-grid candidates of ``step`` for ``members`` members, refused (a SegensError) when
    above MAX_GRID_CANDIDATES, before any work."""
    if not MIN_STEP <= step <= 0.5:  # NaN fails too; bounded before the count is computed
        raise SegensError(f"--step must be a number in [{MIN_STEP}, 0.5], got {step}")
    parts = max(1, int(round(1 / step)))
    count = math.comb(parts + members - 1, members - 1)
    if count > MAX_GRID_CANDIDATES:
        raise SegensError(f"--step {step} with {members} members makes {count:,} weight candidates per class (at most "
                          f"{MAX_GRID_CANDIDATES:,}); use a larger --step")
    return count


def base_candidates(members: int, step: float, strategy: str = "weighted") -> np.ndarray:
    """Equal weights, each single member, then the simplex grid; duplicates removed; (C, M) float64. ``soft``
    (or one member): the equal weights only."""
    equal = np.full((1, members), 1.0 / members)
    if strategy == "soft" or members == 1:
        return equal
    parts = max(1, int(round(1 / step)))
    grid = [combo for combo in itertools.product(range(parts + 1), repeat=members - 1) if sum(combo) <= parts]
    grid_weights = np.array([[*combo, parts - sum(combo)] for combo in grid], dtype=np.float64) / parts
    rows = np.concatenate([equal, np.eye(members), grid_weights])
    _, first = np.unique(normalise_weights(rows), axis=0, return_index=True)
    return rows[np.sort(first)]


def choose(scorer: Scorer, candidates: np.ndarray, subset: int) -> Choice:
    """The best (candidate, threshold) on ``subset`` (ties: the earlier candidate, then the threshold nearest 0.5)."""
    table = np.stack([scorer.scores(w)[subset] for w in candidates])
    index, threshold = best_cell(table)
    return Choice(candidates[index], threshold, score=float(table[index, threshold]))


def refine(scorer: Scorer, choice: Choice, subset: int, step: float, start: float | None = None) -> Choice:
    """Move mass between pairs of members by start/2, start/4, ... down to step/4 (``start``: the grid's step,
    default ``step``), each while the subset's score rises."""
    members = choice.weights.size
    deltas = [(start or step) / 2 ** k for k in range(1, 12) if (start or step) / 2 ** k >= step / 4 - 1e-12]
    for delta in deltas:
        improved = True
        while improved:
            improved = False
            moves = []
            for i, j in itertools.permutations(range(members), 2):
                moved = choice.weights.copy()
                moved[i] += delta
                moved[j] -= delta
                if moved[j] >= -1e-12:
                    moves.append(np.clip(moved, 0, None))
            if not moves:
                break
            best = choose(scorer, np.array(moves), subset)
            if best.score > choice.score:
                choice, improved = best, True
    return choice


def caruana(scorer: Scorer, subset: int, start: int = 3, rounds: int = 25) -> Choice:
    """Greedy forward selection with replacement (Caruana et al. 2004), from the ``start`` best single members."""
    members = scorer.members
    singles = [scorer.scores(row)[subset].max() for row in np.eye(members)]
    counts = np.zeros(members)
    counts[np.argsort(singles)[::-1][:start]] = 1
    choice = choose(scorer, counts[None], subset)
    for _ in range(rounds):
        trials = np.array([counts + np.eye(members)[m] for m in range(members)])
        best = choose(scorer, trials, subset)
        if best.score <= choice.score:
            break
        choice, counts = best, best.weights
    return Choice(choice.weights / choice.weights.sum(), choice.threshold, score=choice.score)


class MeanVote(Strategy):
    """sum_m w_m * p_m > threshold, weights normalised per class. Subclasses say which weights are searched."""

    calibrates = True

    def keep(self, values: Sequence[np.ndarray | None], settings: Settings, channel: int,
             present: np.ndarray) -> np.ndarray:
        weights = settings.weights[channel]
        if not present.all():  # the members present share the weight
            kept = np.where(present, weights.astype(np.float64), 0.0)
            weights = (kept / kept.sum()).astype(np.float32)
        tables = None if settings.tables is None else settings.tables[channel]
        if tables is not None:  # each member's calibrated levels, voted on exactly as stored ones
            values = [calibration.apply(value, table) for value, table in zip(values, tables)]
        return weighted_keep(values, weights, settings.thresholds[channel])

    def search(self, scorer: Scorer, evidence_values: np.ndarray, step: float, method: str) -> dict[int, Choice]:
        """The equal weights with the threshold chosen on each subset."""
        candidates = base_candidates(scorer.members, step, "soft")
        return {subset: choose(scorer, candidates, subset) for subset in scorer.selecting}

    def per_image(self, scorer: Scorer, evidence_values: np.ndarray, choice: Choice) -> np.ndarray:
        return scorer.weighted_per_image(normalise_weights(choice.weights), choice.calibration)[:, choice.threshold]

    def simple_levels(self, scorer: Scorer, evidence_values: np.ndarray) -> dict[str, dict[int, tuple[Choice, np.ndarray]]]:
        """'plain' (equal weights at 0.5) and, where it is one of the levels, 'threshold' (equal weights at the
        best threshold)."""
        equal = np.full(scorer.members, 1.0 / scorer.members)
        table = scorer.weighted_per_image(normalise_weights(equal))  # (images, K)
        means = scorer.means(table)  # (S, K)
        levels: dict[str, dict[int, tuple[Choice, np.ndarray]]] = {
            "plain": {subset: (Choice(equal, HALF, score=float(means[subset, HALF])), table[:, HALF])
                      for subset in scorer.selecting}}
        if "threshold" in self.levels:
            levels["threshold"] = {}
            for subset in scorer.selecting:
                _, index = best_cell(means[subset][None])
                levels["threshold"][subset] = (Choice(equal, index, score=float(means[subset, index])),
                                               table[:, index])
        return levels

    def calibrated(self, scorer: Scorer) -> dict[int, Choice]:
        """Per selecting subset: the equal weights on the levels calibrated on that subset, at its best threshold
        (a mean of calibrated members, which weights cannot replace: they can silence a member, not use it)."""
        equal = normalise_weights(np.full(scorer.members, 1.0 / scorer.members))
        choices = {}
        for subset in scorer.selecting:
            means = scorer.means(scorer.weighted_per_image(equal, subset))[subset]
            _, index = best_cell(means[None])
            choices[subset] = Choice(np.full(scorer.members, 1.0 / scorer.members), index, score=float(means[index]),
                                     calibration=subset)
        return choices

    def report_columns(self, choice: Choice, thresholds: np.ndarray) -> dict[str, object]:
        weights = choice.weights / choice.weights.sum()
        return {"weights": " ".join(f"{w:.3f}" for w in weights),
                "threshold": round(float(thresholds[choice.threshold]), 4)}
