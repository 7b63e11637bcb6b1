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

from segens.infra.backend import check_backend, check_jobs, n_jobs, parallel_backend
from segens.store.location import shared_location, store_options
from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import check_unique_file_names
from segens.ensemble.morphology import apply_postprocessing
from segens.ensemble.recipe import STRATEGIES, Recipe, check_class_weights, load_recipe
from segens.errors import SegensError
from segens.store import ProbabilityStore, create_store, open_store
from segens.infra.outputs import Output, check_outputs
from segens.infra.progress import progress_bar
from segens.conventions.rle import BBox, encode_box
from segens.conventions.submission import image_rows, write_submission

IMAGE_SUFFIX = ".png"  # stores key images by relative path without extension; the competition's images are PNG


@dataclass
class Settings:
    """Resolved per-class settings for the members, in store order."""

    strategy: str
    weights: np.ndarray  # (29, M) float32: normalised per class for soft/weighted, raw vote weights for hard
    thresholds: np.ndarray  # (29,) float32, soft/weighted: keep p > threshold
    member_thresholds: np.ndarray  # (29, M) float32, hard: a member votes where p > its threshold
    min_votes: np.ndarray | None  # (29,) float64, hard: keep votes >= min_votes; None: votes > half the weight
    postprocess: list[list[str]] = field(default_factory=lambda: [[] for _ in CLASSES])


@dataclass
class CombineSummary:
    """What a combine run wrote."""

    out: Path
    images: int
    rows: int
    seconds: float
    missing: dict[str, int] = field(default_factory=dict)  # member -> images it lacked (--allow-missing)


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
    """Per-class settings from the command line and (if given) a recipe whose members are ``members``.

    Weights must be finite, >= 0, with a positive finite total per class; thresholds finite in [0, 1) (also
    after rounding to float32, the type they are compared in); min_votes finite and > 0. Command-line values
    override the recipe's; errors name the option (or ``recipe_where``) and the class.
    """
    if strategy not in STRATEGIES:
        raise SegensError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
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
    if strategy == "soft":
        raw = np.ones((NUM_CLASSES, count))
    check_class_weights(raw, strategy == "hard", weights_from.removesuffix(": weights"))
    thresholds, thresholds_from = np.full(NUM_CLASSES, 0.5), "thresholds"
    if recipe is not None and recipe.thresholds is not None:
        thresholds, thresholds_from = np.asarray(recipe.thresholds, dtype=np.float64), f"{recipe_where}: thresholds"
    member_thresholds = np.full((NUM_CLASSES, count), 0.5)
    if recipe is not None and recipe.member_thresholds is not None:
        member_thresholds = np.asarray(recipe.member_thresholds, dtype=np.float64)[
            :, [recipe.member_names.index(n) for n in members]]
    if threshold is not None:
        _check_threshold(np.full(NUM_CLASSES, threshold, dtype=np.float64), "--threshold")
        thresholds = np.full(NUM_CLASSES, threshold)
        member_thresholds = np.full((NUM_CLASSES, count), threshold)
    _check_threshold(thresholds, thresholds_from)
    _check_threshold(member_thresholds, f"{recipe_where}: member_thresholds")
    votes = None
    if min_votes is not None:
        if not (np.isfinite(min_votes) and min_votes > 0):
            raise SegensError(f"--min-votes must be a finite number > 0, got {min_votes}")
        votes = np.full(NUM_CLASSES, float(min_votes))
    elif recipe is not None and recipe.min_votes is not None:
        votes = np.asarray(recipe.min_votes, dtype=np.float64)
        bad = ~(np.isfinite(votes) & (votes > 0))
        if bad.any():
            raise SegensError(f"{recipe_where}: min_votes of class {CLASSES[int(np.argmax(bad))]} must be a finite "
                              f"number > 0, got {votes[bad][0]}")
    normalised = raw.astype(np.float32) if strategy == "hard" else normalise_weights(raw)
    postprocess = recipe.postprocess if recipe is not None else [[] for _ in CLASSES]
    return Settings(strategy, normalised, thresholds.astype(np.float32),
                    member_thresholds.astype(np.float32), votes, postprocess)


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


def _check_threshold(values: np.ndarray, where: str) -> None:
    """Thresholds (per class, or (class, member)) finite in [0, 1), also once rounded to float32."""
    with np.errstate(over="ignore", invalid="ignore"):
        rounded = values.astype(np.float32)
        bad = ~((values >= 0) & (values < 1) & (rounded < 1))
    if bad.any():
        index = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise SegensError(f"{where}: threshold {values[index]} (class {CLASSES[index[0]]}) must be a finite number in "
                          "[0, 1): a pixel is kept when p > threshold")


def normalise_weights(raw: np.ndarray) -> np.ndarray:
    """Weights (..., M) scaled to sum to 1 along the last axis in float64, then float32: the one rule both
    combine and the weight search use, so that a searched recipe reproduces its scores exactly."""
    raw = np.asarray(raw, dtype=np.float64)
    return (raw / raw.sum(axis=-1, keepdims=True)).astype(np.float32)


def union_box(boxes: Sequence[BBox | None]) -> BBox | None:
    present = [box for box in boxes if box is not None]
    if not present:
        return None
    return (min(b[0] for b in present), max(b[1] for b in present), min(b[2] for b in present),
            max(b[3] for b in present))


def class_mask(stores: Sequence[ProbabilityStore], key: str, channel: int, settings: Settings,
               present: np.ndarray, member_boxes: Sequence[Sequence[BBox | None]]) -> tuple[BBox | None, np.ndarray]:
    """One class of one image: (union box, bool mask inside it) after voting and post-processing."""
    box = union_box([member_boxes[m][channel] for m in range(len(stores)) if present[m]])
    if box is None:
        return None, np.zeros((0, 0), dtype=bool)
    shape = (box[1] - box[0], box[3] - box[2])
    if settings.strategy == "hard":
        votes = np.zeros(shape, dtype=np.float64)
        for m, store in enumerate(stores):
            if present[m] and member_boxes[m][channel] is not None:
                p = store.read_region(key, channel, box).astype(np.float32) / np.float32(255)
                votes += np.float64(settings.weights[channel, m]) * (p > settings.member_thresholds[channel, m])
        if settings.min_votes is not None:
            mask = votes >= settings.min_votes[channel]
        else:
            mask = votes > np.float64(settings.weights[channel, present].astype(np.float64).sum()) / 2
    else:
        weights = settings.weights[channel] if present.all() else _renormalised(settings.weights[channel], present)
        total = np.zeros(shape, dtype=np.float32)
        for m, store in enumerate(stores):
            if present[m] and member_boxes[m][channel] is not None:
                total += weights[m] * (store.read_region(key, channel, box).astype(np.float32) / np.float32(255))
        mask = total > settings.thresholds[channel]
    return box, apply_postprocessing(mask, settings.postprocess[channel])


def _renormalised(weights: np.ndarray, present: np.ndarray) -> np.ndarray:
    kept = np.where(present, weights.astype(np.float64), 0.0)
    return (kept / kept.sum()).astype(np.float32)


def combine_image(stores: Sequence[ProbabilityStore], key: str, settings: Settings, present: np.ndarray,
                  masks_out: ProbabilityStore | None = None) -> list[str]:
    """The 29 RLE strings of one image (and its binary masks written to ``masks_out`` if given)."""
    reference = next(store for store, here in zip(stores, present) if here)
    height, width = reference.image_size(key)
    member_boxes = [store.boxes(key) if here else [None] * NUM_CLASSES for store, here in zip(stores, present)]
    rles = []
    full = np.zeros((NUM_CLASSES, height, width), dtype=np.uint8) if masks_out is not None else None
    for channel in range(NUM_CLASSES):
        box, mask = class_mask(stores, key, channel, settings, present, member_boxes)
        rles.append(encode_box(mask, box, width))
        if full is not None and box is not None:
            full[channel, box[0] : box[1], box[2] : box[3]] = mask.view(np.uint8) * np.uint8(255)
    if masks_out is not None:
        masks_out.write_image(key, full)
    return rles


def check_stores(stores: Sequence[ProbabilityStore], allow_missing: bool) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Image keys in competition order and an (images, members) presence matrix; mismatches are errors."""
    first = stores[0]
    names = [store.member for store in stores]
    if len(set(names)) != len(names):
        raise SegensError(f"two stores hold the same member name ({', '.join(names)}); each member once")
    for store in stores[1:]:
        if list(store.classes) != list(first.classes):
            raise SegensError(f"{store.url}: class list differs from {first.url}'s")
        if store.split != first.split:
            raise SegensError(f"{store.url}: split {store.split!r} differs from {first.url}'s {first.split!r}")
    if list(first.classes) != list(CLASSES):
        raise SegensError(f"{first.url}: its class list is not the competition's 29 classes")
    for store in stores[1:]:
        if store.planned != first.planned:
            only = sorted(set(store.planned) ^ set(first.planned))[0]
            holder = first if only in first.planned else store
            raise SegensError(f"{store.url}: planned for other images than {first.url} (e.g. {only!r} is planned "
                              f"only in {holder.url}); predict every member on the same data root and split")
    keys = sorted(first.planned, key=lambda key: key + IMAGE_SUFFIX)
    check_unique_file_names(keys, first.url, IMAGE_SUFFIX)
    key_sets = [store.completed() for store in stores]
    present = np.array([[key in key_set for key_set in key_sets] for key in keys], dtype=bool).reshape(len(keys), len(stores))
    nowhere = [key for key, row in zip(keys, present) if not row.any()]
    if nowhere:
        more = f" (and {len(nowhere) - 1} more)" if len(nowhere) > 1 else ""
        raise SegensError(f"image {nowhere[0]!r}{more} is planned for these stores but complete in none of them "
                          "(never written, killed mid-write, or its metadata is unreadable or damaged); run `ens "
                          "predict-member` for the members to finish it: a submission may not miss an image")
    missing = {store.member: int((~present[:, m]).sum()) for m, store in enumerate(stores) if not present[:, m].all()}
    if missing and not allow_missing:
        m = next(index for index, store in enumerate(stores) if store.member in missing)
        first_missing = keys[int(np.argmin(present[:, m]))]
        raise SegensError(f"{stores[m].url}: lacks {missing[stores[m].member]} image(s) the other stores have, first "
                          f"{first_missing!r}; predict them, or pass --allow-missing to drop the member there")
    for index, key in enumerate(keys):
        sizes = {stores[m].image_size(key) for m in range(len(stores)) if present[index, m]}
        if len(sizes) > 1:
            detail = ", ".join(f"{store.url}: {store.image_size(key)}" for m, store in enumerate(stores)
                               if present[index, m])
            raise SegensError(f"image {key!r} has different sizes in the stores ({detail})")
    return keys, present, missing


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
        wanted = sorted(str(sha) for sha in (member.get("checkpoints") or {}).values())
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


def _combine_one(stores, key, settings, present, masks_out) -> tuple[str, list[str]]:
    return key, combine_image(stores, key, settings, present, masks_out)


def combine(store_urls: Sequence[str | Path], out: str | Path, strategy: str = "soft", recipe_path: str | Path | None = None,
            weights: dict[str, float] | None = None, threshold: float | None = None, min_votes: float | None = None,
            allow_missing: bool = False, force: bool = False, masks_out: str | Path | None = None, jobs: int = 1,
            progress: bool = True, backend: str = "local", scheduler: str | None = None,
            storage_options: dict | None = None, overwrite: bool = False) -> CombineSummary:
    """Combine stores into a submission CSV, written atomically; every check runs before anything is written.
    An existing ``out`` or ``masks_out`` is replaced only with ``overwrite``; one of the inputs never is.

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
    recipe = load_recipe(recipe_path) if recipe_path is not None else None
    if recipe is not None:
        check_recipe(recipe, stores, force)
        if recipe.strategy != strategy:
            raise SegensError(f"{recipe_path}: the recipe is for strategy {recipe.strategy!r}, not {strategy!r}")
    keys, present, missing = check_stores(stores, allow_missing)
    settings = resolve_settings(strategy, [store.member for store in stores], recipe, weights, threshold, min_votes,
                                recipe_where=str(recipe_path))
    check_present_weights(settings, present, keys, [store.member for store in stores])
    with parallel_backend(backend, scheduler):  # reach the cluster before anything is written
        mask_store = None
        if masks_out is not None:
            masks_location = shared_location(masks_out, backend)
            mask_store = create_store(masks_location, "ensemble", "combined", stores[0].split,
                                      {"strategy": strategy, "members": [s.member for s in stores]}, {}, images=keys,
                                      overwrite=overwrite,
                                      storage_options=store_options(masks_location, storage_options))
        tasks = (delayed(_combine_one)(stores, key, settings, present[index], mask_store)
                 for index, key in enumerate(keys))

        def rows():
            with progress_bar("img", disable=not progress) as bar:
                task = bar.add_task(f"combine ({strategy})", total=len(keys))
                for key, rles in Parallel(n_jobs=n_jobs(backend, jobs), return_as="generator")(tasks):
                    bar.update(task, advance=1)
                    yield from image_rows(key.rsplit("/", 1)[-1] + IMAGE_SUFFIX, rles)

        count = write_submission(out, rows())
    return CombineSummary(Path(out), len(keys), count, time.perf_counter() - started, missing)
