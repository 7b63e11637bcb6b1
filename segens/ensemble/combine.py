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


def class_mask(stores: Sequence[ProbabilityStore], key: str, channel: int, settings: Settings,
               present: np.ndarray, member_boxes: Sequence[Sequence[BBox | None]]) -> tuple[BBox | None, np.ndarray]:
    """One class of one image: (union box, bool mask inside it) after voting and post-processing."""
    box = union_box([member_boxes[m][channel] for m in range(len(stores)) if present[m]])
    if box is None:
        return None, np.zeros((0, 0), dtype=bool)
    values = [store.read_region(key, channel, box) if present[m] and member_boxes[m][channel] is not None else None
              for m, store in enumerate(stores)]
    mask = get_strategy(settings.strategy).keep(values, settings, channel, present)
    return box, apply_postprocessing(mask, settings.postprocess[channel])


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
            full[channel, box[0] : box[1], box[2] : box[3]] = mask.view(np.uint8) * np.uint8(SCALE)
    if masks_out is not None:
        masks_out.write_image(key, full)
    return rles


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
            mask_store = create_mask_store(masks_location, stores[0].split, strategy, [s.member for s in stores],
                                           images=keys, overwrite=overwrite,
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
