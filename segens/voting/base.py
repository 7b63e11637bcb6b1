"""What every voting strategy is: one object that ``ens combine``, the search's evidence and ``ens search-weights``
all use, so that a new strategy is one new class (registered in segens.voting.registry).

A strategy says
- how its per-class settings come from a recipe and the command line (``settings``),
- which pixels it keeps, from the members' stored uint8 values (``keep``, on combine's regions and on the
  search's evidence rows alike; the rules are in segens.voting.rules),
- how it searches a class on OOF evidence (``search``, ``per_image``, ``simple_levels``: the levels of the no-loss
  rule, from the simplest), through a ``Scorer`` that the search hands it (exact Dice of candidates on evidence),
- what its recipe stores and its report shows (``recipe_fields``, ``report_columns``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import numpy as np

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.errors import SegensError

HALF = 127
"""Index of threshold 0.5 among the 255 quantization midpoints (k + 0.5) / 255 the search sweeps."""


@dataclass
class Settings:
    """Resolved per-class settings of a combine, for the members in store order."""

    strategy: str
    weights: np.ndarray  # (29, M) float32: normalised per class for soft/weighted, raw vote weights for hard
    thresholds: np.ndarray  # (29,) float32, soft/weighted: keep p > threshold
    member_thresholds: np.ndarray  # (29, M) float32, hard: a member votes where p > its threshold
    min_votes: np.ndarray | None  # (29,) float64, hard: keep votes >= min_votes; None: votes > half the weight
    postprocess: list[list[str]] = field(default_factory=lambda: [[] for _ in CLASSES])
    tables: list[np.ndarray | None] | None = None
    """Per class, (M, 256) uint8 calibration tables (segens.voting.calibration) or None: the stored levels."""


@dataclass
class Choice:
    """One class's setting as the search chooses it: weights (raw, as the recipe stores them) and a threshold
    index into the swept thresholds, or hard voting's member threshold indices and vote count."""

    weights: np.ndarray  # (M,) float64
    threshold: int
    member_thresholds: np.ndarray | None = None  # (M,) int indices, hard only
    min_votes: int | None = None
    score: float = float("nan")  # mean Dice on the subset it was chosen on, before post-processing
    calibration: int | None = None  # the subset whose calibration tables it votes with; None: the stored levels

    def key(self) -> tuple:
        hard = None if self.member_thresholds is None else tuple(self.member_thresholds.tolist())
        return tuple(self.weights.tolist()), self.threshold, hard, self.min_votes, self.calibration


def best_cell(scores: np.ndarray) -> tuple[int, int]:
    """(candidate, threshold) of the maximum of (C, K) scores: first candidate, then threshold nearest 0.5."""
    best = scores.max()
    candidates, thresholds = np.nonzero(scores == best)
    first = candidates.min()
    options = thresholds[candidates == first]
    return int(first), int(options[np.argmin(np.abs(options - HALF))])


class Scorer(Protocol):
    """What the search offers a strategy for one class (segens.search.scorer.ClassScorer): exact per-image Dice
    of candidates on the class's OOF evidence, for every threshold, and means over image subsets."""

    members: int
    thresholds: np.ndarray  # (K,) float32, sorted
    selecting: list[int]  # the subsets a setting is chosen on ('all', then each fold's training folds)
    calibrating: bool  # whether calibration tables were fitted (one set per selecting subset)

    def tables_of(self, calibration: int | None) -> np.ndarray | None:
        """(M, 256) uint8 tables fitted on subset ``calibration`` (None: the stored levels)."""

    def scores(self, weights: np.ndarray) -> np.ndarray:
        """(S, K) mean Dice over each subset of weighted voting with raw ``weights`` (cached; stored levels)."""

    def weighted_per_image(self, weights: np.ndarray, calibration: int | None = None) -> np.ndarray:
        """(images, K) Dice of weighted voting with normalised float32 ``weights`` (on a calibration's levels)."""

    def hard_per_image(self, member_thresholds: np.ndarray, swept: int, votes: int) -> np.ndarray:
        """(images, K) Dice of hard voting (unit votes, >= ``votes``), member ``swept``'s threshold swept."""

    def kept_per_image(self, kept: np.ndarray) -> np.ndarray:
        """(images,) Dice of the evidence rows ``kept`` ((R,) bool) says."""

    def means(self, per_image: np.ndarray) -> np.ndarray:
        """(images, ...) -> (S, ...) means over each subset's images."""


class Strategy(ABC):
    """A voting strategy. Subclasses set ``name`` and implement ``keep``; the search side has a generic default
    (the threshold swept with equal weights, scored row by row) that the built-in strategies replace with exact
    fast kernels."""

    name: ClassVar[str]
    description: ClassVar[str] = ""
    levels: ClassVar[tuple[str, ...]] = ("plain", "searched")
    """The no-loss rule's levels, from the simplest (see segens.search.levels)."""
    vote_weights: ClassVar[bool] = False
    """True: weights count as votes (raw, float32), not as a normalised mean."""
    equal_weights: ClassVar[bool] = False
    """True: every member weighs the same, whatever a recipe or --weights say."""
    calibrates: ClassVar[bool] = False
    """True: its votes change with calibrated levels (a mean does; a vote at a member's own searched threshold
    does not, a calibration being monotone), so the search offers the 'calibrated' level."""

    def ladder(self, calibrating: bool) -> tuple[str, ...]:
        """The no-loss rule's levels of a search, from the simplest: ``levels``, then 'calibrated' when the search
        calibrates a strategy whose votes it changes (calibration is kept only where it beats the best of the
        others on held-out images)."""
        return (*self.levels, "calibrated") if calibrating and self.calibrates else self.levels

    def calibrated(self, scorer: Scorer) -> dict[int, Choice]:
        """The calibrated level's setting chosen on each selecting subset (strategies that ``calibrates``)."""
        raise NotImplementedError(f"strategy {self.name} does not vote on calibrated levels")

    # ---- combine --------------------------------------------------------------------------------------------

    def settings(self, members: Sequence[str], recipe: Any = None, weights: dict[str, float] | None = None,
                 threshold: float | None = None, min_votes: float | None = None,
                 recipe_where: str = "the recipe") -> Settings:
        """Per-class settings from the command line and (if given) a recipe whose members are ``members``.

        Weights must be finite, >= 0, with a positive finite total per class; thresholds finite in [0, 1) (also
        after rounding to float32, the type they are compared in); min_votes finite and > 0. Command-line values
        override the recipe's; errors name the option (or ``recipe_where``) and the class.
        """
        from segens.voting.recipe import check_class_weights
        from segens.voting.rules import normalise_weights

        count = len(members)
        raw, weights_from = np.ones((NUM_CLASSES, count)), "weights"
        if recipe is not None and recipe.weights is not None:
            order = [recipe.member_names.index(name) for name in members]
            raw, weights_from = np.asarray(recipe.weights, dtype=np.float64)[:, order], f"{recipe_where}: weights"
        if weights is not None:
            unknown = sorted(set(weights) - set(members))
            if unknown or set(weights) != set(members):
                raise SegensError(f"--weights names {', '.join(sorted(weights))}; the stores' members are "
                                  f"{', '.join(members)}: give one weight per member")
            raw = np.tile([weights[name] for name in members], (NUM_CLASSES, 1)).astype(np.float64)
            weights_from = "--weights"
        if self.equal_weights:
            raw = np.ones((NUM_CLASSES, count))
        check_class_weights(raw, self.vote_weights, weights_from.removesuffix(": weights"))
        thresholds, thresholds_from = np.full(NUM_CLASSES, 0.5), "thresholds"
        if recipe is not None and recipe.thresholds is not None:
            thresholds = np.asarray(recipe.thresholds, dtype=np.float64)
            thresholds_from = f"{recipe_where}: thresholds"
        member_thresholds = np.full((NUM_CLASSES, count), 0.5)
        if recipe is not None and recipe.member_thresholds is not None:
            member_thresholds = np.asarray(recipe.member_thresholds, dtype=np.float64)[
                :, [recipe.member_names.index(n) for n in members]]
        if threshold is not None:
            check_thresholds(np.full(NUM_CLASSES, threshold, dtype=np.float64), "--threshold")
            thresholds = np.full(NUM_CLASSES, threshold)
            member_thresholds = np.full((NUM_CLASSES, count), threshold)
        check_thresholds(thresholds, thresholds_from)
        check_thresholds(member_thresholds, f"{recipe_where}: member_thresholds")
        votes = None
        if min_votes is not None:
            if not (np.isfinite(min_votes) and min_votes > 0):
                raise SegensError(f"--min-votes must be a finite number > 0, got {min_votes}")
            votes = np.full(NUM_CLASSES, float(min_votes))
        elif recipe is not None and recipe.min_votes is not None:
            votes = np.asarray(recipe.min_votes, dtype=np.float64)
            bad = ~(np.isfinite(votes) & (votes > 0))
            if bad.any():
                raise SegensError(f"{recipe_where}: min_votes of class {CLASSES[int(np.argmax(bad))]} must be a "
                                  f"finite number > 0, got {votes[bad][0]}")
        final = raw.astype(np.float32) if self.vote_weights else normalise_weights(raw)
        postprocess = recipe.postprocess if recipe is not None else [[] for _ in CLASSES]
        tables = None
        if recipe is not None and recipe.calibration is not None and self.calibrates:
            tables = [recipe.class_tables(list(members), channel) for channel in range(NUM_CLASSES)]
        return Settings(self.name, final, thresholds.astype(np.float32), member_thresholds.astype(np.float32), votes,
                        postprocess, tables)

    @abstractmethod
    def keep(self, values: Sequence[np.ndarray | None], settings: Settings, channel: int,
             present: np.ndarray) -> np.ndarray:
        """The kept pixels of one class: ``values`` holds each member's uint8 values (any shape, the same for all;
        None where the member has none there), ``present`` (M,) bool says which members this image has."""

    # ---- search ---------------------------------------------------------------------------------------------

    def check_search(self, step: float, members: int) -> None:
        """A SegensError, before any work, for search settings this strategy cannot use."""

    def kept_rows(self, values: np.ndarray, choice: Choice, thresholds: np.ndarray,
                  tables: np.ndarray | None = None) -> np.ndarray:
        """(R,) bool: the evidence rows ((M, R) uint8 values) that ``choice`` keeps, as combine keeps pixels (with
        ``tables``: the choice's calibration tables, (M, 256) uint8)."""
        return self.keep(list(values), self.choice_settings(choice, thresholds, values.shape[0], tables), 0,
                         np.ones(values.shape[0], bool))

    def choice_settings(self, choice: Choice, thresholds: np.ndarray, members: int,
                        tables: np.ndarray | None = None) -> Settings:
        """Settings (class 0 set) that apply ``choice`` the way combine applies a recipe of it."""
        from segens.voting.rules import normalise_weights

        weights = np.ones((NUM_CLASSES, members), np.float32)
        weights[0] = np.ones(members, np.float32) if self.vote_weights else normalise_weights(choice.weights)
        chosen = np.full(NUM_CLASSES, 0.5, np.float32)
        chosen[0] = thresholds[choice.threshold]
        member = np.full((NUM_CLASSES, members), 0.5, np.float32)
        if choice.member_thresholds is not None:
            member[0] = thresholds[choice.member_thresholds]
        votes = None if choice.min_votes is None else np.full(NUM_CLASSES, float(choice.min_votes))
        calibration = None if tables is None else [tables] + [None] * (NUM_CLASSES - 1)
        return Settings(self.name, weights, chosen, member, votes, tables=calibration)

    def search(self, scorer: Scorer, evidence_values: np.ndarray, step: float, method: str) -> dict[int, Choice]:
        """The setting chosen on each selecting subset. Default: equal weights, the threshold swept."""
        table = self._threshold_table(scorer, evidence_values)
        choices = {}
        for subset in scorer.selecting:
            _, index = best_cell(table[subset][None])
            choices[subset] = Choice(np.ones(scorer.members), index, score=float(table[subset, index]))
        return choices

    def per_image(self, scorer: Scorer, evidence_values: np.ndarray, choice: Choice) -> np.ndarray:
        """(images,) Dice of a choice without post-processing. Default: its kept rows, scored."""
        return scorer.kept_per_image(self.kept_rows(evidence_values, choice, scorer.thresholds))

    def simple_levels(self, scorer: Scorer, evidence_values: np.ndarray) -> dict[str, dict[int, tuple[Choice, np.ndarray]]]:
        """The levels below 'searched', per selecting subset: (choice, per-image Dice without post-processing).
        Default: 'plain', equal weights at 0.5."""
        plain = Choice(np.ones(scorer.members), HALF)
        per_image = self.per_image(scorer, evidence_values, plain)
        means = scorer.means(per_image)
        return {"plain": {subset: (Choice(plain.weights, HALF, score=float(means[subset])), per_image)
                          for subset in scorer.selecting}}

    def _threshold_table(self, scorer: Scorer, evidence_values: np.ndarray) -> np.ndarray:
        """(S, K) mean Dice of equal weights at every threshold, row by row (the generic, slow path)."""
        columns = [scorer.means(self.per_image(scorer, evidence_values, Choice(np.ones(scorer.members), k)))
                   for k in range(scorer.thresholds.size)]
        return np.stack(columns, axis=1)

    # ---- recipe and report -----------------------------------------------------------------------------------

    def recipe_fields(self, choices: Sequence[Choice], thresholds: np.ndarray, members: int) -> dict[str, Any]:
        """The recipe's per-class fields (weights, thresholds, member_thresholds, min_votes) of one choice per
        class. Default: per-class thresholds."""
        return {"thresholds": [float(thresholds[choice.threshold]) for choice in choices]}

    def report_columns(self, choice: Choice, thresholds: np.ndarray) -> dict[str, object]:
        """The search report's columns describing one class's choice. Default: its threshold."""
        return {"threshold": round(float(thresholds[choice.threshold]), 4)}


def check_thresholds(values: np.ndarray, where: str) -> None:
    """Thresholds (per class, or (class, member)) finite in [0, 1), also once rounded to float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = values.astype(np.float32)
        bad = ~((values >= 0) & (values < 1) & (rounded < 1))
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise SegensError(f"{where}: threshold {values[index]} (class {CLASSES[index[0]]}) must be a finite number in "
                          "[0, 1): a pixel is kept when p > threshold")
