"""``ens search-weights``: per-class weights, thresholds and post-processing fitted on out-of-fold stores, with
a cross-validated estimate of the gain.

Per class (classes are independent: the score is a mean over classes):
- ``weighted``: candidates are the equal weights, each single member, and a grid on the simplex (``step``),
  every one with the 255 quantization-midpoint thresholds; then a local refinement around the best (moves of
  step/2 and step/4 between two members). ``method="caruana"`` (for many members) instead grows a bag of
  members greedily with replacement (Caruana et al. 2004) from the best few.
- ``soft``: equal weights, the threshold only. ``hard``: unit votes; per-member thresholds by coordinate
  ascent for each vote count 1..M.
- post-processing (largest component, hole filling) is kept only where it raises the class's Dice.
Candidates are scored exactly on compact evidence (segens.ensemble.evidence). Ties go to the earlier
candidate (equal weights first) and the threshold nearest 0.5. With ``cv`` the whole procedure is repeated
with each fold's images held out and scored on them, against the plain mean and the best single member
(each at 0.5, the best member chosen on the training folds).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segens.dataset import ImageRecord
from segens.dice import dice_from_counts
from segens.ensemble.combine import Settings, class_mask, normalise_weights
from segens.ensemble.evidence import ClassEvidence, class_truth, extract_class, hard_dice, weighted_dice
from segens.ensemble.postprocess import apply_postprocessing
from segens.members.store import ProbabilityStore

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

    def refine(self, choice: Choice, subset: int, step: float) -> Choice:
        """Move mass between pairs of members by step/2, then step/4, while the subset's score rises."""
        members = choice.weights.size
        for delta in (step / 2, step / 4):
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
        members = self.evidence.values.shape[1]
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
    members = evidence.values.shape[1]
    candidates = base_candidates(members, step, strategy)
    choices = {}
    for subset in subsets.selecting:
        choice = search.choose(candidates, subset)
        if strategy == "weighted" and members > 1:
            if method == "caruana":
                greedy = search.caruana(subset)
                choice = greedy if greedy.score > choice.score else choice
            choice = search.refine(choice, subset, step)
        choices[subset] = choice
    return choices, search


def search_hard(evidence: ClassEvidence, subsets: Subsets, thresholds: np.ndarray, rounds: int = 2) -> dict[int, Choice]:
    """Per subset: for each vote count, coordinate ascent over member thresholds from 0.5; the best count wins."""
    members = evidence.values.shape[1]
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


def choice_settings(choice: Choice, channel: int, strategy: str, thresholds: np.ndarray) -> Settings:
    """Combine settings reproducing a choice for one class (other classes unused)."""
    from segens.classes import NUM_CLASSES

    members = choice.weights.size
    weights = np.ones((NUM_CLASSES, members), np.float32)
    member_thresholds = np.full((NUM_CLASSES, members), 0.5, np.float32)
    min_votes = None
    if strategy == "hard":
        member_thresholds[channel] = thresholds[choice.member_thresholds]
        min_votes = np.ones(NUM_CLASSES)
        min_votes[channel] = choice.min_votes
    else:
        weights[channel] = normalise_weights(choice.weights)
    class_thresholds = np.full(NUM_CLASSES, 0.5, np.float32)
    class_thresholds[channel] = thresholds[choice.threshold]
    return Settings("hard" if strategy == "hard" else "weighted", weights, class_thresholds, member_thresholds, min_votes)


def variant_dice(stores: Sequence[ProbabilityStore], records: Sequence[ImageRecord], channel: int,
                 settings_list: Sequence[Settings]) -> np.ndarray:
    """(settings, variants, images) Dice of each post-processing variant, masks made exactly as combine does."""
    result = np.zeros((len(settings_list), len(VARIANTS), len(records)))
    present = np.ones(len(stores), bool)
    for index, record in enumerate(records):
        size = stores[0].image_size(record.key)
        truth = class_truth(record, channel, size)
        truth_total = np.count_nonzero(truth)
        member_boxes = [store.boxes(record.key) for store in stores]
        for s, settings in enumerate(settings_list):
            box, mask = class_mask(stores, record.key, channel, settings, present, member_boxes)
            region = truth[box[0] : box[1], box[2] : box[3]] if box is not None else None
            for v, steps in enumerate(VARIANTS):
                processed = apply_postprocessing(mask, steps) if box is not None else mask
                intersection = np.count_nonzero(processed & region) if box is not None else 0
                result[s, v, index] = dice_from_counts(intersection, np.count_nonzero(processed), truth_total)
    return result


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
    cv: list[dict[str, float]] = field(default_factory=list)  # per fold: recipe, mean, best member (held out)


def search_class(stores: Sequence[ProbabilityStore], records: Sequence[ImageRecord], channel: int, strategy: str,
                 thresholds: np.ndarray, step: float = 0.1, method: str = "grid",
                 folds_of_images: Sequence[int] | None = None, postprocess: bool = True) -> ClassResult:
    """Search one class end to end: evidence, candidates per subset, post-processing, CV scores."""
    evidence = extract_class(stores, records, channel, thresholds)
    subsets = make_subsets(folds_of_images)
    if subsets.masks.shape[1] == 0:
        subsets.masks = np.ones((1, len(records)), bool)
    members = len(stores)
    if strategy == "hard":
        choices, evaluations = search_hard(evidence, subsets, thresholds), 0
        baseline = WeightedSearch(evidence, subsets, thresholds)
    else:
        choices, baseline = search_weighted(evidence, subsets, thresholds, strategy, step, method)
        evaluations = baseline.evaluations
    equal = baseline.scores(np.ones(members))[:, HALF]  # (S,)
    singles = np.stack([baseline.scores(row)[:, HALF] for row in np.eye(members)])  # (M, S)
    distinct = {choice.key(): choice for choice in choices.values()}
    settings = [choice_settings(choice, channel, strategy, thresholds) for choice in distinct.values()]
    per_variant = variant_dice(stores, records, channel, settings) if postprocess else None
    position = {key: i for i, key in enumerate(distinct)}

    def finish(subset: int) -> tuple[list[str], np.ndarray]:
        """Post-processing chosen on ``subset``'s images, and the per-image Dice it gives."""
        choice = choices[subset]
        if per_variant is None:
            return [], weighted_or_hard_per_image(choice)
        variants = per_variant[position[choice.key()]]  # (V, images)
        means = subsets.means(variants.T)[subset]  # (V,)
        best = int(np.argmax(means)) if means.max() > means[0] else 0
        return list(VARIANTS[best]), variants[best]

    def weighted_or_hard_per_image(choice: Choice) -> np.ndarray:
        if strategy == "hard":
            table = hard_dice(evidence, thresholds[choice.member_thresholds], 0, choice.min_votes, thresholds)
            return table[:, choice.member_thresholds[0]]
        return weighted_dice(evidence, normalise_weights(choice.weights), thresholds)[:, choice.threshold]

    steps, per_image = finish(0)
    result = ClassResult(channel, choices[0], steps, float(per_image.mean()), singles[:, 0].tolist(), float(equal[0]),
                         int(evidence.truth.size), evaluations)
    for name_index, name in enumerate(subsets.names):
        if not name.startswith("train-"):
            continue
        held = subsets.names.index(name.replace("train-", "heldout-"))
        _, fold_per_image = finish(name_index)
        best_member = int(np.argmax(singles[:, name_index]))
        result.cv.append({"fold": int(name.split("-")[1]),
                          "recipe": float(fold_per_image[subsets.masks[held]].mean()),
                          "mean": float(equal[held]), "best_member": float(singles[best_member, held])})
    return result


@dataclass
class SearchReport:
    """The search's results for every class, and the recipe written."""

    strategy: str
    members: list[str]
    classes: list[ClassResult]
    recipe_path: str | None = None

    def summary(self) -> dict[str, float]:
        """Means over classes: each member, the plain mean, the recipe; and the CV gains if run."""
        summary = {f"member:{name}": float(np.mean([c.member_dice[m] for c in self.classes]))
                   for m, name in enumerate(self.members)}
        summary["plain_mean"] = float(np.mean([c.mean_dice for c in self.classes]))
        summary["recipe"] = float(np.mean([c.oof_dice for c in self.classes]))
        folds = [row["fold"] for row in self.classes[0].cv]
        if folds:
            over_mean = [np.mean([c.cv[i]["recipe"] - c.cv[i]["mean"] for c in self.classes]) for i in range(len(folds))]
            over_best = [np.mean([c.cv[i]["recipe"] - c.cv[i]["best_member"] for c in self.classes]) for i in range(len(folds))]
            summary.update(cv_gain_over_mean=float(np.mean(over_mean)), cv_gain_over_mean_std=float(np.std(over_mean)),
                           cv_gain_over_best_member=float(np.mean(over_best)),
                           cv_gain_over_best_member_std=float(np.std(over_best)))
        return summary

    def verdict(self) -> str:
        """One plain sentence: does the searched recipe beat the plain mean on held-out folds?"""
        summary = self.summary()
        if "cv_gain_over_mean" not in summary:
            return ("OOF scores of a searched recipe flatter it (fitted and scored on the same images); "
                    "run with --cv for an honest estimate.")
        gain, spread = summary["cv_gain_over_mean"], summary["cv_gain_over_mean_std"]
        if gain <= 0 or gain < spread:
            return (f"The searched recipe is NOT reliably better than the plain mean on held-out folds "
                    f"(gain {gain:+.4f} ± {spread:.4f}); prefer `--strategy soft` at 0.5.")
        return f"The searched recipe beats the plain mean on held-out folds by {gain:+.4f} ± {spread:.4f} Dice."
