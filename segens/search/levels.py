"""Cross-validation subsets and the no-loss rule: which level of a class's setting the held-out folds support.

Subsets are scored at once: 'all', then per fold 'train-f' (where a setting is chosen) and 'heldout-f' (where it
is scored). A class's levels go from the simplest, the plain rule, to the searched setting (each strategy lists
its own: segens.voting.base.Strategy.levels); ``choose_level`` keeps a more complex one only where the held-out
folds show it better by more than a standard error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL_NAMES = ("plain", "threshold", "searched")
"""Settings of a class from the simplest: the plain rule (equal weights at 0.5; hard: majority of votes at 0.5),
the equal weights at a searched threshold (weighted only), the searched setting with its post-processing."""


@dataclass
class Subsets:
    """Image subsets scored at once: 'all', then per fold 'train-f' (selection) and 'heldout-f' (scoring)."""

    names: list[str]
    masks: np.ndarray  # (S, images) bool

    @property
    def selecting(self) -> list[int]:
        return [i for i, name in enumerate(self.names) if not name.startswith("heldout")]

    def means(self, per_image: np.ndarray) -> np.ndarray:
        """(images, ...) -> (S, ...) means over each subset's images, summed in image order exactly as the
        competition's per-class mean (so scores equal a brute-force evaluation to the last bit)."""
        return np.stack([per_image[mask].mean(axis=0) for mask in self.masks])


def make_subsets(folds_of_images: Sequence[int] | None, images: int | None = None) -> Subsets:
    """'all' only (over ``images`` images when given), or with cross-validation subsets from each image's fold."""
    if folds_of_images is None:
        return Subsets(["all"], np.ones((1, images or 0), bool))
    folds = np.asarray(folds_of_images)
    names, masks = ["all"], [np.ones(folds.size, bool)]
    for fold in sorted(set(folds.tolist())):
        names += [f"train-{fold}", f"heldout-{fold}"]
        masks += [folds != fold, folds == fold]
    return Subsets(names, np.stack(masks))


def choose_level(held_out: dict[str, np.ndarray]) -> str:
    """The no-loss rule, decided on held-out folds only: start from the plain rule; a more complex level replaces
    the current one only if its per-fold held-out Dice beats the current one's by more than one standard error
    of the fold differences (and on average)."""
    current = "plain"
    for level in LEVEL_NAMES[1:]:
        if level not in held_out:
            continue
        differences = held_out[level] - held_out[current]
        spread = differences.std(ddof=1) / np.sqrt(differences.size) if differences.size > 1 else np.inf
        if differences.mean() > 0 and differences.mean() > spread:
            current = level
    return current
