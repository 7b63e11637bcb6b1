"""The exact weight search of ``ens search-weights`` against brute force at full resolution, per class.

ours:        segens.search.evidence.extract_class (one read of each image's class region, fixed pixels counted
             once, ambiguous pixels kept) + ClassScorer.scores for every candidate: (candidates, 255) Dice.
brute force: per image, each member's full 2048x2048 class map read as float32 (p = v / 255) and the full
             ground truth, once; then per candidate and image the weighted sum exactly as combine computes it
             (float32, member order, normalise_weights) and all 255 thresholds at once by a sorted count
             (searchsorted of s into the thresholds = how many thresholds s is ``>``, bincount, reverse cumsum),
             Dice per image, mean over images. This is the fast way to write it; a loop of ``s > t`` over the
             255 thresholds is timed once on one candidate and image, for comparison.

Both give (candidates, 255) score tables that must be identical (np.array_equal) with the same best
(candidate, threshold). The candidates are base_candidates(3 members, --step, "weighted"): equal weights, each
member alone, the simplex grid. Brute force is slow, so by default it runs on a subset of the candidates (always
the equal weights and ours' best) and its time is extrapolated linearly: reading time + mean seconds per
candidate x all candidates; the output says so. Medians over --repeats, ours and brute force alternating.

    .venv/bin/python -m bench.bench_search [--images 10] [--classes finger-4 Capitate Radius] [--repeats 2]
                                           [--brute-candidates 4] [--step 0.1] [--workdir DIR]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from bench.common import DEFAULT_WORKDIR, load_average, machine_line, median, peak_rss_mb, print_table, row, timed
from bench.common import stores_parser
from bench.fixture import BenchData, bench_data
from segens.conventions.classes import CLASSES, class_index
from segens.conventions.dataset import ImageRecord
from segens.conventions.dice import dice_from_counts
from segens.search.evidence import ClassEvidence, class_truth, extract_class, threshold_grid
from segens.search.levels import Subsets
from segens.search.scorer import ClassScorer
from segens.voting.base import best_cell
from segens.voting.mean import base_candidates
from segens.voting.rules import normalise_weights

DEFAULT_CLASSES = ("finger-4", "Capitate", "Radius")  # a finger bone, a carpal bone, the radius


# ---- ours --------------------------------------------------------------------------------------------------


def ours(stores: Sequence, records: Sequence[ImageRecord], channel: int, candidates: np.ndarray,
         thresholds: np.ndarray) -> tuple[np.ndarray, ClassEvidence, float]:
    """(C, K) mean Dice of every candidate and threshold, the evidence, and the seconds extraction took."""
    extract_seconds, evidence = timed(extract_class, stores, records, channel, thresholds)
    search = ClassScorer(evidence, Subsets(["all"], np.ones((1, len(records)), bool)), thresholds)
    return np.stack([search.scores(weights)[0] for weights in candidates]), evidence, extract_seconds


# ---- brute force -------------------------------------------------------------------------------------------


@dataclass
class FullClass:
    """One class of every image at full resolution: members' float32 maps and the bool truth."""

    probabilities: list[list[np.ndarray]]  # [image][member] (H, W) float32, p = v / 255
    truth: list[np.ndarray]  # [image] (H, W) bool


def load_full(store_paths: Sequence[Path], records: Sequence[ImageRecord], channel: int) -> FullClass:
    """Read each member's full class map with zarr as float32, and rasterise the truth, once per image."""
    groups = [zarr.open_group(str(path), mode="r") for path in store_paths]
    probabilities, truth = [], []
    for record in records:
        maps = [group[record.key][channel].astype(np.float32) / np.float32(255) for group in groups]
        probabilities.append(maps)
        truth.append(class_truth(record, channel, maps[0].shape))
    return FullClass(probabilities, truth)


def weighted_sum(maps: Sequence[np.ndarray], weights: np.ndarray) -> np.ndarray:
    """s = sum_m w_m * p_m in float32, member by member, as ens combine computes it."""
    total = np.zeros(maps[0].shape, np.float32)
    for weight, p in zip(weights, maps):
        total += weight * p
    return total


def sweep_sorted(total: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(K,) Dice of ``total > t`` for every threshold: counts from searchsorted + bincount."""
    levels = thresholds.size
    below = np.searchsorted(thresholds, total.ravel(), side="left")  # thresholds strictly below s: s > t
    positives = np.bincount(below, minlength=levels + 1)
    true_positives = np.bincount(below[truth.ravel()], minlength=levels + 1)
    above = np.cumsum(positives[::-1])[::-1][1:]  # pixels with s > thresholds[k]
    true_above = np.cumsum(true_positives[::-1])[::-1][1:]
    return dice_from_counts(true_above, above, np.count_nonzero(truth))


def sweep_loop(total: np.ndarray, truth: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(K,) Dice the plainest way: a mask per threshold."""
    truth_sum = np.count_nonzero(truth)
    scores = np.empty(thresholds.size)
    for k, threshold in enumerate(thresholds):
        mask = total > threshold
        scores[k] = dice_from_counts(np.count_nonzero(mask & truth), np.count_nonzero(mask), truth_sum)
    return scores


def brute_candidate(full: FullClass, weights: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """(K,) mean Dice over images of one raw weight vector at full resolution."""
    normalised = normalise_weights(weights)
    per_image = np.stack([sweep_sorted(weighted_sum(maps, normalised), truth, thresholds)
                          for maps, truth in zip(full.probabilities, full.truth)])
    return per_image.mean(axis=0)


def brute_force(store_paths: Sequence[Path], records: Sequence[ImageRecord], channel: int, candidates: np.ndarray,
                thresholds: np.ndarray) -> tuple[np.ndarray, float, list[float]]:
    """(C, K) scores, seconds to read everything, seconds per candidate."""
    read_seconds, full = timed(load_full, store_paths, records, channel)
    scores, seconds = [], []
    for weights in candidates:
        elapsed, score = timed(brute_candidate, full, weights, thresholds)
        scores.append(score)
        seconds.append(elapsed)
    return np.stack(scores), read_seconds, seconds


def loop_vs_sorted(store_paths: Sequence[Path], record: ImageRecord, channel: int,
                   thresholds: np.ndarray) -> tuple[float, float]:
    """Seconds of the per-threshold loop and of the sorted sweep, one image, equal weights (results equal)."""
    full = load_full(store_paths, [record], channel)
    total = weighted_sum(full.probabilities[0], normalise_weights(np.ones(len(store_paths))))
    loop_seconds, looped = timed(sweep_loop, total, full.truth[0], thresholds)
    sorted_seconds, swept = timed(sweep_sorted, total, full.truth[0], thresholds)
    assert np.array_equal(looped, swept), "the two brute-force sweeps disagree"
    return loop_seconds, sorted_seconds


# ---- the comparison ----------------------------------------------------------------------------------------


def subset_of(count: int, wanted: int, best: int) -> np.ndarray:
    """Sorted candidate indices for brute force: evenly spaced from 0 (equal weights), plus ours' best."""
    if wanted >= count:
        return np.arange(count)
    spread = max(1, wanted - 1)
    chosen = set(np.linspace(0, count - 1, spread).round().astype(int).tolist()) | {best}
    while len(chosen) < wanted:  # ours' best was among the spaced ones: space one more
        spread += 1
        chosen = set(np.linspace(0, count - 1, spread).round().astype(int).tolist()) | {best}
    return np.array(sorted(chosen))


@dataclass
class ClassTiming:
    """One class: median seconds of ours and of brute force (extrapolated to all candidates), and facts."""

    name: str
    ours_seconds: float
    extract_seconds: float  # of ours_seconds, reading and extracting the evidence
    brute_seconds: float
    brute_measured: float
    brute_candidates: int
    candidates: int
    ambiguous_fraction: float
    best: tuple[int, int]


def compare_class(data: BenchData, stores: Sequence, channel: int, candidates: np.ndarray, thresholds: np.ndarray,
                  repeats: int, brute_wanted: int) -> ClassTiming:
    """Ours and brute force alternating; scores and choices checked identical every repeat."""
    ours_times, extract_times, brute_times, measured = [], [], [], []
    subset = None
    for _ in range(repeats):
        elapsed, (scores, evidence, extract_seconds) = timed(ours, stores, data.records, channel, candidates,
                                                             thresholds)
        ours_times.append(elapsed)
        extract_times.append(extract_seconds)
        best = best_cell(scores)
        subset = subset_of(len(candidates), brute_wanted, best[0]) if subset is None else subset
        brute, read_seconds, per_candidate = brute_force(data.stores, data.records, channel, candidates[subset],
                                                         thresholds)
        if not np.array_equal(scores[subset], brute):
            raise AssertionError(f"{CLASSES[channel]}: scores differ from brute force")
        brute_best = best_cell(brute)
        if (subset[brute_best[0]], brute_best[1]) != best:
            raise AssertionError(f"{CLASSES[channel]}: brute force chooses another candidate")
        measured.append(read_seconds + sum(per_candidate))
        brute_times.append(read_seconds + float(np.mean(per_candidate)) * len(candidates))
    size = data.size * data.size * len(data.records)
    return ClassTiming(CLASSES[channel], median(ours_times), median(extract_times), median(brute_times),
                       median(measured), len(subset), len(candidates), evidence.ambiguous_pixels / size, best)


def run(workdir: Path = DEFAULT_WORKDIR, images: int = 10, classes: Sequence[str] = DEFAULT_CLASSES,
        repeats: int = 2, brute_candidates: int = 4, step: float = 0.1, size: int = 2048, store_images: int = 20,
        verbose: bool = True) -> list[dict[str, Any]]:
    """Per class: ours vs brute force; rows for the summary table."""
    from segens.store import open_store

    say = print if verbose else (lambda *_: None)
    data = bench_data(workdir, max(store_images, images), size, log=say)
    data = BenchData(data.root, data.stores, data.records[:images], data.size)
    stores = [open_store(path) for path in data.stores]
    thresholds = threshold_grid()
    candidates = base_candidates(len(stores), step, "weighted")
    ours(stores, data.records[:1], class_index(classes[0]), candidates[:1], thresholds)  # load numba kernels
    say(f"{len(data.records)} OOF images x {len(stores)} members at {size}x{size}, {len(candidates)} candidates x "
        f"{thresholds.size} thresholds; load average before {load_average()}")
    loop_s, sorted_s = loop_vs_sorted(data.stores, data.records[0], class_index(classes[0]), thresholds)
    say(f"brute-force sweep of one image and candidate: loop of 255 masks {loop_s:.3f} s, sorted counts "
        f"{sorted_s:.3f} s (the benchmark uses the sorted counts)")
    rows = []
    for name in classes:
        timing = compare_class(data, stores, class_index(name), candidates, thresholds, repeats, brute_candidates)
        extrapolated = timing.brute_candidates < timing.candidates
        how = (f"brute force run on {timing.brute_candidates}/{timing.candidates} candidates "
               f"({timing.brute_measured:.1f} s), EXTRAPOLATED linearly" if extrapolated
               else f"brute force run on all {timing.candidates} candidates")
        say(f"{name}: identical (candidates, 255) scores and best {timing.best}; ambiguous pixels "
            f"{100 * timing.ambiguous_fraction:.3f}%; ours {timing.ours_seconds:.2f} s of which extraction "
            f"{timing.extract_seconds:.2f} s; {how}; load average {load_average()}")
        rows.append(row(f"search {name}, {timing.candidates} cand. x 255 thr., {len(data.records)} img",
                        timing.ours_seconds, timing.brute_seconds, "s",
                        f"ambiguous {100 * timing.ambiguous_fraction:.2f}% of pixels; "
                        + (f"brute extrapolated from {timing.brute_candidates} cand." if extrapolated
                           else "brute on all"),
                        peak_rss_mb()))
    return rows


def main() -> None:
    parser = stores_parser(__doc__, images=10, repeats=2)  # --images: OOF images used (of the cached 20)
    parser.add_argument("--classes", nargs="+", default=list(DEFAULT_CLASSES))
    parser.add_argument("--brute-candidates", type=int, default=4,
                        help="candidates brute force really runs (the rest extrapolated); 0 or more than all: all")
    parser.add_argument("--step", type=float, default=0.1)
    args = parser.parse_args()
    wanted = args.brute_candidates if args.brute_candidates > 0 else 10**9
    rows = run(args.workdir, args.images, args.classes, args.repeats, wanted, args.step, args.size)
    print(machine_line())
    print_table(rows)


if __name__ == "__main__":
    main()
