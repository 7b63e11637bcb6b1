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

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segens.conventions.dice import dice_from_counts
from segens.search.evidence import ClassEvidence, image_masks
from segens.search.levels import choose_level, make_subsets
from segens.search.scorer import ClassScorer
from segens.voting import get_strategy
from segens.voting.base import HALF, Choice, Strategy
from segens.voting.morphology import apply_postprocessing

VARIANTS = ([], ["largest_component"], ["fill_holes"], ["largest_component", "fill_holes"])


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
    level: str = "searched"  # the level the recipe uses (see segens.search.levels)


def search_class(evidence: ClassEvidence, strategy: str | Strategy, thresholds: np.ndarray, step: float = 0.1,
                 method: str = "grid", folds_of_images: Sequence[int] | None = None,
                 postprocess: bool = True, fallback: bool = True) -> ClassResult:
    """Search one class on its evidence: candidates per subset, post-processing, CV scores and, with CV and
    ``fallback``, the level kept by :func:`segens.search.levels.choose_level`."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    subsets = make_subsets(folds_of_images, evidence.images)
    members = evidence.members
    scorer = ClassScorer(evidence, subsets, thresholds)
    choices = strategy.search(scorer, evidence.values, step, method)
    evaluations = scorer.evaluations
    equal = scorer.scores(np.ones(members))[:, HALF]  # (S,)
    singles = np.stack([scorer.scores(row)[:, HALF] for row in np.eye(members)])  # (M, S)
    distinct = {choice.key(): choice for choice in choices.values()}
    per_variant = variant_dice(evidence, [strategy.kept_rows(evidence.values, choice, thresholds)
                                          for choice in distinct.values()]) if postprocess else None
    position = {key: i for i, key in enumerate(distinct)}

    def searched(subset: int) -> tuple[list[str], np.ndarray]:
        """Post-processing chosen on ``subset``'s images, and the per-image Dice it gives."""
        choice = choices[subset]
        if per_variant is None:
            return [], strategy.per_image(scorer, evidence.values, choice)
        variants = per_variant[position[choice.key()]]  # (V, images)
        means = subsets.means(variants.T)[subset]  # (V,)
        best = int(np.argmax(means)) if means.max() > means[0] else 0
        return list(VARIANTS[best]), variants[best]

    simple = strategy.simple_levels(scorer, evidence.values)  # level -> {subset: (choice, per_image)}
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
