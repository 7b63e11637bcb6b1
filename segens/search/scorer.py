"""One class's exact scorer: what the search hands a voting strategy (segens.voting.base.Scorer) to score its
candidates on the class's OOF evidence, for every CV subset at once, weighted candidates cached."""

from __future__ import annotations

import numpy as np

from segens.conventions.dice import dice_from_counts
from segens.search.evidence import ClassEvidence
from segens.search.kernels import hard_dice, weighted_dice
from segens.search.levels import Subsets
from segens.voting.rules import normalise_weights


class ClassScorer:
    """Scores candidates on one class's evidence for every subset (weighted ones cached by their normalised
    weights; ``evaluations`` counts those computed). With ``tables`` (selecting subset -> (M, 256) uint8,
    segens.voting.calibration) a calibrated setting chosen on a subset votes on the levels calibrated on that
    subset's images only: held-out images never shape the map they are scored with."""

    def __init__(self, evidence: ClassEvidence, subsets: Subsets, thresholds: np.ndarray,
                 tables: dict[int, np.ndarray] | None = None) -> None:
        self.evidence, self.subsets, self.thresholds = evidence, subsets, thresholds
        self.tables = tables
        self.cache: dict[tuple, np.ndarray] = {}
        self.evaluations = 0

    @property
    def members(self) -> int:
        return self.evidence.members

    @property
    def selecting(self) -> list[int]:
        return self.subsets.selecting

    @property
    def calibrating(self) -> bool:
        return self.tables is not None

    def tables_of(self, calibration: int | None) -> np.ndarray | None:
        """(M, 256) uint8 tables fitted on subset ``calibration`` (None: the stored levels)."""
        return None if calibration is None else self.tables[calibration]

    def means(self, per_image: np.ndarray) -> np.ndarray:
        return self.subsets.means(per_image)

    def scores(self, weights: np.ndarray) -> np.ndarray:
        """(S, K) mean Dice of a raw weight vector on every subset (stored levels)."""
        key = tuple(normalise_weights(weights).tolist())
        if key not in self.cache:
            self.cache[key] = self.subsets.means(self.weighted_per_image(normalise_weights(weights)))
            self.evaluations += 1
        return self.cache[key]

    def weighted_per_image(self, weights: np.ndarray, calibration: int | None = None) -> np.ndarray:
        """(images, K) Dice of weighted voting with normalised float32 ``weights``, every threshold, on the stored
        levels or on those calibrated on subset ``calibration``."""
        return weighted_dice(self.evidence, weights, self.thresholds, self.tables_of(calibration))

    def hard_per_image(self, member_thresholds: np.ndarray, swept: int, votes: int) -> np.ndarray:
        """(images, K) Dice of hard voting (unit votes, kept at >= ``votes``), member ``swept``'s threshold swept."""
        return hard_dice(self.evidence, member_thresholds, swept, votes, self.thresholds)

    def kept_per_image(self, kept: np.ndarray) -> np.ndarray:
        """(images,) Dice of the ambiguous rows ``kept`` ((R,) bool) says, with each image's fixed pixels."""
        evidence = self.evidence
        weights = evidence.count * kept
        positives = np.bincount(evidence.image, weights=weights, minlength=evidence.images).astype(np.int64)
        true_positives = np.bincount(evidence.image, weights=weights * evidence.truth,
                                     minlength=evidence.images).astype(np.int64)
        return dice_from_counts(true_positives + evidence.fixed_true_positive, positives + evidence.fixed_positive,
                                evidence.truth_total)
