"""``ens combine``: members' probability stores -> binary masks -> the competition CSV, one image at a time.

Strategies (one code path each; validated up front, as scikit-learn's VotingClassifier does):
- ``soft``: the mean of the members' probabilities (equal weights); keep a pixel when mean > threshold.
- ``weighted``: per class, weights normalised to sum to 1; keep a pixel when sum(w * p) > threshold.
- ``hard``: each member votes where p > its own per-class threshold; a vote counts the member's weight (1 by
  default). With ``min_votes`` a pixel is kept when its vote total >= min_votes ("reaches"); without it, when
  the total is more than half of the weight present (a strict majority: a tie at exactly half is dropped, so
  with 2 members both must agree and with 4, 3 must).

Probabilities are the stored p = v / 255 in float32, summed member by member in the given order, and
``>`` is the comparison, exactly as the straightforward full-array pipeline computes them
(segens.reference.reference_combine), so the CSVs are byte-identical. A pixel outside every member's
bounding box for a class has p = 0 in every member and can never be kept (thresholds are >= 0,
min_votes > 0), so each class is computed only inside the union of its members' boxes.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from joblib import Parallel, delayed

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.rle import BBox, encode_box
from segens.conventions.submission import image_rows, write_submission
from segens.ensemble.per_fold import combine_image_per_fold, group_by_fold
from segens.ensemble.shift import differences, region_counts, shape_of
from segens.ensemble.stores import IMAGE_SUFFIX, check_stores, union_box
from segens.errors import SegensError
from segens.infra.backend import check_backend, check_jobs, n_jobs, parallel_backend
from segens.infra.outputs import Output, check_outputs
from segens.infra.progress import progress_bar
from segens.store import SCALE, ProbabilityStore, create_mask_store, open_store
from segens.store.location import shared_location, store_options
from segens.voting import get_strategy
from segens.voting.base import Settings
from segens.voting.morphology import apply_postprocessing
from segens.voting.recipe import Recipe, load_recipe


@dataclass
class CombineSummary:
    """What a combine run wrote."""

    out: Path
    images: int
    rows: int
    seconds: float
    missing: dict[str, int] = field(default_factory=dict)  # member -> images it lacked (--allow-missing)
    shifted: dict[str, list[str]] = field(default_factory=dict)
    """Member -> classes whose maps are not like the OOF maps the recipe was fitted on (segens.ensemble.shift)."""


def parse_weights(text: str | None) -> dict[str, float] | None:
    """``vgg=2,hrnet=1,yolo=1`` -> {"vgg": 2.0, ...}; each weight a finite number >= 0, each member once."""
    if not text:
        return None
    weights: dict[str, float] = {}
    for part in text.split(","):
        name, _, value = part.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            raise SegensError(f"--weights must look like vgg=2,hrnet=1, got {part!r}") from None
        if not name:
            raise SegensError(f"--weights: {part!r} names no member; write member=weight, e.g. vgg=2")
        if name in weights:
            raise SegensError(f"--weights names member {name!r} twice; give each member one weight")
        if not np.isfinite(number) or number < 0:
            raise SegensError(f"--weights: member {name!r} has weight {value.strip()!r}; weights must be finite "
                              "numbers >= 0")
        weights[name] = number
    return weights


def resolve_settings(strategy: str, members: Sequence[str], recipe: Recipe | None = None,
                     weights: dict[str, float] | None = None, threshold: float | None = None,
                     min_votes: float | None = None, recipe_where: str = "the recipe") -> Settings:
    """Per-class settings of ``strategy`` from the command line and (if given) a recipe whose members are
    ``members`` (see segens.voting.base.Strategy.settings)."""
    return get_strategy(strategy).settings(members, recipe, weights, threshold, min_votes, recipe_where)


def check_present_weights(settings: Settings, present: np.ndarray, keys: Sequence[str], members: Sequence[str]) -> None:
    """With --allow-missing, the members present for an image must have a positive total weight in every class:
    otherwise that class could only be empty (a SegensError naming the image, class and members)."""
    patterns, first = np.unique(present, axis=0, return_index=True)
    for pattern, index in zip(patterns, first):
        totals = settings.weights[:, pattern].astype(np.float64).sum(axis=1)
        if (totals <= 0).any():
            channel = int(np.argmax(totals <= 0))
            here = ", ".join(name for name, there in zip(members, pattern) if there)
            raise SegensError(f"image {keys[index]!r}: the members present ({here}) all have weight 0 for class "
                              f"{CLASSES[channel]}, so it could only be empty; give them weight, or predict the "
                              "missing members for this image")
        if settings.min_votes is not None and (settings.min_votes > totals).any():
            channel = int(np.argmax(settings.min_votes > totals))
            here = ", ".join(name for name, there in zip(members, pattern) if there)
            whose = "the members present" if not pattern.all() else "all the members"
            raise SegensError(f"image {keys[index]!r}: {whose} ({here}) have {totals[channel]:g} votes in all for class "
                              f"{CLASSES[channel]}, fewer than the {settings.min_votes[channel]:g} it needs: it could "
                              "only be empty; ask for fewer votes (--min-votes), or give the members more weight")


def class_values(stores: Sequence[ProbabilityStore], key: str, channel: int, present: np.ndarray,
                 member_boxes: Sequence[Sequence[BBox | None]]) -> tuple[BBox | None, list[np.ndarray | None]]:
    """One class of one image: (the union of the present members' boxes, each member's uint8 values inside it or
    None where it has none)."""
    box = union_box([member_boxes[m][channel] for m in range(len(stores)) if present[m]])
    if box is None:
        return None, []
    return box, [store.read_region(key, channel, box) if present[m] and member_boxes[m][channel] is not None else None
                 for m, store in enumerate(stores)]


def class_mask(stores: Sequence[ProbabilityStore], key: str, channel: int, settings: Settings,
               present: np.ndarray, member_boxes: Sequence[Sequence[BBox | None]]) -> tuple[BBox | None, np.ndarray]:
    """One class of one image: (union box, bool mask inside it) after voting and post-processing."""
    box, values = class_values(stores, key, channel, present, member_boxes)
    return box, masked_values(values, settings, channel, present)


def masked_values(values: list[np.ndarray | None], settings: Settings, channel: int, present: np.ndarray) -> np.ndarray:
    """One class's bool mask inside its union box from the members' values there (``class_values``): the
    strategy's kept pixels, then the recipe's post-processing; a (0, 0) array when no member has a value."""
    if not values:
        return np.zeros((0, 0), dtype=bool)
    mask = get_strategy(settings.strategy).keep(values, settings, channel, present)
    return apply_postprocessing(mask, settings.postprocess[channel])


def combine_image(stores: Sequence[ProbabilityStore], key: str, settings: Settings, present: np.ndarray,
                  masks_out: ProbabilityStore | None = None) -> tuple[list[str], np.ndarray]:
    """The 29 RLE strings of one image (and its binary masks written to ``masks_out`` if given), and its maps'
    (29, M, 3) counts (segens.ensemble.shift.region_counts) for comparing them with the recipe's OOF maps."""
    reference = next(store for store, here in zip(stores, present) if here)
    height, width = reference.image_size(key)
    member_boxes = [store.boxes(key) if here else [None] * NUM_CLASSES for store, here in zip(stores, present)]
    rles = []
    counts = np.zeros((NUM_CLASSES, len(stores), 3), np.int64)
    full = np.zeros((NUM_CLASSES, height, width), dtype=np.uint8) if masks_out is not None else None
    for channel in range(NUM_CLASSES):
        box, values = class_values(stores, key, channel, present, member_boxes)
        for member, value in enumerate(values):
            if value is not None:
                counts[channel, member] = region_counts(value)
        mask = masked_values(values, settings, channel, present)
        rles.append(encode_box(mask, box, width))
        if full is not None and box is not None:
            full[channel, box[0] : box[1], box[2] : box[3]] = mask.view(np.uint8) * np.uint8(SCALE)
    if masks_out is not None:
        masks_out.write_image(key, full)
    return rles, counts


def check_recipe(recipe: Recipe, stores: Sequence[ProbabilityStore], force: bool) -> None:
    """The recipe's members must be the stores' members, with the same checkpoints (unless ``force``)."""
    names = [store.member for store in stores]
    problems = []
    if sorted(recipe.member_names) != sorted(names):
        problems.append(f"the recipe's members are {', '.join(recipe.member_names)}, the stores' are {', '.join(names)}")
    for member in recipe.members:
        store = next((s for s in stores if s.member == member["name"]), None)
        if store is None:
            continue
        recorded = member.get("checkpoints") or {}
        if store.fold is not None:  # a fold model's own maps: its one checkpoint must be the recipe's of that fold
            recorded = {str(store.fold): recorded.get(str(store.fold))}
        wanted = sorted(str(sha) for sha in recorded.values())
        have = sorted(str(checkpoint["sha256"]) for checkpoint in store.checkpoints.values())
        if wanted != have:
            problems.append(f"{store.url}: its checkpoints differ from those the recipe was searched on")
    if problems and not force:
        raise SegensError("; ".join(problems) + " (pass --force to combine anyway)")
    if problems:
        warnings.warn("; ".join(problems), stacklevel=2)
    if sorted(recipe.member_names) != sorted(names) and force and set(names) - set(recipe.member_names):
        raise SegensError("stores given for members the recipe has no weights for: "
                          f"{', '.join(sorted(set(names) - set(recipe.member_names)))}")


def _combine_one(stores, key, settings, present, masks_out) -> tuple[str, list[str], np.ndarray, int]:
    rles, counts = combine_image(stores, key, settings, present, masks_out)
    height, width = next(store for store, here in zip(stores, present) if here).image_size(key)
    return key, rles, counts, height * width


def _combine_one_per_fold(by_fold, key, settings, masks_out) -> tuple[str, list[str], np.ndarray, int]:
    rles, counts = combine_image_per_fold(by_fold, key, settings, masks_out)
    height, width = by_fold[0][0].image_size(key)
    return key, rles, counts, height * width * len(by_fold)


def combine(store_urls: Sequence[str | Path], out: str | Path, strategy: str | None = None,
            recipe_path: str | Path | None = None,
            weights: dict[str, float] | None = None, threshold: float | None = None, min_votes: float | None = None,
            allow_missing: bool = False, force: bool = False, masks_out: str | Path | None = None, jobs: int = 1,
            progress: bool = True, backend: str = "local", scheduler: str | None = None,
            storage_options: dict | None = None, overwrite: bool = False) -> CombineSummary:
    """Combine stores into a submission CSV, written atomically; every check runs before anything is written.
    An existing ``out`` or ``masks_out`` is replaced only with ``overwrite``; one of the inputs never is.
    ``strategy``: the recipe's when one is given (naming another is an error), else ``soft``. Stores of single
    folds (``predict-member --per-fold``) are combined fold by fold and merged (segens.ensemble.per_fold).

    Images are combined by ``jobs`` local processes, or with ``backend="dask"`` by the workers of the Dask
    scheduler at ``scheduler``, which read the stores themselves (shared file system, or URLs such as
    s3://bucket/m.test.zarr opened with ``storage_options``); this process writes the CSV, identical either way.
    """
    started = time.perf_counter()
    check_backend(backend, scheduler)
    check_jobs(jobs)
    if not store_urls:
        raise SegensError("give at least one store")
    check_outputs([Output(out, "file", "--out"), Output(masks_out, "store", "--masks-out")],
                  inputs=[*store_urls, recipe_path], overwrite=overwrite)
    locations = [shared_location(url, backend) for url in store_urls]
    stores = [open_store(location, store_options(location, storage_options)) for location in locations]
    by_fold = None
    if any(store.fold is not None for store in stores):  # per-fold test stores: the recipe on each fold's maps
        if allow_missing:
            raise SegensError("--allow-missing is for stores of folds' means; per-fold stores must be complete")
        _, _, by_fold = group_by_fold(stores)
        stores = by_fold[0]
    recipe = load_recipe(recipe_path) if recipe_path is not None else None
    if recipe is not None:
        for fold_stores in by_fold or [stores]:
            check_recipe(recipe, fold_stores, force)
        if strategy is not None and recipe.strategy != strategy:
            raise SegensError(f"{recipe_path}: the recipe is for strategy {recipe.strategy!r}, not {strategy!r}; "
                              "leave --strategy out to use the recipe's")
        strategy = recipe.strategy
    strategy = strategy or "soft"
    keys, present, missing = check_stores(stores, allow_missing)
    for fold_stores in (by_fold or [])[1:]:
        if check_stores(fold_stores, False)[0] != keys:
            raise SegensError(f"{fold_stores[0].url}: planned for other images than {stores[0].url}")
    settings = resolve_settings(strategy, [store.member for store in stores], recipe, weights, threshold, min_votes,
                                recipe_where=str(recipe_path))
    check_present_weights(settings, present, keys, [store.member for store in stores])
    with parallel_backend(backend, scheduler):  # reach the cluster before anything is written
        mask_store = None
        if masks_out is not None:
            masks_location = shared_location(masks_out, backend)
            mask_store = create_mask_store(masks_location, stores[0].split, strategy, [s.member for s in stores],
                                           images=keys, overwrite=overwrite,
                                           storage_options=store_options(masks_location, storage_options))
        tasks = (delayed(_combine_one)(stores, key, settings, present[index], mask_store) if by_fold is None else
                 delayed(_combine_one_per_fold)(by_fold, key, settings, mask_store) for index, key in enumerate(keys))

        counts, pixels = np.zeros((NUM_CLASSES, len(stores), 3), np.int64), [0]

        def rows():
            with progress_bar("img", disable=not progress) as bar:
                task = bar.add_task(f"combine ({strategy})", total=len(keys))
                for key, rles, image_counts, image_pixels in Parallel(n_jobs=n_jobs(backend, jobs),
                                                                      return_as="generator")(tasks):
                    bar.update(task, advance=1)
                    counts[...] += image_counts
                    pixels[0] += image_pixels
                    yield from image_rows(key.rsplit("/", 1)[-1] + IMAGE_SUFFIX, rles)

        count = write_submission(out, rows())
    shifted = {}
    if recipe is not None and recipe.maps:
        observed = {store.member: [shape_of(counts[channel, [m]], pixels[0])[0] for channel in range(NUM_CLASSES)]
                    for m, store in enumerate(stores)}
        shifted = differences(recipe.maps, observed)
    return CombineSummary(Path(out), len(keys), count, time.perf_counter() - started, missing, shifted)
