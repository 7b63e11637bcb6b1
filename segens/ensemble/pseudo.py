"""``ens pseudo-label``: the ensemble's masks on test images as training labels, each (image, class) kept only
where the ensemble is likely right, with an ignore mask of every pixel whose label may be wrong.

Per test image and class:
- the mask is the ensemble's, exactly as ``ens combine`` makes it with the recipe (segens.ensemble.combine:
  the strategy's kept pixels, then post-processing);
- its **qc score** is ``ens qc``'s (segens.ensemble.qc, scored over all the test images given; higher: more likely
  wrong), and its **confidence** is the mean, over the mask's pixels, of the ensemble's score that the recipe
  thresholds (the weighted mean of the members' (calibrated) probabilities; hard votes: the vote share), in [0, 1]
  (0 for an empty mask);
- the pair is **written** (one poly_seg annotation with ``confidence`` and ``qc_score``) when its mask is not
  empty, its qc score is at most ``max_qc_score``, its confidence at least ``min_confidence``, and its largest
  8-connected piece has a polygon of at least 3 points; the polygon is that piece's outer contour (OpenCV's
  ``findContours``, filled back as segens' label reader fills it);
- its **ignore mask** (with ``ignore``, the default) is, for a written pair, the pixels whose ensemble score lies
  within ``band`` of the recipe's decision value (and above 0: a pixel no member gives any probability is not in
  doubt) plus the pixels where the polygon's raster differs from the ensemble's mask (other pieces, holes, the
  contour's approximation); for a pair not written, the whole class. Outside its ignored pixels a written
  pair's label equals the ensemble's mask exactly. Without ``ignore`` (the seed team's way, for comparison) no
  pixel is ignored: every pair that has a polygon is written whatever its score, and filtered pairs (if any
  filter is set) are simply empty.
An image with no written pair is left out. See segens.store.pseudo_folder for the folder this writes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from joblib import Parallel, delayed

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import IMAGE_DIR, LABEL_DIR, ImageRecord
from segens.conventions.labels import label_document
from segens.ensemble.combine import class_values, masked_values
from segens.store.pseudo_folder import (IGNORE_STORE, PAIRS, QC, SPLIT, VERSION, Filters, Manifest,
                                           create_ignore_store, write_manifest)
from segens.ensemble.qc import BAND, ensemble_score, open_with_recipe, quality_control
from segens.errors import SegensError
from segens.infra.atomic import atomic_write, atomic_write_bytes, atomic_write_text, temporary_name
from segens.infra.outputs import Output, check_outputs
from segens.infra.progress import progress_bar
from segens.store import SCALE, ProbabilityStore

MAX_QC_SCORE = 0.4
"""Default filter: pairs with a higher qc score get no annotation."""
MIN_CONFIDENCE = 0.7
"""Default filter: pairs whose mask's mean ensemble score is lower get no annotation."""
ALL_IMAGES = "ignore.all.zarr"
"""The ignore store the workers write (planned for every image), replaced by IGNORE_STORE."""
REASONS = ("", "empty", "qc score", "confidence", "no polygon")
"""Why a pair was not written ("": it was)."""


@dataclass
class PairRow:
    """One (image, class): whether it was written and why not, its confidence and qc score, the share of its
    pixels ignored."""

    image: str
    channel: int
    reason: str
    confidence: float
    qc_score: float
    ignored: float = 0.0

    @property
    def written(self) -> bool:
        return self.reason == ""


@dataclass
class PseudoSummary:
    """What a pseudo-label run wrote: the folder, the images written and left out, every pair's row, the
    manifest's counts, and the time taken."""

    out: Path
    images: list[str]
    skipped: list[str]
    rows: list[PairRow]
    counts: dict[str, float | int] = field(default_factory=dict)
    seconds: float = 0.0


def single_polygon(mask: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """The outer contour of a bool mask's largest 8-connected piece as (N, 2) int32 (x, y) points (None when it
    has fewer than 3 distinct points), and that polygon filled as segens' label reader fills it: (H, W) bool."""
    drawn = np.zeros(mask.shape, np.uint8)
    if not mask.any():
        return None, drawn.view(bool)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask.view(np.uint8), connectivity=8)
    largest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    piece = (labels == largest).astype(np.uint8)
    contours, _ = cv2.findContours(piece, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    points = max(contours, key=len).reshape(-1, 2).astype(np.int32)
    if len(np.unique(points, axis=0)) < 3:
        return None, drawn.view(bool)
    cv2.fillPoly(drawn, [points.reshape(-1, 1, 2)], 1)
    return points, drawn.view(bool)


def label_image(stores: Sequence[ProbabilityStore], key: str, settings, present: np.ndarray, record: ImageRecord,
                scores: np.ndarray, filters: Filters, folder: Path,
                ignore_store: ProbabilityStore) -> list[PairRow]:
    """Judge one image's 29 pairs (module docstring); when one is written, write the image's label file, its image
    and its ignore mask under ``folder``. ``scores``: its 29 qc scores."""
    height, width = next(store for store, here in zip(stores, present) if here).image_size(key)
    member_boxes = [store.boxes(key) if here else [None] * NUM_CLASSES for store, here in zip(stores, present)]
    ignore = np.zeros((NUM_CLASSES, height, width), np.uint8)
    polygons, fields, rows = {}, {}, []
    for channel, name in enumerate(CLASSES):
        box, values = class_values(stores, key, channel, present, member_boxes)
        mask = masked_values(values, settings, channel, present)
        row = PairRow(key, channel, "", 0.0, float(scores[channel]))
        if box is None or not mask.any():
            row.reason = "empty"
        else:
            score, decision = ensemble_score(values, settings, channel, present)
            row.confidence = float(score[mask].mean())
            row.reason = _filtered(row, filters)
        if row.written:
            points, drawn = single_polygon(mask)
            if points is None:
                row.reason = "no polygon"
            else:
                polygons[name] = points + np.array([box[2], box[0]], np.int32)
                fields[name] = {"confidence": round(row.confidence, 4), "qc_score": round(row.qc_score, 4)}
                if filters.ignore:
                    doubt = (np.abs(score - np.float32(decision)) <= filters.band) & (score > 0)
                    ignore[channel, box[0]:box[1], box[2]:box[3]] = (doubt | (drawn != mask)).view(np.uint8) * SCALE
        if not row.written and filters.ignore:
            ignore[channel] = SCALE
        row.ignored = float(np.count_nonzero(ignore[channel])) / (height * width)
        rows.append(row)
    if polygons:
        _write_image(folder, record, polygons, fields, (height, width))
        try:
            ignore_store.write_image(key, ignore)
        except SegensError as exc:
            raise SegensError(f"image {key!r}: its ignore mask could not be written ({exc})") from None
    return rows


def _filtered(row: PairRow, filters: Filters) -> str:
    if row.qc_score > filters.max_qc_score:
        return "qc score"
    if row.confidence < filters.min_confidence:
        return "confidence"
    return ""


def _write_image(folder: Path, record: ImageRecord, polygons: dict, fields: dict, size: tuple[int, int]) -> None:
    """The image (hard link, else a copy) and its label file under ``folder``'s training split, atomically."""
    relative = Path(record.key).parent
    image_path = folder / SPLIT / IMAGE_DIR / relative / record.name
    label_path = folder / SPLIT / LABEL_DIR / relative / f"{Path(record.name).stem}.json"
    image_path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(image_path)
    try:
        os.link(record.image_path, temporary)
        os.replace(temporary, image_path)
    except FileNotFoundError:
        raise SegensError(f"{record.image_path}: test image {record.key!r} is gone (removed since the stores were "
                          "predicted?); restore it or predict the stores again") from None
    except OSError:  # another file system, or links not allowed: a copy
        temporary.unlink(missing_ok=True)
        try:
            data = Path(record.image_path).read_bytes()
        except OSError as exc:
            raise SegensError(f"{record.image_path}: cannot read test image {record.key!r} "
                              f"({exc.strerror or exc})") from None
        atomic_write_bytes(image_path, data)
    document = label_document(Path(record.name).stem, polygons,
                              {"height": size[0], "width": size[1], "pseudo": True}, fields)
    atomic_write_text(label_path, json.dumps(document))


def pseudo_label(store_urls: Sequence[str | Path], recipe_path: str | Path, root: str | Path, out: str | Path,
                 max_qc_score: float = MAX_QC_SCORE, min_confidence: float = MIN_CONFIDENCE, band: float = BAND,
                 ignore: bool = True, jobs: int = 1, force: bool = False, progress: bool = True,
                 overwrite: bool = False) -> PseudoSummary:
    """Write the pseudo-label folder ``out`` (segens.store.pseudo_folder) for the test images of the members'
    test stores, judged with the recipe (module docstring); ``root``: the data root the stores were predicted on
    (its training labels give qc's area ranges). Everything is checked before anything is written; the folder is
    built beside ``out`` and moved into place when complete (an existing ``out`` is replaced only with
    ``overwrite``)."""
    started = time.perf_counter()
    filters = _filters(max_qc_score, min_confidence, band, ignore)
    out = Path(out)
    check_outputs([Output(out, "folder", "--out")], inputs=[*store_urls, recipe_path, root], overwrite=overwrite)
    if not store_urls:
        raise SegensError("give at least one store (the members' test stores)")
    opened = open_with_recipe(store_urls, recipe_path, root, force, "pseudo-label")
    stores, settings, keys, present, records = (opened.stores, opened.settings, opened.keys, opened.present,
                                                opened.records)
    if any(store.split != "test" for store in stores):
        store = next(store for store in stores if store.split != "test")
        raise SegensError(f"{store.url}: a {store.split} store; pseudo-labels are for test images: give the members' "
                          "test stores (`ens predict-member --split test`)")
    recipe_sha256 = hashlib.sha256(Path(recipe_path).read_bytes()).hexdigest()
    staging = temporary_name(out)
    try:
        staging.mkdir(parents=True)
        qc = quality_control(store_urls, recipe_path, root, staging / QC, jobs=jobs, force=force, progress=progress)
        scores = np.zeros((len(keys), NUM_CLASSES))
        index = {key: number for number, key in enumerate(keys)}
        for row in qc.rows:
            scores[index[row.image], row.channel] = row.score
        ignore_store = create_ignore_store(staging / ALL_IMAGES, keys, recipe_sha256, filters)
        rows: list[PairRow] = []
        with progress_bar("img", disable=not progress) as bar:
            task = bar.add_task("pseudo-label", total=len(keys))
            tasks = (delayed(label_image)(stores, key, settings, present[i], records[key], scores[i], filters, staging,
                                          ignore_store) for i, key in enumerate(keys))
            for image_rows in Parallel(n_jobs=jobs, return_as="generator")(tasks):
                rows.extend(image_rows)
                bar.update(task, advance=1)
        annotated = {row.image for row in rows if row.written}
        written = [key for key in keys if key in annotated]
        if not written:
            raise SegensError(f"no (image, class) pair passed the filters (qc score <= {filters.max_qc_score}, "
                              f"confidence >= {filters.min_confidence}) on any of the {len(keys)} images; nothing to "
                              "train on: loosen --max-qc-score or --min-confidence")
        _drop_unwritten(ignore_store, staging, keys, written, recipe_sha256, filters)
        counts = _counts(rows, keys, written)
        write_pairs(rows, staging / PAIRS)
        write_manifest(staging, Manifest(
            format="segens-pseudo-labels", version=VERSION,
            recipe={"path": str(Path(recipe_path).resolve()), "sha256": recipe_sha256, "strategy": opened.recipe.strategy},
            stores=[{"url": str(store.url), "member": store.member,
                     "checkpoints": {str(f): str(c["sha256"]) for f, c in store.checkpoints.items()}}
                    for store in stores],
            data=str(Path(root).resolve()), filters=filters, counts=counts, images=written))
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return PseudoSummary(out, written, [key for key in keys if key not in written], rows, counts,
                         time.perf_counter() - started)


def _filters(max_qc_score: float, min_confidence: float, band: float, ignore: bool) -> Filters:
    for name, value in (("--max-qc-score", max_qc_score), ("--min-confidence", min_confidence), ("--band", band)):
        if not (np.isfinite(value) and 0 <= value <= 1):
            raise SegensError(f"{name} must be a number from 0 to 1, got {value!r}")
    return Filters(max_qc_score=float(max_qc_score), min_confidence=float(min_confidence), band=float(band),
                   ignore=bool(ignore))


def _drop_unwritten(store: ProbabilityStore, folder: Path, keys: list[str], written: list[str], recipe_sha256: str,
                    filters: Filters) -> None:
    """The ignore store as the folder holds it: planned for the written images only (the workers' store, planned
    for every image, renamed when all were written, else copied image by image)."""
    if len(written) == len(keys):
        os.replace(folder / ALL_IMAGES, folder / IGNORE_STORE)
        return
    fresh = create_ignore_store(folder / IGNORE_STORE, written, recipe_sha256, filters)
    for key in written:
        fresh.write_image(key, store.read(key))
    shutil.rmtree(folder / ALL_IMAGES)


def _counts(rows: Sequence[PairRow], keys: Sequence[str], written: Sequence[str]) -> dict[str, float | int]:
    reasons = {reason or "annotated": sum(row.reason == reason for row in rows) for reason in REASONS}
    kept = [row.ignored for row in rows if row.image in set(written)]
    return {"images": len(keys), "images_written": len(written), "pairs": len(rows), **reasons,
            "ignored_share": round(float(np.mean(kept)), 6) if kept else 0.0}


def write_pairs(rows: Sequence[PairRow], path: Path) -> None:
    """pairs.csv, atomically: image, class, written, reason, confidence, qc_score, ignored_share."""
    with atomic_write(path) as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["image", "class", "written", "reason", "confidence", "qc_score", "ignored_share"])
        for row in rows:
            writer.writerow([row.image, CLASSES[row.channel], int(row.written), row.reason, f"{row.confidence:.4f}",
                             f"{row.qc_score:.4f}", f"{row.ignored:.4f}"])


def _move_into_place(staging: Path, out: Path) -> None:
    """``staging`` renamed to ``out``; an existing ``out`` (allowed by --overwrite) is moved aside first and
    removed once the new folder is there."""
    old = None
    if out.exists():
        old = temporary_name(out)
        os.replace(out, old)
    try:
        os.replace(staging, out)
    except OSError as exc:
        if old is not None:
            os.replace(old, out)
        raise SegensError(f"{out}: cannot move the finished folder into place ({exc.strerror or exc})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
