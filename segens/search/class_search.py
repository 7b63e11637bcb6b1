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

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from segens.conventions.dice import dice_from_counts
from segens.ensemble.shift import shape_of
from segens.search.evidence import ClassEvidence, image_masks
from segens.search.levels import LEVEL_NAMES, choose_level, held_out_scores, make_plan, make_subsets
from segens.search.scorer import ClassScorer
from segens.voting import calibration, get_strategy
from segens.voting.base import HALF, Choice, Strategy
from segens.voting.morphology import apply_postprocessing
from segens.voting.rules import normalise_weights

VARIANTS = ([], ["largest_component"], ["fill_holes"], ["largest_component", "fill_holes"])


def variant_dice(evidence: ClassEvidence, kept_list: Sequence[tuple[np.ndarray, bool]]) -> np.ndarray:
    """(candidates, variants, images) Dice of each post-processing variant of each candidate (its kept rows, and
    whether it keeps the always-positive pixels), on masks rebuilt from the evidence exactly as combine makes them."""
    result = np.zeros((len(kept_list), len(VARIANTS), evidence.images))
    empty = dice_from_counts(0, 0, evidence.truth_total)  # images without any member value
    for s, (kept, saturated) in enumerate(kept_list):
        result[s] = empty
        for index, made in enumerate(image_masks(evidence, kept, saturated)):
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
    held_out: dict[str, list[float]] = field(default_factory=dict)
    """With CV, per image: 'recipe' (the level the rule decides without the image's fold, its setting chosen on
    the other folds), 'searched', 'plain' (the strategy's plain rule), 'mean' (the plain mean at 0.5) and
    'best_member' (the member best on the other folds, at 0.5)."""
    plain_choice: Choice | None = None  # the strategy's plain rule, written where the overall gate falls back
    plain_dice: float = float("nan")  # the plain rule on all OOF images
    maps: list[list[float]] = field(default_factory=list)
    """Per member, [area, soft] of its OOF maps of this class (segens.ensemble.shift)."""
    calibration: list[list[int]] | None = None
    """Per member, the 256-level table the recipe's setting votes with (fitted on all OOF images); None: none."""

    def as_plain(self) -> ClassResult:
        """This class with the plain rule as its recipe (the overall gate's fallback): its held-out figures become
        the plain rule's too."""
        held_out = {**self.held_out, "recipe": self.held_out["plain"]} if "plain" in self.held_out else self.held_out
        cv = [{**row, "recipe": row["plain"], "recipe_level": 0.0} for row in self.cv]
        return dataclasses.replace(self, recipe_choice=self.plain_choice, postprocess=[], oof_dice=self.plain_dice,
                                   level="plain", held_out=held_out, cv=cv, calibration=None)


def search_class(evidence: ClassEvidence, strategy: str | Strategy, thresholds: np.ndarray, step: float = 0.1,
                 method: str = "grid", folds_of_images: Sequence[int] | None = None,
                 postprocess: bool = True, fallback: bool = True,
                 patients_of_images: Sequence[str] | None = None, calibrate: str = "none") -> ClassResult:
    """Search one class on its evidence: candidates on every subset of the CV plan, post-processing, held-out
    scores and, with CV and ``fallback``, the level kept by the no-loss rule (segens.search.levels). With
    ``calibrate`` (segens.voting.calibration.METHODS) a mean vote's settings vote on levels calibrated on the
    images of the subset each is chosen on."""
    strategy = get_strategy(strategy) if isinstance(strategy, str) else strategy
    plan = None
    patients = np.asarray(patients_of_images if patients_of_images is not None
                          else [str(i) for i in range(evidence.images)])
    if folds_of_images is not None:
        plan = make_plan(folds_of_images, patients)
    subsets = plan.subsets if plan is not None else make_subsets(None, evidence.images)
    members = evidence.members
    tables = calibration_tables(evidence, subsets, calibrate) if strategy.calibrates and calibrate != "none" else None
    scorer = ClassScorer(evidence, subsets, thresholds, tables)
    tuned = {"searched": strategy.search(scorer, evidence.values, step, method)}  # levels with post-processing
    if tables is not None:
        tuned["calibrated"] = strategy.calibrated(scorer)
    evaluations = scorer.evaluations
    equal = scorer.scores(np.ones(members))[:, HALF]  # (S,)
    singles = np.stack([scorer.scores(row)[:, HALF] for row in np.eye(members)])  # (M, S)
    distinct = {choice.key(): choice for chosen in tuned.values() for choice in chosen.values()}
    saturated = np.full((members, 1), 255, np.uint8)  # the evidence's always-positive pixels
    kept_list = [(strategy.kept_rows(evidence.values, choice, thresholds, scorer.tables_of(choice.calibration)),
                  bool(strategy.kept_rows(saturated, choice, thresholds, scorer.tables_of(choice.calibration))[0]))
                 for choice in distinct.values()]
    per_variant = variant_dice(evidence, kept_list) if postprocess else None
    position = {key: i for i, key in enumerate(distinct)}

    def with_postprocessing(level: str, subset: int) -> tuple[list[str], np.ndarray]:
        """The post-processing chosen on ``subset``'s images for ``level``'s setting, and its per-image Dice."""
        choice = tuned[level][subset]
        if per_variant is None:
            return [], strategy.per_image(scorer, evidence.values, choice)
        variants = per_variant[position[choice.key()]]  # (V, images)
        means = subsets.means(variants.T)[subset]  # (V,)
        best = int(np.argmax(means)) if means.max() > means[0] else 0
        return list(VARIANTS[best]), variants[best]

    simple = strategy.simple_levels(scorer, evidence.values)  # level -> {subset: (choice, per_image)}
    levels = [*simple, *tuned]

    def per_image(level: str, subset: int) -> np.ndarray:
        """(images,) Dice of ``level``'s setting chosen on ``subset``."""
        return with_postprocessing(level, subset)[1] if level in tuned else simple[level][subset][1]

    def decide(parts: Sequence[tuple[int, np.ndarray]]) -> str:
        """The no-loss rule on the images of ``parts`` (paired per patient)."""
        if not fallback:
            return "searched"
        covered = np.any([part for _, part in parts], axis=0)
        return choose_level({level: held_out_scores(parts, lambda subset, level=level: per_image(level, subset),
                                                    evidence.images)[covered] for level in levels}, patients[covered])

    level, cv, held_out = "searched", [], {}
    if plan is not None:
        level = decide(plan.recipe)
        image_means = scorer.weighted_per_image(normalise_weights(np.ones(members)))[:, HALF]
        recipe_scores = np.full(evidence.images, np.nan)
        best_scores = np.full(evidence.images, np.nan)
        for fold in plan.folds:
            train, held = plan.train[fold], plan.held_out[fold]
            row = {"fold": fold, **{name: float(per_image(name, train)[held].mean()) for name in levels}}
            best_member = int(np.argmax(singles[:, train]))  # chosen on the training folds
            member_scores = scorer.weighted_per_image(np.eye(members, dtype=np.float32)[best_member])[:, HALF]
            estimate_level = decide(plan.inner[fold])  # the same rule, without this fold's images
            recipe_scores[held] = per_image(estimate_level, train)[held]
            best_scores[held] = member_scores[held]
            row |= {"mean": float(image_means[held].mean()), "best_member": float(member_scores[held].mean()),
                    "recipe": float(recipe_scores[held].mean()), "recipe_level": LEVEL_NAMES.index(estimate_level)}
            cv.append(row)
        held_out = {"recipe": recipe_scores,
                    "searched": held_out_scores(plan.recipe, lambda s: per_image("searched", s), evidence.images),
                    "plain": simple["plain"][0][1], "mean": image_means, "best_member": best_scores}
        held_out = {name: [float(value) for value in values] for name, values in held_out.items()}
    if level in tuned:
        steps, scores = with_postprocessing(level, 0)
        choice = tuned[level][0]
    else:
        (choice, scores), steps = simple[level][0], []
    plain_choice, plain_scores = simple["plain"][0]
    used = scorer.tables_of(choice.calibration)
    return ClassResult(evidence.channel, choice, steps, float(scores.mean()), singles[:, 0].tolist(),
                       float(equal[0]), evidence.ambiguous_pixels, evaluations, cv, level, held_out, plain_choice,
                       float(plain_scores.mean()), shape_of(evidence.member_counts.sum(axis=0), int(evidence.pixels.sum())),
                       None if used is None else used.tolist())


def calibration_tables(evidence: ClassEvidence, subsets, method: str) -> dict[int, np.ndarray]:
    """Selecting subset -> (M, 256) uint8 tables fitted on that subset's images of the class's evidence."""
    positive, total = calibration.level_histograms(evidence.values, evidence.truth, evidence.count, evidence.image,
                                                   evidence.images, evidence.fixed_positive,
                                                   evidence.fixed_true_positive)
    return {subset: calibration.fit_tables(positive, total, subsets.masks[subset], method)
            for subset in subsets.selecting}
