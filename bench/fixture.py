"""The benchmarks' one synthetic-member fixture: a synthetic data set (800 + 300 images at 2048 for
``bench/scale.py``, 20 training images for the combine and search benchmarks) and, per member, an OOF store and a
test store that behave like strong, diverse, imperfect models.

These stores are made from the ground truth through the error model below and written through the store API.
They are a benchmark fixture: no model is trained, and no member kind makes them.

Error model, per image, class and member (lengths in pixels at 2048, scaled with the image side):
- the member's logit is ``(signed distance to the true boundary + shift) / width``: soft boundaries whose width
  is the member's (0.8-2.2 px);
- ``shift`` moves the boundary outward (+) or inward (-). It sums a systematic part per member and class (its
  calibration: the member's best threshold is not 0.5, and differs per class), a part per fold model (OOF images
  are predicted by their fold's model; test images by the mean of the five), a per-image part shared by every
  member (hard images are hard for all: correlated errors) and the member's own per-image part;
- a smooth displacement field (a few px wavelength, sub-pixel to pixel amplitude), part shared and part own, and a
  sub-pixel translation of the whole bone;
- small carpal bones are occasionally missed (the logit drops by 7: p < 0.03 nearly everywhere), more often for all
  members at once on a hard image, and occasionally merged with a neighbouring carpal bone;
- where carpal bones touch or overlap, each member bleeds into the neighbour (false positives near the overlap);
- p < 0.03 is written as 0, as predict-member's outputs are.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import ImageRecord, discover, read_record_mask
from segens.folds.file import save_folds
from segens.folds.splits import make_folds
from segens.store import create_store, open_store
from segens.store.format import attributes_digest, store_id
from segens.store.image import with_digest
from segens.synth import generate

FIXTURE_VERSION = 1
CUT = 0.03
MARGIN = 16  # px at 2048 around each bone where a member's map may be non-zero
CARPALS = [CLASSES.index(name) for name in ("Trapezium", "Trapezoid", "Capitate", "Hamate", "Scaphoid", "Lunate",
                                            "Triquetrum", "Pisiform")]


@dataclass(frozen=True)
class MemberErrors:
    """How one fixture member errs (px at 2048): boundary width, systematic shift (mean, spread over classes),
    per-fold and per-image shift spreads, displacement-field amplitude, carpal miss rate, bleed into neighbours."""

    name: str
    width: float
    bias: float
    bias_spread: float
    fold_spread: float
    image_spread: float
    field: float
    miss_rate: float
    bleed: float


MEMBERS = (
    MemberErrors("unetpp-vgg19", 1.1, 0.5, 1.0, 0.4, 0.9, 0.9, 0.010, 0.8),
    MemberErrors("unetpp-hrnet64", 0.8, -0.3, 0.8, 0.35, 0.8, 0.8, 0.008, 0.5),
    MemberErrors("yolov8-seg", 2.2, -0.9, 1.2, 0.5, 1.1, 1.3, 0.020, 1.2),
    MemberErrors("unetpp-effb4", 1.0, 0.2, 0.9, 0.4, 0.85, 0.85, 0.012, 0.7),
    MemberErrors("unet-resnet50", 1.4, -0.1, 1.1, 0.45, 0.95, 1.0, 0.015, 1.0),
)
NULL_MEMBERS = tuple(MemberErrors(f"equal-{number}", 1.1, 0.0, 0.0, 0.0, 0.9, 0.9, 0.010, 0.0)
                     for number in range(1, 6))
"""The null mode: members equally good and calibrated (no systematic shift, per class or per fold, and no bleeding
into or merging with neighbouring carpal bones, which every member would share as over-segmentation), their
errors independent but for the parts every member shares (per image, the displacement field, missed carpals):
the plain mean at 0.5 is the right rule, and a search has nothing to gain."""
OVERCONFIDENT = MemberErrors("unet-dice-loss", 0.2, 0.0, 0.5, 0.35, 1.6, 1.1, 0.015, 0.6)
"""Right in shape on average (no systematic shift) but strongly over-confident, as networks trained with a Dice
loss are: its boundary is a step a fifth of a pixel wide, so it says 0 or 1 where it is wrong too (its per-image
boundary errors are the largest of all). A threshold cannot soften a step; a calibration can."""
MODES = {"strong": MEMBERS, "null": NULL_MEMBERS, "calibration": (*MEMBERS[:4], OVERCONFIDENT)}
"""calibration: the strong members with the fifth replaced by the over-confident one."""
SHARED_IMAGE_SPREAD = 0.6  # px: the per-image shift every member shares
SHARED_FIELD = 0.7  # px: the displacement field every member shares
SHARED_MISS_RATE = 0.006  # per carpal and image: all members miss it (weakly)
MERGE_RATE = 0.006  # per carpal, image and member
TRANSLATION = 0.35  # px: sub-pixel translation of the whole bone, per member and image
FOLD_JITTER = 0.5  # px: with fold maps, each fold model's own boundary shift, per image, class and member


@dataclass(frozen=True)
class Fixture:
    """A built fixture: data root, folds, and per member an OOF and a test store."""

    folder: Path
    root: Path
    folds: Path
    oof: list[Path]
    test: list[Path]
    members: list[str]
    size: int
    build_seconds: dict[str, float]
    test_folds: list[list[Path]] = field(default_factory=list)  # with fold maps: per fold, each member's test store


def fixture(workdir: Path, train_images: int = 800, test_images: int = 300, size: int = 2048, members: int = 5,
            seed: int = 0, jobs: int = 2, log: Callable[[str], None] = print, mode: str = "strong",
            k: int = 5, fold_maps: bool = False) -> Fixture:
    """The fixture under ``workdir``, built on first use and reused while its settings match (a build that was
    stopped starts again). ``mode``: ``strong`` (diverse, mis-calibrated members: searching pays), ``null``
    (equal, calibrated members: it cannot) or ``calibration`` (one member over-confident); ``k`` patient-grouped folds. ``fold_maps``: every fold model has its
    own boundary jitter, a test image's maps are the mean of the fold models' maps (as predict-member averages
    folds: softer where they disagree), and each fold's test maps are kept too, in per-fold stores (fold f)."""
    table = MODES[mode]
    if not 1 <= members <= len(table):
        raise ValueError(f"members must be 1..{len(table)}")
    chosen = table[:members]
    suffix = ("" if (mode, k) == ("strong", 5) else f"-{mode}-k{k}") + ("-foldmaps" if fold_maps else "")
    folder = Path(workdir) / f"scale-{size}-{train_images}-{test_images}-s{seed}{suffix}"
    manifest = {"version": FIXTURE_VERSION, "train": train_images, "test": test_images, "size": size, "seed": seed,
                "members": [asdict(member) for member in chosen],
                **({} if not suffix else {"mode": mode, "k": k, "fold_maps": fold_maps})}
    done = folder / "manifest.json"
    result = Fixture(folder, folder / "data", folder / "folds.json",
                     [folder / f"{m.name}.oof.zarr" for m in chosen], [folder / f"{m.name}.test.zarr" for m in chosen],
                     [m.name for m in chosen], size, {},
                     [[folder / f"{m.name}.test.fold{f}.zarr" for m in chosen] for f in range(k)] if fold_maps else [])
    if done.is_file():
        stored = json.loads(done.read_text())
        if {k: v for k, v in stored.items() if k != "seconds"} == json.loads(json.dumps(manifest)):
            return Fixture(**{**result.__dict__, "build_seconds": stored.get("seconds", {})})
    shutil.rmtree(folder, ignore_errors=True)
    log(f"building the fixture in {folder}: {train_images} + {test_images} images at {size}, {members} members")
    seconds = {}
    started = time.perf_counter()
    generate(result.root, n_train_patients=(train_images + 1) // 2, n_test_patients=(test_images + 1) // 2,
             size=size, seed=seed, render=False)
    folds, _ = make_folds(result.root, k=k, seed=seed)
    save_folds(folds, result.folds)
    seconds["data"] = time.perf_counter() - started
    train = discover(result.root, "train").records[:train_images]
    test = discover(result.root, "test").records[:test_images] if test_images else []
    fold_of = {record.key: folds.fold_of(record.key) for record in train}
    errors = ErrorModel(chosen, seed, size, table, k, fold_maps)

    def checkpoints(member: MemberErrors, folds: Sequence[int]) -> dict:
        return {fold: {"path": f"{member.name}-fold{fold}.pt", "sha256": f"fixture-{member.name}-{fold}"}
                for fold in folds}

    for split, records, paths in (("oof", train, result.oof), ("test", test, result.test))[:2 if test else 1]:
        stores = [create_store(path, member.name, "fixture", split, {"name": member.name, "fixture": asdict(member)},
                               checkpoints(member, range(k)), images=[record.key for record in records],
                               overwrite=True) for path, member in zip(paths, chosen)]
        fold_stores = [[create_store(path, member.name, "fixture", split, {"name": member.name, "fixture": asdict(member)},
                                     checkpoints(member, [fold]), images=[record.key for record in records],
                                     overwrite=True, fold=fold) for path, member in zip(paths_of_fold, chosen)]
                       for fold, paths_of_fold in enumerate(result.test_folds)] if split == "test" else []
        started = time.perf_counter()
        batches = [list(range(start, len(records), jobs)) for start in range(jobs)]
        spent = Parallel(n_jobs=jobs)(delayed(_write_batch)(stores, records, batch, errors, split, fold_of,
                                                            fold_stores) for batch in batches)
        seconds[f"{split}_wall"] = time.perf_counter() - started
        seconds[f"{split}_write_per_image_member"] = float(sum(spent) / max(1, len(records) * len(chosen)))
        log(f"  {split}: {len(records)} images in {seconds[f'{split}_wall']:.0f} s")
    done.write_text(json.dumps({**manifest, "seconds": seconds}))
    return Fixture(**{**result.__dict__, "build_seconds": seconds})


class ErrorModel:
    """The per-member, per-class systematic errors of one fixture seed, and the maps of one image."""

    def __init__(self, members: Sequence[MemberErrors], seed: int, size: int,
                 table: Sequence[MemberErrors] = MEMBERS, k: int = 5, fold_maps: bool = False) -> None:
        self.members, self.seed, self.scale, self.fold_maps = list(members), seed, size / 2048, fold_maps
        rng = np.random.default_rng([seed, 99])  # drawn for the mode's every member: the first three are the same
        self.bias = np.array([[m.bias + m.bias_spread * rng.normal() for _ in range(NUM_CLASSES)] for m in table])
        self.fold_bias = np.stack([[[m.fold_spread * rng.normal() for _ in range(NUM_CLASSES)] for _ in range(max(5, k))]
                                   for m in table])[:, :k]  # (members, folds, classes): at k = 5 the draws of old

    def maps(self, truth: np.ndarray, image_seed: Sequence[int], fold: int | None,
             fold_outputs: list | None = None) -> list[list[tuple]]:
        """Per member, per class: (box, uint8 values) or None, for one image's (29, H, W) bool truth; ``fold``
        None for a test image (predicted by the mean of the fold models). With ``fold_maps``, a test image's maps
        are the mean of the fold models' own maps, and ``fold_outputs`` (a list per fold) receives each of them."""
        s = self.scale
        rng_shared = np.random.default_rng([*image_seed, 0])
        shared_shift = SHARED_IMAGE_SPREAD * rng_shared.normal(size=NUM_CLASSES)
        shared_miss = rng_shared.random(NUM_CLASSES) < SHARED_MISS_RATE
        carpal_union = np.any(truth[CARPALS], axis=0)
        out: list[list[tuple | None]] = [[None] * NUM_CLASSES for _ in self.members]
        for channel in range(NUM_CLASSES):
            mask = truth[channel]
            rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
            if rows.size == 0:
                continue
            margin = int(np.ceil(MARGIN * s)) + 2
            height, width = mask.shape
            box = (max(0, rows[0] - margin), min(height, rows[-1] + 1 + margin),
                   max(0, cols[0] - margin), min(width, cols[-1] + 1 + margin))
            crop = mask[box[0]:box[1], box[2]:box[3]].astype(np.uint8)
            signed = _signed_distance(crop)
            grad_r, grad_c = np.gradient(signed)
            field_shared = _smooth(rng_shared, crop.shape, 24 * s) * SHARED_FIELD * s
            neighbours = None
            if channel in CARPALS:
                others = carpal_union[box[0]:box[1], box[2]:box[3]] & ~crop.astype(bool)
                near = cv2.dilate(crop, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (15, 15))) > 0
                neighbours = (others & near, others)
            for number, member in enumerate(self.members):
                rng = np.random.default_rng([*image_seed, 1 + number, channel])
                own = member.image_spread * rng.normal()
                translation = rng.normal(0, TRANSLATION * s, 2)
                field = field_shared + _smooth(rng, crop.shape, 16 * s) * member.field * s
                missed = channel in CARPALS and (shared_miss[channel] or rng.random() < member.miss_rate)
                bleed = member.bleed * rng.uniform(0.3, 1.0) if neighbours is not None else 0.0
                merged = neighbours is not None and rng.random() < MERGE_RATE and member.bleed > 0

                def probability(systematic: float, jitter: float = 0.0) -> np.ndarray:
                    shift = (systematic + shared_shift[channel] + own) * s + jitter
                    logit = (signed + shift + field - grad_r * translation[0] - grad_c * translation[1]) / (member.width * s)
                    if missed:
                        logit -= 7.0
                    if neighbours is not None:
                        touching, others = neighbours
                        logit = np.where(touching, np.maximum(logit, logit + 4.0 * bleed), logit)
                        if merged:
                            logit = np.where(others, np.maximum(logit, 1.5), logit)
                    with np.errstate(over="ignore"):  # exp overflows to inf far outside: p = 0 there, as wanted
                        return 1.0 / (1.0 + np.exp(-logit.astype(np.float32)))

                bias, folds = self.bias[number, channel], self.fold_bias[number, :, channel]
                if not self.fold_maps:  # a test image: one map at the folds' mean shift
                    p = probability(bias + (folds.mean() if fold is None else folds[fold]))
                else:  # each fold model's own map; a test image: their mean, as predict-member averages folds
                    jitter = np.random.default_rng([*image_seed, 1 + number, channel, 7]).normal(0, FOLD_JITTER * s,
                                                                                                  folds.size)
                    per_fold = {f: probability(bias + folds[f], jitter[f]) for f in range(folds.size)
                                if f == fold or fold is None}
                    p = per_fold[fold] if fold is not None else np.mean(list(per_fold.values()), axis=0)
                    for f, fold_p in per_fold.items():
                        if fold is None and fold_outputs is not None:
                            fold_outputs[f][number][channel] = _quantized(fold_p, box)
                out[number][channel] = _quantized(p, box)
        return out


def _quantized(p: np.ndarray, box: tuple[int, int, int, int]) -> tuple | None:
    """(tight box, uint8 values) of a class's probabilities in ``box`` (p < CUT written as 0), or None."""
    p = np.where(p < CUT, 0, p)
    values = np.rint(p * 255).astype(np.uint8)
    r, c = np.flatnonzero(values.any(axis=1)), np.flatnonzero(values.any(axis=0))
    if not r.size:
        return None
    tight = (box[0] + r[0], box[0] + r[-1] + 1, box[2] + c[0], box[2] + c[-1] + 1)
    return tight, values[r[0]:r[-1] + 1, c[0]:c[-1] + 1]


def _signed_distance(crop: np.ndarray) -> np.ndarray:
    """Signed distance (px, float32) to the boundary of a uint8 0/1 mask: positive inside."""
    inside = cv2.distanceTransform(crop, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    outside = cv2.distanceTransform(1 - crop, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    return np.where(crop > 0, inside - 0.5, 0.5 - outside).astype(np.float32)


def _smooth(rng: np.random.Generator, shape: tuple[int, int], cell: float) -> np.ndarray:
    """Unit-std noise, smooth over about ``cell`` px."""
    cell = max(2.0, cell)
    coarse = rng.normal(0, 1, (int(shape[0] / cell) + 3, int(shape[1] / cell) + 3)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC)


def _write_batch(stores, records, indices, errors: ErrorModel, split: str, fold_of: dict[str, int],
                 fold_stores=()) -> float:
    """Write the images ``indices`` of every member (and, given ``fold_stores``, of every fold model); returns the
    seconds spent in ``write_image``."""
    spent = 0.0
    buffer = None
    for index in indices:
        record = records[index]
        truth = read_record_mask(record)
        if buffer is None:
            buffer = np.zeros(truth.shape, np.uint8)
        split_code = 0 if split == "oof" else 1
        per_fold = [[[None] * NUM_CLASSES for _ in errors.members] for _ in fold_stores]
        maps = errors.maps(truth, (errors.seed, split_code, index), fold_of.get(record.key), per_fold or None)
        written = list(zip(stores, maps)) + [(store, classes) for fold_row, fold_maps in zip(fold_stores, per_fold)
                                             for store, classes in zip(fold_row, fold_maps)]
        for store, classes in written:
            boxes = []
            for channel, made in enumerate(classes):
                if made is None:
                    boxes.append(None)
                    continue
                box, values = made
                buffer[channel, box[0]:box[1], box[2]:box[3]] = values
                boxes.append(box)
            started = time.perf_counter()
            store.write_image(record.key, buffer, boxes)
            spent += time.perf_counter() - started
            for channel, box in enumerate(boxes):
                if box is not None:
                    buffer[channel, box[0]:box[1], box[2]:box[3]] = 0
    return spent


def member_dice(fixture_: Fixture, split: str = "oof", images: int | None = None) -> dict[str, float]:
    """Mean Dice at 0.5 of each member over a split's images (a quick check of the error model)."""
    from segens.ensemble.evaluate import evaluate_store

    paths = fixture_.oof if split == "oof" else fixture_.test
    return {open_store(path).member: evaluate_store(path, fixture_.root).mean() for path in paths}


# ---- the combine and search benchmarks' stores --------------------------------------------------------------


@dataclass(frozen=True)
class BenchData:
    """A synthetic data root and one OOF store per member over its train images (bench_combine, bench_search)."""

    root: Path
    stores: list[Path]
    records: list[ImageRecord]
    size: int
    members: list[str]


def bench_data(workdir: Path, images: int = 20, size: int = 2048, seed: int = 0, members: int = 3,
               log: Callable[[str], None] = print) -> BenchData:
    """The fixture's OOF stores of ``images`` training images (no test images), built on first use and cached."""
    made = fixture(workdir, train_images=images, test_images=0, size=size, members=members, seed=seed, log=log)
    records = discover(made.root, "train").records[:images]
    return BenchData(made.root, made.oof, records, size, made.members)


def replicated_stores(data: BenchData, images: int, workdir: Path | None = None) -> list[Path]:
    """Stores of ``images`` images made by copying the data's images on disk under new keys (cheap: no
    encoding), cached under ``workdir`` (default: next to the data). Keys ``IDnnn/image<13 digits>``."""
    folder = (Path(workdir) if workdir else data.root.parent) / f"replicated-{images}"
    paths = [folder / path.name for path in data.stores]
    done = folder / "done.json"
    if done.is_file() and json.loads(done.read_text()) == {"images": images, "source": str(data.root.parent)}:
        return paths
    shutil.rmtree(folder, ignore_errors=True)
    for source, target in zip(data.stores, paths):
        _replicate(source, target, [record.key for record in data.records], images)
    done.write_text(json.dumps({"images": images, "source": str(data.root.parent)}))
    return paths


def _replicate(source: Path, target: Path, keys: Sequence[str], images: int) -> None:
    """Copy the root metadata (planned images replaced by the new keys, digest renewed), then image i from
    ``keys[i % len(keys)]`` as ID{i//2+1:03d}/image{...}, its metadata bound to its new key and store (the chunks
    are copied as they are: no re-encoding)."""
    target.mkdir(parents=True)
    root = json.loads((source / "zarr.json").read_text())
    root["attributes"]["images"] = sorted(f"ID{index // 2 + 1:03d}/image{1661130000000 + index}"
                                          for index in range(images))
    root["attributes"]["digest"] = attributes_digest(root["attributes"])
    (target / "zarr.json").write_text(json.dumps(root))
    identity = store_id(root["attributes"])
    for index in range(images):
        patient = target / f"ID{index // 2 + 1:03d}"
        if not patient.is_dir():
            patient.mkdir()
            shutil.copy(source / keys[0].split("/")[0] / "zarr.json", patient / "zarr.json")
        image = patient / f"image{1661130000000 + index}"
        shutil.copytree(source / keys[index % len(keys)], image)
        document = json.loads((image / "zarr.json").read_text())
        attributes = {**document["attributes"], "key": f"{patient.name}/{image.name}", "store": identity}
        document["attributes"] = {**with_digest({k: v for k, v in attributes.items() if k != "digest"})}
        (image / "zarr.json").write_text(json.dumps(document))


def nonzero_fraction(store_path: Path, keys: Sequence[str]) -> float:
    """Fraction of non-zero uint8 values over the given images of a store."""
    store = open_store(store_path)
    return float(np.mean([np.count_nonzero(store.read(key)) / store.read(key).size for key in keys]))
