"""Cross-validation subsets and the no-loss rule: which level of a class's setting held-out images support.

A class's levels go from the simplest, the plain rule, to the searched setting (each strategy lists its own:
segens.voting.base.Strategy.levels). The rule (``choose_level``) decides on the **per-image paired differences**
of held-out Dice: every deciding image is scored by the setting chosen without it (on the other parts of a
partition of the deciding images), and a more complex level replaces the current one only where the mean
difference beats ``Z`` standard errors of the mean. Deciding per image, not per fold, lets the rule move with as
few as two folds.

The same rule makes the written recipe and its estimate (``CVPlan``): the recipe decides on all OOF images,
partitioned by the k folds; the estimate of fold f decides without fold f's images, partitioned by the other folds
(their settings chosen on all folds but f and the part), or, at k = 2, by two patient-grouped halves of the other
fold; fold f is then scored with the level so decided and its setting chosen on the other folds. Every setting
is chosen on one of the plan's selecting subsets, all searched at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

Z = 2.0
"""Standard errors by which a level's mean per-image gain must beat the current level's (one-sided, about 2.3%
per test for an honest standard error; measured on the null fixture: README)."""
LEVEL_NAMES = ("plain", "threshold", "searched", "calibrated")
"""Settings of a class from the simplest: the plain rule (equal weights at 0.5; hard: majority of votes at 0.5),
the equal weights at a searched threshold (weighted only), the searched setting with its post-processing, and
(mean votes searched with calibration) the equal weights on calibrated maps at a searched threshold with its
post-processing."""


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


def paired_differences(candidate: np.ndarray, current: np.ndarray,
                       groups: Sequence[str] | None = None) -> np.ndarray:
    """Per-image differences ``candidate - current``, or with ``groups`` (each image's patient) their mean per
    group: the two hands of a patient are not independent samples."""
    differences = np.asarray(candidate, np.float64) - np.asarray(current, np.float64)
    if groups is None:
        return differences
    _, index = np.unique(np.asarray(groups), return_inverse=True)
    return np.bincount(index, weights=differences) / np.bincount(index)


def reliably_better(candidate: np.ndarray, current: np.ndarray, groups: Sequence[str] | None = None,
                    z: float = Z) -> bool:
    """Whether per-image scores ``candidate`` beat ``current`` (paired, same images, averaged per patient with
    ``groups``): the mean difference is positive and more than ``z`` standard errors of the mean."""
    differences = paired_differences(candidate, current, groups)
    mean = differences.mean() if differences.size else 0.0
    spread = standard_error(differences)
    return bool(mean > 0 and mean > z * spread)


def standard_error(values: np.ndarray) -> float:
    """The standard error of the mean of ``values`` (ddof 1); inf for fewer than two."""
    values = np.asarray(values, np.float64)
    return float(values.std(ddof=1) / np.sqrt(values.size)) if values.size > 1 else float("inf")


def choose_level(held_out: dict[str, np.ndarray], groups: Sequence[str] | None = None) -> str:
    """The no-loss rule: from the plain rule, move to each more complex level in turn only where its per-image
    held-out Dice (each image scored by the setting chosen without it) is reliably better than the current one's
    (``reliably_better``, paired over the same images, per patient with ``groups``)."""
    current = "plain"
    for level in LEVEL_NAMES[1:]:
        if level in held_out and reliably_better(held_out[level], held_out[current], groups):
            current = level
    return current


@dataclass
class CVPlan:
    """The subsets one search chooses settings on and scores them on (see the module docstring).

    ``subsets`` holds 'all', per fold 'train-f' and 'heldout-f', and the inner selecting subsets; ``recipe`` is
    the partition of all images by fold (selecting subset of each part); ``inner[f]`` the partition of fold f's
    deciding images (every image not in fold f)."""

    subsets: Subsets
    folds: list[int]
    train: dict[int, int]  # fold -> index of its 'train-f' subset
    held_out: dict[int, np.ndarray]  # fold -> (images,) bool
    recipe: list[tuple[int, np.ndarray]]  # (selecting subset, part's images) over all images
    inner: dict[int, list[tuple[int, np.ndarray]]]  # fold -> (selecting subset, part's images) over the others

    @property
    def images(self) -> int:
        return self.subsets.masks.shape[1]


def make_plan(folds_of_images: Sequence[int], patients_of_images: Sequence[str]) -> CVPlan:
    """The CV plan of images in ``folds`` (two or more), patients kept together in every part."""
    folds = np.asarray(folds_of_images)
    numbers = sorted(set(folds.tolist()))
    if len(numbers) < 2:
        raise ValueError("cross-validation needs at least two folds")
    names, masks = ["all"], [np.ones(folds.size, bool)]

    def subset(name: str, mask: np.ndarray) -> int:
        if name not in names:
            names.append(name)
            masks.append(mask)
        return names.index(name)

    train, held_out = {}, {}
    for fold in numbers:
        train[fold] = subset(f"train-{fold}", folds != fold)
        held_out[fold] = folds == fold
        subset(f"heldout-{fold}", held_out[fold])
    recipe = [(train[fold], held_out[fold]) for fold in numbers]
    inner: dict[int, list[tuple[int, np.ndarray]]] = {}
    for fold in numbers:
        others = [other for other in numbers if other != fold]
        if len(others) >= 2:  # the other folds, each scored by the setting chosen on all folds but it and f
            inner[fold] = [(subset("train-" + "-".join(map(str, sorted((fold, other)))),
                                   (folds != fold) & (folds != other)), held_out[other]) for other in others]
        else:  # k = 2: the other fold's patients in two halves, each scored by the setting chosen on the other
            halves = _patient_halves(held_out[others[0]], patients_of_images)
            inner[fold] = [(subset(f"half-{others[0]}-{1 - index}", halves[1 - index]), halves[index])
                           for index in (0, 1)]
    return CVPlan(Subsets(names, np.stack(masks)), numbers, train, held_out, recipe, inner)


def _patient_halves(images: np.ndarray, patients_of_images: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Two non-empty masks splitting the ``images`` (bool) by patient (patients in sorted order, alternately), or
    by image where the images are of one patient only."""
    patients = np.asarray(patients_of_images)
    chosen = sorted(set(patients[images].tolist()))
    if len(chosen) >= 2:
        first = set(chosen[0::2])
        in_first = np.array([patient in first for patient in patients.tolist()])
    else:
        in_first = np.zeros(images.size, bool)
        in_first[np.flatnonzero(images)[0::2]] = True
    return images & in_first, images & ~in_first


def held_out_scores(plan_parts: Sequence[tuple[int, np.ndarray]], per_image_of_subset, images: int) -> np.ndarray:
    """(images,) float64: each part's images scored by the per-image Dice of the setting chosen on its selecting
    subset (``per_image_of_subset(subset) -> (images,)``); NaN outside the parts."""
    scores = np.full(images, np.nan)
    for selecting, part in plan_parts:
        scores[part] = per_image_of_subset(selecting)[part]
    return scores
