"""Hard voting: each member votes where its p > its own per-class threshold; a vote counts the member's weight
(1 by default). A pixel is kept when its votes reach ``min_votes`` (>=), or without it when they are more than
half of the weight present (a strict majority: a tie at exactly half is dropped). The search finds per-member
thresholds by coordinate ascent for each vote count 1..M (unit votes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from segens.voting.base import HALF, Choice, Scorer, Settings, Strategy, best_cell
from segens.voting.registry import register
from segens.voting.rules import hard_keep

ROUNDS = 2
"""Passes of coordinate ascent over the members' thresholds per vote count."""


@register
class HardVote(Strategy):
    """Votes of members above their own thresholds, counted against ``min_votes`` or a strict majority."""

    name = "hard"
    description = "majority of members' votes"
    vote_weights = True

    def keep(self, values: Sequence[np.ndarray | None], settings: Settings, channel: int,
             present: np.ndarray) -> np.ndarray:
        min_votes = None if settings.min_votes is None else settings.min_votes[channel]
        return hard_keep(values, settings.weights[channel], settings.member_thresholds[channel], min_votes,
                         settings.weights[channel, present].astype(np.float64).sum())

    def search(self, scorer: Scorer, evidence_values: np.ndarray, step: float, method: str) -> dict[int, Choice]:
        """Per subset: for each vote count, coordinate ascent over member thresholds from 0.5; the best count wins."""
        members, thresholds = scorer.members, scorer.thresholds
        choices = {}
        for subset in scorer.selecting:
            best: Choice | None = None
            for votes in range(1, members + 1):
                indices = np.full(members, HALF)
                score = -1.0
                for _ in range(ROUNDS):
                    for member in range(members):
                        table = scorer.means(scorer.hard_per_image(thresholds[indices], member, votes))[subset]
                        _, index = best_cell(table[None])  # the current threshold is among those swept: never worse
                        indices[member], score = index, float(table[index])
                candidate = Choice(np.ones(members), HALF, indices.copy(), votes, score)
                if best is None or candidate.score > best.score:
                    best = candidate
            choices[subset] = best
        return choices

    def per_image(self, scorer: Scorer, evidence_values: np.ndarray, choice: Choice) -> np.ndarray:
        table = scorer.hard_per_image(scorer.thresholds[choice.member_thresholds], 0, choice.min_votes)
        return table[:, choice.member_thresholds[0]]

    def simple_levels(self, scorer: Scorer, evidence_values: np.ndarray) -> dict[str, dict[int, tuple[Choice, np.ndarray]]]:
        """'plain': combine's default, a strict majority of unit votes at 0.5."""
        members = scorer.members
        majority = members // 2 + 1
        plain = Choice(np.ones(members), HALF, np.full(members, HALF), majority)
        per_image = self.per_image(scorer, evidence_values, plain)
        means = scorer.means(per_image)
        return {"plain": {subset: (Choice(np.ones(members), HALF, np.full(members, HALF), majority,
                                          float(means[subset])), per_image) for subset in scorer.selecting}}

    def recipe_fields(self, choices: Sequence[Choice], thresholds: np.ndarray, members: int) -> dict[str, Any]:
        return {"weights": [[1.0] * members for _ in choices],
                "member_thresholds": [[float(thresholds[i]) for i in choice.member_thresholds] for choice in choices],
                "min_votes": [float(choice.min_votes) for choice in choices]}

    def report_columns(self, choice: Choice, thresholds: np.ndarray) -> dict[str, object]:
        return {"thresholds": " ".join(f"{thresholds[i]:.3f}" for i in choice.member_thresholds),
                "min_votes": choice.min_votes}
