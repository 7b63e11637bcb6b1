"""The decisions a search makes over all classes at once, on per-image held-out scores (each image scored by
settings chosen without its fold): the overall gate (the recipe is written only where its held-out gain over the
plain rule is reliably positive) and, for ``--strategy auto``, which strategy's recipe to write.

An image's score is the mean over classes of its per-class held-out Dice, so the comparisons are paired over the
same images, with a standard error that exists at any number of folds (segens.search.levels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from segens.search.class_search import ClassResult
from segens.search.levels import Z, paired_differences, reliably_better, standard_error
from segens.voting import names


def auto_candidates() -> list[str]:
    """``--strategy auto``'s candidates: every registered strategy, in the registry's order (segens.voting.names:
    the built-ins soft, weighted, hard from the simplest, then any strategy registered later). A later one replaces
    the current one only where it is reliably better on held-out images (``choose_strategy``)."""
    return list(names())


def image_scores(results: Sequence[ClassResult], column: str) -> np.ndarray:
    """(images,) the mean over classes of each image's held-out Dice in ``column`` ('recipe', 'plain', ...)."""
    return np.mean([np.asarray(result.held_out[column], np.float64) for result in results], axis=0)


@dataclass(frozen=True)
class Comparison:
    """A held-out comparison over images: the mean paired difference, its standard error, and whether it is
    reliably positive (more than ``Z`` standard errors)."""

    gain: float
    se: float
    reliable: bool

    @classmethod
    def of(cls, candidate: np.ndarray, baseline: np.ndarray, groups: Sequence[str] | None = None) -> Comparison:
        """The comparison of per-image scores, averaged per patient with ``groups``."""
        differences = paired_differences(candidate, baseline, groups)
        return cls(float(differences.mean()), standard_error(differences), reliably_better(candidate, baseline, groups))

    def text(self) -> str:
        return f"{self.gain:+.4f} ± {self.se:.4f}"


def gate(results: Sequence[ClassResult], groups: Sequence[str] | None = None) -> Comparison:
    """The recipe's held-out gain over the plain rule of its strategy, each image scored by the levels and
    settings chosen without its fold (the overall gate passes where it is reliable)."""
    return Comparison.of(image_scores(results, "recipe"), image_scores(results, "plain"), groups)


def choose_strategy(candidates: Mapping[str, Sequence[ClassResult]],
                    groups: Sequence[str] | None = None) -> tuple[str, str]:
    """(strategy, why): among the searched strategies' recipes (their own gates applied), in the order of
    ``candidates`` (``auto_candidates``: the registry's, from the simplest), a later one replaces the current one
    only where its per-image held-out Dice is reliably better."""
    order = list(candidates)
    current = order[0]
    reasons = []
    for name in order[1:]:
        versus = Comparison.of(image_scores(candidates[name], "recipe"), image_scores(candidates[current], "recipe"),
                               groups)
        if versus.reliable:
            reasons.append(f"{name} beats {current} by {versus.text()} on held-out images")
            current = name
        else:
            reasons.append(f"{name} does not reliably beat {current}: {versus.text()}, not over {Z:g} standard errors")
    return current, "; ".join(reasons)
