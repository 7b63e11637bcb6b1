"""How far a member's probabilities mean what they say: reliability curves and the expected calibration error
(ECE) per class, from a store and the labels, before and after a recipe's calibration.

The population: per member, image and class, the pixels where the member's stored map is not 0 or the class's
truth is present. Pixels far from every bone are left out; counted, they would make any member look calibrated
(almost all pixels are 0 and background). Counts are kept per stored level (29 x 256), so a calibration table
(segens.voting.calibration) is applied by moving each level's counts to its calibrated level, exactly.

ECE of a class: the pixels binned by their probability into ``BINS`` equal bins on [0, 1], the pixel-weighted
mean over bins of |fraction that is truth - mean probability|.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import discover
from segens.conventions.labels import read_label_mask
from segens.infra.progress import progress_bar
from segens.store import LEVELS, ProbabilityStore

BINS = 20
POPULATION = "pixels where the member's map is not 0 or the bone is present"


@dataclass
class LevelCounts:
    """(29, 256) int64 pixels of the population at each stored level, and how many of them are truth."""

    positive: np.ndarray
    total: np.ndarray

    def calibrated(self, tables: Sequence[np.ndarray | None]) -> LevelCounts:
        """The counts at the levels a calibration maps them to (``tables``: per class a (256,) uint8 or None)."""
        positive, total = self.positive.copy(), self.total.copy()
        for channel, table in enumerate(tables):
            if table is None:
                continue
            positive[channel] = np.bincount(table, weights=self.positive[channel], minlength=256)
            total[channel] = np.bincount(table, weights=self.total[channel], minlength=256)
        return LevelCounts(positive.astype(np.int64), total.astype(np.int64))

    def binned(self, bins: int = BINS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(29, bins) pixels, truth pixels and probability sums per probability bin."""
        index = np.minimum((LEVELS * bins).astype(np.int64), bins - 1)
        pixels = np.stack([np.bincount(index, weights=row, minlength=bins) for row in self.total])
        truth = np.stack([np.bincount(index, weights=row, minlength=bins) for row in self.positive])
        mass = np.stack([np.bincount(index, weights=row * LEVELS, minlength=bins) for row in self.total])
        return pixels, truth, mass

    def ece(self, bins: int = BINS) -> np.ndarray:
        """(29,) expected calibration error of each class (NaN where the population is empty)."""
        pixels, truth, mass = self.binned(bins)
        counts = pixels.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.abs(truth - mass).sum(axis=1) / counts

    def pooled_ece(self, bins: int = BINS) -> float:
        """ECE of every class's pixels together."""
        pooled = LevelCounts(self.positive.sum(axis=0, keepdims=True), self.total.sum(axis=0, keepdims=True))
        return float(pooled.ece(bins)[0])


def fitted_tables(counts: LevelCounts, method: str = "isotonic") -> list[np.ndarray]:
    """Per class, the calibration table (segens.voting.calibration) fitted on these counts: e.g. on a member's OOF
    counts, to see what calibration does to its test maps."""
    from segens.voting.calibration import fit_table

    return [fit_table(counts.positive[channel], counts.total[channel], method) for channel in range(NUM_CLASSES)]


def level_counts(store: ProbabilityStore, root: str | Path, split: str | None = None,
                 progress: bool = False) -> LevelCounts:
    """The population's counts of ``store`` against the labels of ``root``'s split (default: the store's own)."""
    split = split or ("train" if store.split == "oof" else "test")
    records = discover(root, split).records
    positive = np.zeros((NUM_CLASSES, 256), np.int64)
    total = np.zeros((NUM_CLASSES, 256), np.int64)
    with progress_bar("img", disable=not progress, transient=True) as bar:
        for record in bar.track(records, description=f"calibration of {store.member}"):
            size = store.image_size(record.key)
            truth = read_label_mask(record.label_path, *size)
            boxes = store.boxes(record.key)
            for channel in range(NUM_CLASSES):
                outside = int(np.count_nonzero(truth[channel]))  # truth pixels the map says 0 to, so far
                box = boxes[channel]
                if box is not None:
                    values = store.read_region(record.key, channel, box).ravel()
                    inside = truth[channel, box[0]:box[1], box[2]:box[3]].ravel()
                    chosen = (values > 0) | inside
                    total[channel] += np.bincount(values[chosen], minlength=256)
                    positive[channel] += np.bincount(values[chosen], weights=inside[chosen], minlength=256).astype(np.int64)
                    outside -= int(np.count_nonzero(inside))
                total[channel, 0] += outside
                positive[channel, 0] += outside
    return LevelCounts(positive, total)


def plot_reliability(curves: Mapping[str, LevelCounts], out: str | Path,
                     calibrated: Mapping[str, LevelCounts] | None = None, worst: int = 4) -> Path:
    """One panel per member: the reliability curve of all classes pooled (and after the recipe's calibration,
    dashed), and faintly those of its ``worst`` classes by ECE; the diagonal is a calibrated member."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(curves)
    figure, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 4.6), squeeze=False)
    for axis, name in zip(axes[0], names):
        counts = curves[name]
        axis.plot([0, 1], [0, 1], color="gray", linewidth=0.8)
        ece = counts.ece()
        for channel in np.argsort(np.nan_to_num(ece, nan=-1))[::-1][:worst]:
            _curve(axis, LevelCounts(counts.positive[channel:channel + 1], counts.total[channel:channel + 1]),
                   dict(alpha=0.35, linewidth=1, label=f"{CLASSES[channel]} (ECE {ece[channel]:.3f})"))
        _curve(axis, _pooled(counts), dict(color="black", linewidth=2, label=f"all classes (ECE {counts.pooled_ece():.3f})"))
        if calibrated is not None and name in calibrated:
            after = calibrated[name]
            _curve(axis, _pooled(after), dict(color="tab:green", linewidth=2, linestyle="--",
                                              label=f"calibrated (ECE {after.pooled_ece():.3f})"))
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("predicted probability")
        axis.set_ylabel("fraction that is bone")
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.legend(fontsize=7, loc="upper left")
    figure.suptitle(f"Reliability ({POPULATION})", fontsize=10)
    figure.tight_layout()
    figure.savefig(out, dpi=110)
    plt.close(figure)
    return Path(out)


def _pooled(counts: LevelCounts) -> LevelCounts:
    return LevelCounts(counts.positive.sum(axis=0, keepdims=True), counts.total.sum(axis=0, keepdims=True))


def _curve(axis, counts: LevelCounts, style: dict) -> None:
    pixels, truth, mass = counts.binned()
    seen = pixels[0] > 0
    axis.plot(mass[0][seen] / pixels[0][seen], truth[0][seen] / pixels[0][seen], marker=".", **style)


def calibration_errors(evaluations: Sequence, root: str | Path, plot: str | Path, recipe_path: str | Path | None = None,
                       progress: bool = False) -> dict[str, dict]:
    """For each store among ``evaluations`` (segens.ensemble.evaluate.Evaluation): its ECE per class and pooled
    (``ece``, ``ece_pooled``) and, with a recipe, after the recipe's calibration of that member (``ece_calibrated``,
    ``ece_calibrated_pooled``); the reliability curves written to ``plot``. Keyed by the evaluation's ``pred``."""
    from segens.errors import SegensError
    from segens.store import open_store
    from segens.voting.recipe import load_recipe

    recipe = load_recipe(recipe_path) if recipe_path is not None else None
    stores = [(evaluation, open_store(evaluation.pred)) for evaluation in evaluations if evaluation.kind == "store"]
    if not stores:
        raise SegensError("--calibration needs probability stores among the PREDs (a CSV holds masks, not "
                          "probabilities)")
    results, curves, after = {}, {}, {}
    for evaluation, store in stores:
        counts = level_counts(store, root, evaluation.split, progress)
        found = {"ece": _by_class(counts.ece()), "ece_pooled": counts.pooled_ece()}
        curves[evaluation.label] = counts
        if recipe is not None and recipe.calibration is not None and store.member in recipe.member_names:
            tables = [None if (rows := recipe.class_tables([store.member], channel)) is None else rows[0]
                      for channel in range(NUM_CLASSES)]
            calibrated = after[evaluation.label] = counts.calibrated(tables)
            found |= {"ece_calibrated": _by_class(calibrated.ece()),
                      "ece_calibrated_pooled": calibrated.pooled_ece()}
        results[evaluation.pred] = found
    plot_reliability(curves, plot, after or None)
    return results


def _by_class(values: np.ndarray) -> dict[str, float | None]:
    """Class name -> value, None where a class had no pixels (JSON has no NaN)."""
    return {name: None if not np.isfinite(value) else float(value) for name, value in zip(CLASSES, values)}
