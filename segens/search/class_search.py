"""``ens search-weights``: per-class weights, thresholds and post-processing fitted on out-of-fold stores, with
a cross-validated estimate of the gain.

Per class (classes are independent: the score is a mean over classes):
- ``weighted``: candidates are the equal weights, each single member, and a grid on the simplex (``step``,
  doubled while the grid has more than 300 points: coarse to fine), every one with the 255 quantization-midpoint
  thresholds; then a local refinement around the best (moves between two members of half the grid's step,
  halved again down to step/4). ``method="caruana"`` (for many members) instead grows a bag of
  members greedily with replacement (Caruana et al. 2004) from the best few.
- ``soft``: equal weights, the threshold only. ``hard``: unit votes; per-member thresholds by coordinate
  ascent for each vote count 1..M.
- post-processing (largest component, hole filling) is kept only where it raises the class's Dice.
Candidates are scored exactly on compact evidence (segens.search.evidence). Ties go to the earlier
candidate (equal weights first) and the threshold nearest 0.5. With ``cv`` the whole procedure is repeated
with each fold's images held out and scored on them, against the plain mean and the best single member
(each at 0.5, the best member chosen on the training folds), and the recipe of each class falls back to a
simpler level (equal weights at a searched threshold, or the plain rule) unless the held-out folds show the more
complex one better by more than a standard error (``choose_level``): no loss from searching where members are
strong and the gain is within the noise. The recipe's held-out Dice on a fold is that of the level the rule
chooses on the other folds, so the estimate covers the rule too.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segens.conventions.dice import dice_from_counts
from segens.ensemble.combine import normalise_weights
from segens.search.evidence import ClassEvidence, hard_dice, hard_kept, image_masks, weighted_dice, weighted_kept
from segens.ensemble.morphology import apply_postprocessing

VARIANTS = ([], ["largest_component"], ["fill_holes"], ["largest_component", "fill_holes"])
HALF = 127  # index of threshold 0.5 among the 255 midpoints


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


def make_subsets(folds_of_images: Sequence[int] | None) -> Subsets:
    """'all' only, or with cross-validation subsets from each image's fold."""
    if folds_of_images is None:
        return Subsets(["all"], np.ones((1, 0), bool))
    folds = np.asarray(folds_of_images)
    names, masks = ["all"], [np.ones(folds.size, bool)]
    for fold in sorted(set(folds.tolist())):
        names += [f"train-{fold}", f"heldout-{fold}"]
        masks += [folds != fold, folds == fold]
    return Subsets(names, np.stack(masks))


@dataclass
class Choice:
    """A candidate chosen on one subset: weights (raw, as the recipe stores them) and threshold index, or
    hard-voting member threshold indices and vote count."""

    weights: np.ndarray  # (M,) float64
    threshold: int
    member_thresholds: np.ndarray | None = None  # (M,) int indices, hard only
    min_votes: int | None = None
    score: float = float("nan")  # mean Dice on the subset it was chosen on, before post-processing

    def key(self) -> tuple:
        hard = None if self.member_thresholds is None else tuple(self.member_thresholds.tolist())
        return tuple(self.weights.tolist()), self.threshold, hard, self.min_votes


def _best(scores: np.ndarray) -> tuple[int, int]:
    """(candidate, threshold) of the maximum of (C, K) scores: first candidate, then threshold nearest 0.5."""
    best = scores.max()
    candidates, thresholds = np.nonzero(scores == best)
    first = candidates.min()
    options = thresholds[candidates == first]
    return int(first), int(options[np.argmin(np.abs(options - HALF))])


MAX_COARSE_CANDIDATES = 300
"""Above this many grid candidates the grid is searched at a doubled step first (coarse to fine): 5 members at
step 0.1 make 1001, at 0.2 only 126; the refinement then moves weight by 0.1, 0.05, 0.025."""


def coarse_step(members: int, step: float) -> float:
    """The grid's step: ``step``, doubled while the simplex grid has more than MAX_COARSE_CANDIDATES points."""
    while math.comb(max(1, int(round(1 / step))) + members - 1, members - 1) > MAX_COARSE_CANDIDATES and step < 0.5:
        step *= 2
    return step


def base_candidates(members: int, step: float, strategy: str) -> np.ndarray:
    """Equal weights, each single member, then the simplex grid; duplicates removed; (C, M) float64."""
    equal = np.full((1, members), 1.0 / members)
    if strategy == "soft" or members == 1:
        return equal
    parts = max(1, int(round(1 / step)))
    grid = [combo for combo in itertools.product(range(parts + 1), repeat=members - 1) if sum(combo) <= parts]
    grid_weights = np.array([[*combo, parts - sum(combo)] for combo in grid], dtype=np.float64) / parts
    rows = np.concatenate([equal, np.eye(members), grid_weights])
    _, first = np.unique(normalise_weights(rows), axis=0, return_index=True)
    return rows[np.sort(first)]


class WeightedSearch:
    """Scores weight candidates on one class's evidence for every subset, caching by candidate."""

    def __init__(self, evidence: ClassEvidence, subsets: Subsets, thresholds: np.ndarray) -> None:
        self.evidence, self.subsets, self.thresholds = evidence, subsets, thresholds
        self.cache: dict[tuple, np.ndarray] = {}
        self.evaluations = 0

    def scores(self, weights: np.ndarray) -> np.ndarray:
        """(S, K) mean Dice of a raw weight vector on every subset."""
        key = tuple(normalise_weights(weights).tolist())
        if key not in self.cache:
            per_image = weighted_dice(self.evidence, normalise_weights(weights), self.thresholds)
            self.cache[key] = self.subsets.means(per_image)
            self.evaluations += 1
        return self.cache[key]

    def choose(self, candidates: np.ndarray, subset: int) -> Choice:
        table = np.stack([self.scores(w)[subset] for w in candidates])
        index, threshold = _best(table)
        return Choice(candidates[index], threshold, score=float(table[index, threshold]))

    def refine(self, choice: Choice, subset: int, step: float, start: float | None = None) -> Choice:
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
                best = self.choose(np.array(moves), subset)
                if best.score > choice.score:
                    choice, improved = best, True
        return choice

    def caruana(self, subset: int, start: int = 3, rounds: int = 25) -> Choice:
        """Greedy forward selection with replacement, from the ``start`` best single members."""
        members = self.evidence.members
        singles = [self.scores(row)[subset].max() for row in np.eye(members)]
        counts = np.zeros(members)
        counts[np.argsort(singles)[::-1][:start]] = 1
        choice = self.choose(counts[None], subset)
        for _ in range(rounds):
            trials = np.array([counts + np.eye(members)[m] for m in range(members)])
            best = self.choose(trials, subset)
            if best.score <= choice.score:
                break
            choice, counts = best, best.weights
        return Choice(choice.weights / choice.weights.sum(), choice.threshold, score=choice.score)


def search_weighted(evidence: ClassEvidence, subsets: Subsets, thresholds: np.ndarray, strategy: str, step: float,
                    method: str) -> tuple[dict[int, Choice], WeightedSearch]:
    """The chosen candidate for each selecting subset."""
    search = WeightedSearch(evidence, subsets, thresholds)
    members = evidence.members
    grid_step = coarse_step(members, step)
    candidates = base_candidates(members, grid_step, strategy)
    choices = {}
    for subset in subsets.selecting:
        choice = search.choose(candidates, subset)
        if strategy == "weighted" and members > 1:
            if method == "caruana":
                greedy = search.caruana(subset)
                choice = greedy if greedy.score > choice.score else choice
            choice = search.refine(choice, subset, step, grid_step)
        choices[subset] = choice
    return choices, search


def search_hard(evidence: ClassEvidence, subsets: Subsets, thresholds: np.ndarray, rounds: int = 2) -> dict[int, Choice]:
    """Per subset: for each vote count, coordinate ascent over member thresholds from 0.5; the best count wins."""
    members = evidence.members
    choices = {}
    for subset in subsets.selecting:
        best: Choice | None = None
        for votes in range(1, members + 1):
            indices = np.full(members, HALF)
            score = -1.0
            for _ in range(rounds):
                for member in range(members):
                    table = subsets.means(hard_dice(evidence, thresholds[indices], member, votes, thresholds))[subset]
                    _, index = _best(table[None])  # the current threshold is among those swept: never worse
                    indices[member], score = index, float(table[index])
            candidate = Choice(np.ones(members), HALF, indices.copy(), votes, score)
            if best is None or candidate.score > best.score:
                best = candidate
        choices[subset] = best
    return choices


def choice_kept(evidence: ClassEvidence, choice: Choice, strategy: str, thresholds: np.ndarray) -> np.ndarray:
    """(R,) bool: the evidence rows a choice keeps, computed as combine computes them."""
    if strategy == "hard":
        return hard_kept(evidence, thresholds[choice.member_thresholds], float(choice.min_votes))
    return weighted_kept(evidence, normalise_weights(choice.weights), thresholds[choice.threshold])


def variant_dice(evidence: ClassEvidence, kept_list: Sequence[np.ndarray]) -> np.ndarray:
    """(candidates, variants, images) Dice of each post-processing variant of each candidate (its kept rows), on
    masks rebuilt from the evidence exactly as combine makes them."""
    result = np.zeros((len(kept_list), len(VARIANTS), evidence.images))
    empty = dice_from_counts(0, 0, evidence.truth_total)  # images without any member value
    for s, kept in enumerate(kept_list):
        result[s] = empty
        for index, made in enumerate(image_masks(evidence, kept)):
            if made is None:
                continue
            mask, truth = made
            largest = apply_postprocessing(mask, ["largest_component"])
            variants = (mask, largest, apply_postprocessing(mask, ["fill_holes"]),
                        apply_postprocessing(largest, ["fill_holes"]))
            for v, processed in enumerate(variants):
                result[s, v, index] = dice_from_counts(np.count_nonzero(processed & truth),
                                                       np.count_nonzero(processed), evidence.truth_total[index])
    return result


LEVELS = ("plain", "threshold", "searched")
"""Settings of a class from the simplest: the plain rule (equal weights at 0.5; hard: majority of votes at 0.5),
the equal weights at a searched threshold (weighted only), the searched setting with its post-processing."""


@dataclass
class ClassResult:
    """Everything the search found for one class."""

    channel: int
    recipe_choice: Choice
    postprocess: list[str]
    oof_dice: float  # the recipe (with post-processing) on all OOF images
    member_dice: list[float]  # each member alone at 0.5
    mean_dice: float  # the plain mean at 0.5
    ambiguous_pixels: int
    evaluations: int
    cv: list[dict[str, float]] = field(default_factory=list)  # per fold, held out: recipe, each level, mean, best
    level: str = "searched"  # the level the recipe uses (see LEVELS and choose_level)


def choose_level(held_out: dict[str, np.ndarray]) -> str:
    """The no-loss rule, decided on held-out folds only: start from the plain rule; a more complex level replaces
    the current one only if its per-fold held-out Dice beats the current one's by more than one standard error
    of the fold differences (and on average)."""
    current = "plain"
    for level in LEVELS[1:]:
        if level not in held_out:
            continue
        differences = held_out[level] - held_out[current]
        spread = differences.std(ddof=1) / np.sqrt(differences.size) if differences.size > 1 else np.inf
        if differences.mean() > 0 and differences.mean() > spread:
            current = level
    return current


def search_class(evidence: ClassEvidence, strategy: str, thresholds: np.ndarray, step: float = 0.1,
                 method: str = "grid", folds_of_images: Sequence[int] | None = None,
                 postprocess: bool = True, fallback: bool = True) -> ClassResult:
    """Search one class on its evidence: candidates per subset, post-processing, CV scores and, with CV and
    ``fallback``, the level kept by :func:`choose_level`."""
    subsets = make_subsets(folds_of_images)
    if subsets.masks.shape[1] == 0:
        subsets.masks = np.ones((1, evidence.images), bool)
    members = evidence.members
    if strategy == "hard":
        choices, evaluations = search_hard(evidence, subsets, thresholds), 0
        baseline = WeightedSearch(evidence, subsets, thresholds)
    else:
        choices, baseline = search_weighted(evidence, subsets, thresholds, strategy, step, method)
        evaluations = baseline.evaluations
    equal = baseline.scores(np.ones(members))[:, HALF]  # (S,)
    singles = np.stack([baseline.scores(row)[:, HALF] for row in np.eye(members)])  # (M, S)
    distinct = {choice.key(): choice for choice in choices.values()}
    per_variant = variant_dice(evidence, [choice_kept(evidence, choice, strategy, thresholds)
                                          for choice in distinct.values()]) if postprocess else None
    position = {key: i for i, key in enumerate(distinct)}

    def searched(subset: int) -> tuple[list[str], np.ndarray]:
        """Post-processing chosen on ``subset``'s images, and the per-image Dice it gives."""
        choice = choices[subset]
        if per_variant is None:
            return [], _per_image(evidence, choice, strategy, thresholds)
        variants = per_variant[position[choice.key()]]  # (V, images)
        means = subsets.means(variants.T)[subset]  # (V,)
        best = int(np.argmax(means)) if means.max() > means[0] else 0
        return list(VARIANTS[best]), variants[best]

    simple = _simple_levels(evidence, subsets, strategy, thresholds, members)  # level -> {subset: (choice, per_image)}
    held_out: dict[str, list[float]] = {}
    cv = []
    for name_index, name in enumerate(subsets.names):
        if not name.startswith("train-"):
            continue
        held_index = subsets.names.index(name.replace("train-", "heldout-"))
        held = subsets.masks[held_index]
        fold = {"fold": int(name.split("-")[1])}
        for level, by_subset in simple.items():
            fold[level] = float(by_subset[name_index][1][held].mean())
        fold["searched"] = float(searched(name_index)[1][held].mean())
        best_member = int(np.argmax(singles[:, name_index]))  # chosen on the training folds
        fold |= {"mean": float(equal[held_index]), "best_member": float(singles[best_member, held_index])}
        cv.append(fold)
        for level in [*simple, "searched"]:
            held_out.setdefault(level, []).append(fold[level])
    per_fold = {k: np.asarray(v) for k, v in held_out.items()}
    level = choose_level(per_fold) if cv and fallback else "searched"
    for index, fold in enumerate(cv):
        # the rule decided without the fold it is scored on: deciding on all folds would flatter the estimate
        fold["recipe"] = fold[choose_level({k: np.delete(v, index) for k, v in per_fold.items()})
                              if fallback else "searched"]
    if level == "searched":
        steps, per_image = searched(0)
        choice = choices[0]
    else:
        (choice, per_image), steps = simple[level][0], []
    return ClassResult(evidence.channel, choice, steps, float(per_image.mean()), singles[:, 0].tolist(),
                       float(equal[0]), evidence.ambiguous_pixels, evaluations, cv, level)


def _per_image(evidence: ClassEvidence, choice: Choice, strategy: str, thresholds: np.ndarray) -> np.ndarray:
    """(images,) Dice of a choice without post-processing."""
    if strategy == "hard":
        table = hard_dice(evidence, thresholds[choice.member_thresholds], 0, choice.min_votes, thresholds)
        return table[:, choice.member_thresholds[0]]
    return weighted_dice(evidence, normalise_weights(choice.weights), thresholds)[:, choice.threshold]


def _simple_levels(evidence: ClassEvidence, subsets: Subsets, strategy: str, thresholds: np.ndarray,
                   members: int) -> dict[str, dict[int, tuple[Choice, np.ndarray]]]:
    """The levels below 'searched', per selecting subset: (choice, per-image Dice without post-processing)."""
    if strategy == "hard":
        majority = members // 2 + 1  # combine's default: more than half of the unit votes
        per_image = _per_image(evidence, Choice(np.ones(members), HALF, np.full(members, HALF), majority), strategy,
                               thresholds)
        means = subsets.means(per_image)
        return {"plain": {subset: (Choice(np.ones(members), HALF, np.full(members, HALF), majority,
                                          float(means[subset])), per_image) for subset in subsets.selecting}}
    equal = np.full(members, 1.0 / members)
    table = weighted_dice(evidence, normalise_weights(equal), thresholds)  # (images, K)
    means = subsets.means(table)  # (S, K)
    levels: dict[str, dict[int, tuple[Choice, np.ndarray]]] = {
        "plain": {subset: (Choice(equal, HALF, score=float(means[subset, HALF])), table[:, HALF])
                  for subset in subsets.selecting}}
    if strategy == "weighted":
        levels["threshold"] = {}
        for subset in subsets.selecting:
            _, index = _best(means[subset][None])
            levels["threshold"][subset] = (Choice(equal, index, score=float(means[subset, index])), table[:, index])
    return levels


@dataclass
class SearchReport:
    """The search's results for every class, and the recipe written."""

    strategy: str
    members: list[str]
    classes: list[ClassResult]
    recipe_path: str | None = None
    fallback: bool = True  # the no-loss rule chose each class's level (with CV)

    def summary(self) -> dict[str, float]:
        """Means over classes: each member, the plain mean, the recipe; and the CV gains if run."""
        summary = {f"member:{name}": float(np.mean([c.member_dice[m] for c in self.classes]))
                   for m, name in enumerate(self.members)}
        summary["plain_mean"] = float(np.mean([c.mean_dice for c in self.classes]))
        summary["recipe"] = float(np.mean([c.oof_dice for c in self.classes]))
        folds = [row["fold"] for row in self.classes[0].cv]
        if folds:
            for column in ("recipe", "searched", "mean", "best_member"):  # held-out Dice, mean over folds
                summary[f"cv_{column}"] = float(np.mean([np.mean([c.cv[i][column] for c in self.classes])
                                                         for i in range(len(folds))]))
            for name, column in (("", "recipe"), ("_searched", "searched")):
                over_mean = [np.mean([c.cv[i][column] - c.cv[i]["mean"] for c in self.classes]) for i in range(len(folds))]
                over_best = [np.mean([c.cv[i][column] - c.cv[i]["best_member"] for c in self.classes])
                             for i in range(len(folds))]
                summary.update({f"cv_gain{name}_over_mean": float(np.mean(over_mean)),
                                f"cv_gain{name}_over_mean_std": float(np.std(over_mean)),
                                f"cv_gain{name}_over_best_member": float(np.mean(over_best)),
                                f"cv_gain{name}_over_best_member_std": float(np.std(over_best))})
            for level in LEVELS:
                summary[f"classes_{level}"] = float(sum(c.level == level for c in self.classes))
        return summary

    def verdict(self) -> str:
        """Plain sentences: does the recipe beat the plain mean on held-out folds, and where did it fall back?"""
        summary = self.summary()
        if "cv_gain_over_mean" not in summary:
            return ("OOF scores of a searched recipe flatter it (fitted and scored on the same images); "
                    "run with --cv for an honest estimate (and the fallback to the plain rule where searching "
                    "does not pay).")
        levels = ", ".join(f"{int(summary[f'classes_{level}'])} {level}" for level in LEVELS
                           if summary.get(f"classes_{level}"))
        searched = (f"searched everywhere: {summary['cv_gain_searched_over_mean']:+.4f} ± "
                    f"{summary['cv_gain_searched_over_mean_std']:.4f}")
        gain, spread = summary["cv_gain_over_mean"], summary["cv_gain_over_mean_std"]
        if summary.get("classes_searched", 0) == 0 and summary.get("classes_threshold", 0) == 0:
            return (f"Searching does not beat the plain rule on held-out folds for any class ({searched}); the "
                    f"recipe is the plain rule.")
        judged = "beats" if gain > 0 and gain >= spread else "is NOT reliably better than"
        best, best_spread = summary["cv_gain_over_best_member"], summary["cv_gain_over_best_member_std"]
        return (f"The recipe ({levels} classes) {judged} the plain mean on held-out folds: {gain:+.4f} ± "
                f"{spread:.4f} Dice ({searched}); against the best single member of each class: {best:+.4f} ± "
                f"{best_spread:.4f}." + (" Each fold's figure comes from levels chosen on the other folds."
                                         if self.fallback else " No fallback: every class keeps its searched setting."))
