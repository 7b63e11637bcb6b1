"""Where the ensemble is likely wrong: per image and class, four signals of an error, computed from the
members' maps and the recipe, and one score (``ens qc``).

Signals, each in [0, 1] (higher: more likely wrong):
- ``disagreement``: 1 - the mean pairwise Dice of the members' masks, each member at its recipe threshold (hard
  votes: its own threshold; soft and weighted: the class's threshold on its, possibly calibrated, probability);
  two empty masks agree;
- ``uncertainty``: of the pixels in the ensemble's mask or near its decision, the share near it (the recipe's
  weighted mean within ``BAND`` of the class threshold; hard votes: the vote share within ``BAND`` of the share
  needed);
- ``area``: how far the predicted area (a share of the image) lies outside the 5-95% range of the class's area on
  the training labels, in units of that range's width in log space, capped at 1; an empty prediction scores the
  share of training images that show the class;
- ``pieces``: twice the share of the mask outside its largest 8-connected piece, capped at 1 (a bone is one
  piece; a stray pixel barely counts, a bone split in halves counts fully).

The score of an (image, class) is the mean of two figures in [0, 1]: the mean of its four signals (small bones,
with much of their mask near the threshold, are wrong more often), and its strongest signal relative to its
class, ``(s - m) / (1 - m)`` (0 at or below ``m``, the class's median of that signal over the images scored):
an error often shows in one signal only (a missed bone in the members' disagreement, a bone merged with its
neighbour by every member only in its area). An image's score is the largest of its classes'. Where labels exist (OOF stores), each row carries
the true Dice and ``validation`` says whether the score ranks errors: the Spearman correlation of score and Dice
(negative when it does) and the recall at 5% (of the 5% of pairs with the lowest true Dice, the share among the
5% with the highest score).
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import ImageRecord, discover, read_record_mask
from segens.conventions.dice import dice_from_counts
from segens.ensemble.combine import Settings, check_recipe, class_values, resolve_settings
from segens.ensemble.stores import check_stores
from segens.errors import SegensError
from segens.infra.atomic import atomic_write
from segens.infra.outputs import Output, check_outputs
from segens.infra.progress import progress_bar
from segens.store import LEVELS, ProbabilityStore, open_store
from segens.voting.morphology import apply_postprocessing
from segens.voting.recipe import Recipe, load_recipe
from segens.voting.registry import get_strategy
from segens.voting.rules import normalise_weights

SIGNALS = ("disagreement", "uncertainty", "area", "pieces")
BAND = 0.2
"""Pixels whose ensemble score is within this of the decision threshold are 'near it'."""
COLUMNS = ("image", "class", "score", *SIGNALS, "area_share", "piece_count", "dice")
SHARE = 0.05
"""The validation's recall is of the worst ``SHARE`` of pairs by true Dice among the top ``SHARE`` by score."""


@dataclass
class AreaModel:
    """Per class, the 5%, 50% and 95% quantiles of log10 of its area share on the training images that show it,
    and the share of training images that show it."""

    low: np.ndarray
    middle: np.ndarray
    high: np.ndarray
    present: np.ndarray

    def signal(self, share: float, channel: int) -> float:
        """The ``area`` signal of a predicted area share of ``channel``."""
        if share <= 0:
            return float(self.present[channel])
        if not np.isfinite(self.middle[channel]):
            return 1.0  # the class never appears on the training labels, yet it is predicted
        width = max(float(self.high[channel] - self.low[channel]), 0.05)
        value = float(np.log10(share))
        outside = max(float(self.low[channel]) - value, value - float(self.high[channel]), 0.0)
        return min(1.0, outside / width)


def area_model(root: str | Path, jobs: int = 1, progress: bool = False) -> AreaModel:
    """The training labels' area distribution per class (each label file rasterised once)."""
    records = discover(root, "train").records
    if not records:
        raise SegensError(f"{root}: no labelled training images; qc compares predicted areas with the training labels'")
    with progress_bar("img", disable=not progress) as bar:
        task = bar.add_task("training labels' areas", total=len(records))
        shares = []
        for share in Parallel(n_jobs=jobs, return_as="generator")(delayed(_label_shares)(r) for r in records):
            shares.append(share)
            bar.update(task, advance=1)
    shares = np.array(shares)  # (images, 29)
    logs = np.where(shares > 0, np.log10(np.where(shares > 0, shares, 1)), np.nan)
    present = (shares > 0).mean(axis=0)
    with np.errstate(all="ignore"):
        quantiles = [np.array([np.nanquantile(logs[:, c], q) if present[c] > 0 else np.nan for c in range(NUM_CLASSES)])
                     for q in (0.05, 0.5, 0.95)]
    return AreaModel(*quantiles, present)


def _label_shares(record) -> np.ndarray:
    mask = read_record_mask(record)
    return np.count_nonzero(mask, axis=(1, 2)) / float(mask.shape[1] * mask.shape[2])


@dataclass
class QcRow:
    """One (image, class): its score, signals (as measured, before they are taken relative to the class), its
    predicted area share and piece count, and (with labels) true Dice."""

    image: str
    channel: int
    score: float
    signals: dict[str, float]
    area_share: float
    components: int
    dice: float | None = None


@dataclass
class QcResult:
    """Every (image, class) row in image order, each image's score, and (with labels) the validation."""

    rows: list[QcRow]
    images: dict[str, float]
    validation: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)

    def ranked(self) -> list[QcRow]:
        """The rows from the most suspicious."""
        return sorted(self.rows, key=lambda row: (-row.score, row.image, row.channel))


def calibrated_levels(value: np.ndarray, settings, channel: int, member: int) -> np.ndarray:
    """A member's uint8 levels as the recipe votes on them: through its calibration table where it has one."""
    tables = settings.tables[channel] if settings.tables is not None else None
    return value if tables is None else tables[member][value]


def member_masks(values: Sequence[np.ndarray | None], settings, channel: int, present: np.ndarray) -> list[np.ndarray]:
    """Each present member's mask in the region: its (calibrated) probability above its recipe threshold."""
    masks = []
    shape = next(v.shape for v in values if v is not None)
    for member, value in enumerate(values):
        if not present[member]:
            continue
        if value is None:
            masks.append(np.zeros(shape, bool))
            continue
        levels = calibrated_levels(value, settings, channel, member)
        threshold = settings.member_thresholds[channel, member] if settings.strategy == "hard" \
            else settings.thresholds[channel]
        masks.append(LEVELS[levels] > threshold)
    return masks


def ensemble_score(values: Sequence[np.ndarray | None], settings, channel: int,
                   present: np.ndarray) -> tuple[np.ndarray, float]:
    """(the ensemble's score per pixel, the value it is compared with): the weighted mean of (calibrated)
    probabilities and the class threshold, or for hard votes the vote share and the share needed."""
    shape = next(v.shape for v in values if v is not None)
    if settings.strategy == "hard":
        weights = settings.weights[channel] * present
        total = float(weights.sum())
        votes = np.zeros(shape, np.float32)
        for member, mask in zip(np.flatnonzero(present), member_masks(values, settings, channel, present)):
            votes += np.float32(weights[member]) * mask
        needed = 0.5 if settings.min_votes is None else float(settings.min_votes[channel]) / total
        return votes / np.float32(total), needed
    weights = normalise_weights(settings.weights[channel:channel + 1] * present)[0]
    score = np.zeros(shape, np.float32)
    for member, value in enumerate(values):
        if value is None or not present[member]:
            continue
        levels = calibrated_levels(value, settings, channel, member)
        score += np.float32(weights[member]) * LEVELS[levels]
    return score, float(settings.thresholds[channel])


def pairwise_agreement(masks: Sequence[np.ndarray]) -> float:
    """Mean Dice over pairs of masks (two empty masks: 1); 1 with fewer than two masks."""
    scores = []
    for first in range(len(masks)):
        for second in range(first + 1, len(masks)):
            a, b = masks[first], masks[second]
            total = int(np.count_nonzero(a)) + int(np.count_nonzero(b))
            scores.append(1.0 if total == 0 else 2.0 * np.count_nonzero(a & b) / total)
    return float(np.mean(scores)) if scores else 1.0


def image_rows(stores, key: str, settings, present: np.ndarray, areas: AreaModel, record=None) -> list[QcRow]:
    """The 29 rows of one image (true Dice when ``record`` has labels)."""
    reference = next(store for store, here in zip(stores, present) if here)
    height, width = reference.image_size(key)
    truth = read_record_mask(record) if record is not None and record.label_path is not None else None
    member_boxes = [store.boxes(key) if here else [None] * NUM_CLASSES for store, here in zip(stores, present)]
    strategy = get_strategy(settings.strategy)
    rows = []
    for channel in range(NUM_CLASSES):
        box, values = class_values(stores, key, channel, present, member_boxes)
        if box is None:
            mask, disagreement, uncertainty, components, outside = None, 0.0, 0.0, 0, 0.0
        else:
            mask = apply_postprocessing(strategy.keep(values, settings, channel, present), settings.postprocess[channel])
            disagreement = 1.0 - pairwise_agreement(member_masks(values, settings, channel, present))
            score, decision = ensemble_score(values, settings, channel, present)
            near = np.abs(score - np.float32(decision)) <= BAND
            considered = int(np.count_nonzero(near | mask))
            uncertainty = int(np.count_nonzero(near)) / considered if considered else 0.0
            components, outside = pieces(mask)
        predicted = 0 if mask is None else int(np.count_nonzero(mask))
        share = predicted / float(height * width)
        signals = {"disagreement": disagreement, "uncertainty": uncertainty, "area": areas.signal(share, channel),
                   "pieces": min(1.0, 2 * outside)}
        dice = None
        if truth is not None:
            true_sum = int(np.count_nonzero(truth[channel]))
            inside = 0 if mask is None else int(np.count_nonzero(mask & truth[channel, box[0]:box[1], box[2]:box[3]]))
            dice = float(dice_from_counts(inside, predicted, true_sum))
        rows.append(QcRow(key, channel, 0.0, signals, share, int(components), dice))
    return rows


def pieces(mask: np.ndarray) -> tuple[int, float]:
    """(8-connected pieces of a mask, share of its pixels outside the largest)."""
    if not mask.any():
        return 0, 0.0
    count, _, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    sizes = stats[1:, cv2.CC_STAT_AREA]
    return count - 1, 1.0 - float(sizes.max()) / float(sizes.sum())


def score_rows(rows: Sequence[QcRow]) -> None:
    """Set each row's score (the module docstring): the mean of its signals and its strongest signal relative to
    its class's median over ``rows``, averaged."""
    for channel in range(NUM_CLASSES):
        mine = [row for row in rows if row.channel == channel]
        if not mine:
            continue
        medians = {name: float(np.median([row.signals[name] for row in mine])) for name in SIGNALS}
        for row in mine:
            strongest = max(relative(row.signals[name], medians[name]) for name in SIGNALS)
            row.score = (strongest + float(np.mean([row.signals[name] for name in SIGNALS]))) / 2


def relative(value: float, median: float) -> float:
    """How far a signal lies above its class's median, on the scale left above the median (0 at or below it)."""
    return 0.0 if median >= 1 else max(0.0, value - median) / (1.0 - median)


def validation(rows: Sequence[QcRow]) -> dict[str, float]:
    """Whether the score ranks errors: Spearman correlation of score and true Dice, recall at ``SHARE``."""
    from scipy.stats import spearmanr

    scores = np.array([row.score for row in rows])
    dice = np.array([row.dice for row in rows])
    count = max(1, int(round(SHARE * len(rows))))
    worst = set(np.argsort(dice, kind="stable")[:count].tolist())
    top = set(np.argsort(-scores, kind="stable")[:count].tolist())
    rho = spearmanr(scores, dice).statistic if np.ptp(scores) > 0 and np.ptp(dice) > 0 else float("nan")
    return {"spearman": float(rho), "recall_at_5": len(worst & top) / count, "pairs": len(rows),
            "chance_recall": count / len(rows)}


@dataclass
class RecipeStores:
    """Stores of the folds' mean (or OOF stores) checked against a recipe: the recipe and its settings, the image
    keys in competition order, the (images, members) presence matrix and each image's record in the data root."""

    stores: list[ProbabilityStore]
    recipe: Recipe
    settings: Settings
    keys: list[str]
    present: np.ndarray
    records: dict[str, ImageRecord]


def open_with_recipe(store_urls: Sequence[str | Path], recipe_path: str | Path, root: str | Path, force: bool,
                     command: str) -> RecipeStores:
    """Open the stores and check them against the recipe and the data root (``command`` names the caller in
    errors); per-fold stores, a recipe of other members and images the data root lacks are errors."""
    stores = [open_store(url) for url in store_urls]
    if any(store.fold is not None for store in stores):
        raise SegensError(f"{command} reads stores of the folds' mean (or OOF stores), not per-fold stores")
    recipe = load_recipe(recipe_path)
    check_recipe(recipe, stores, force)
    keys, present, _ = check_stores(stores, allow_missing=False)
    settings = resolve_settings(recipe.strategy, [store.member for store in stores], recipe,
                                recipe_where=str(recipe_path))
    split = "train" if stores[0].split == "oof" else "test"
    records = discover(root, split, require_labels=False).by_key()
    unknown = [key for key in keys if key not in records]
    if unknown:
        raise SegensError(f"{stores[0].url}: image {unknown[0]!r} is not in the {split} split of {root}; give the "
                          "data root the stores were predicted on")
    return RecipeStores(stores, recipe, settings, keys, present, records)


def quality_control(store_urls: Sequence[str | Path], recipe_path: str | Path, root: str | Path, out: str | Path,
                    plot: str | Path | None = None, jobs: int = 1, force: bool = False, progress: bool = True,
                    overwrite: bool = False, overlays: tuple[int, str | Path] | None = None) -> QcResult:
    """Score every (image, class) of the stores with the recipe, write ``out`` (qc.csv) and ``plot``, and with
    ``overlays`` (N, folder) the N most suspicious pairs as PNGs (segens.ensemble.qc_overlay)."""
    if overlays is not None and (isinstance(overlays[0], bool) or not isinstance(overlays[0], int) or overlays[0] < 1):
        raise SegensError(f"--overlays N DIR: N is how many pairs to draw, a whole number from 1, got {overlays[0]!r}")
    check_outputs([Output(out, "file", "--out"), Output(plot, option="--plot"),
                   Output(overlays[1] if overlays else None, "folder", "--overlays")],
                  inputs=[*store_urls, recipe_path, root], overwrite=overwrite)
    opened = open_with_recipe(store_urls, recipe_path, root, force, "qc")
    stores, recipe, settings, keys, present, records = (opened.stores, opened.recipe, opened.settings, opened.keys,
                                                        opened.present, opened.records)
    areas = area_model(root, jobs, progress)
    rows: list[QcRow] = []
    with progress_bar("img", disable=not progress) as bar:
        task = bar.add_task(f"qc ({recipe.strategy})", total=len(keys))
        tasks = (delayed(image_rows)(stores, key, settings, present[i], areas, records[key]) for i, key in enumerate(keys))
        for image in Parallel(n_jobs=jobs, return_as="generator")(tasks):
            rows.extend(image)
            bar.update(task, advance=1)
    score_rows(rows)
    images = {}
    for row in rows:
        images[row.image] = max(images.get(row.image, 0.0), row.score)
    result = QcResult(rows, images, validation(rows) if all(row.dice is not None for row in rows) else None)
    write_qc_csv(result, out)
    if plot is not None:
        plot_qc(result, plot)
    if overlays is not None:
        from segens.ensemble.qc_overlay import draw_suspects

        draw_suspects(result, stores, settings, keys, present, records, overlays[0], overlays[1])
    return result


def write_qc_csv(result: QcResult, path: str | Path) -> None:
    """qc.csv, atomically: per image its own row (class empty) then its 29 classes, image order as the stores'."""
    with atomic_write(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(COLUMNS)
        for start in range(0, len(result.rows), NUM_CLASSES):
            image = result.rows[start].image
            writer.writerow([image, "", f"{result.images[image]:.4f}"] + [""] * (len(COLUMNS) - 3))
            for row in result.rows[start:start + NUM_CLASSES]:
                writer.writerow([row.image, CLASSES[row.channel], f"{row.score:.4f}",
                                 *(f"{row.signals[name]:.4f}" for name in SIGNALS), f"{row.area_share:.6f}",
                                 row.components, "" if row.dice is None else f"{row.dice:.4f}"])


def plot_qc(result: QcResult, path: str | Path) -> Path:
    """The images ranked by score (left) and a heat map of image x class scores, most suspicious images on top."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from segens.infra.atomic import atomic_write_bytes

    order = sorted(result.images, key=lambda image: -result.images[image])
    grid = np.zeros((len(order), NUM_CLASSES))
    position = {image: index for index, image in enumerate(order)}
    for row in result.rows:
        grid[position[row.image], row.channel] = row.score
    figure, (ranked, heat) = plt.subplots(1, 2, figsize=(12, max(5, min(12, 0.12 * len(order) + 3))),
                                          gridspec_kw={"width_ratios": [1, 3]})
    ranked.plot(sorted(result.images.values(), reverse=True), range(len(order)), ".-")
    ranked.invert_yaxis()
    ranked.set_xlabel("image score (largest class score)")
    ranked.set_ylabel("images, most suspicious first")
    shown = heat.imshow(grid, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
    heat.set_xticks(range(NUM_CLASSES), CLASSES, rotation=90, fontsize=7)
    heat.set_yticks([])
    heat.set_title("qc score per image and class (higher: more likely wrong)")
    figure.colorbar(shown, ax=heat, fraction=0.03)
    figure.tight_layout()
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)
