"""Scoring predictions against a data root's labels with the competition's Dice (segens.conventions.dice).

A prediction (PRED) is a submission CSV (rows matched by image file name and class) or a probability store
(images matched by key, each class kept where the stored p = v / 255 > threshold in float32, as ``ens combine``
does). Both are turned into the same compact form, one :data:`BoxedMask` per class, and scored by the same
code, so identical masks score identically whichever way they come. Only each class's bounding box is read,
painted and compared; the ground truth is rasterised per class inside its polygon's box and counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.conventions.dataset import ImageRecord, discover, image_size
from segens.conventions.dice import DiceTable, dice_from_counts
from segens.conventions.labels import check_points_inside, parse_label_json
from segens.conventions.rle import BBox, decode_box
from segens.conventions.submission import Submission, read_submission
from segens.errors import SegensError
from segens.infra.locations import is_url
from segens.infra.progress import progress_bar
from segens.store import LEVELS, ProbabilityStore, open_store

BoxedMask = tuple[BBox | None, np.ndarray]
"""One class of one image: (box, bool mask inside it), or (None, a (0, 0) array) when the class is empty."""

STORE_SPLIT_TO_DATA = {"oof": "train", "test": "test"}
"""The data-root split whose labels score a store of each store split (OOF predictions are of train images)."""

EMPTY: BoxedMask = (None, np.zeros((0, 0), dtype=bool))


# ---- masks in boxes ----------------------------------------------------------------------------------------


def truth_masks(record: ImageRecord, size: tuple[int, int]) -> list[BoxedMask]:
    """The 29 ground-truth masks of a labelled image of ``size`` (H, W), each painted only inside its polygon's
    box; pixel for pixel the same as segens.conventions.labels.rasterize (cv2.fillPoly of integer points)."""
    if record.label_path is None:
        raise SegensError(f"{record.image_path}: no label file; cannot score or outline this image's truth")
    height, width = size
    polygons = parse_label_json(record.label_path)
    check_points_inside(record.label_path, polygons, height, width)
    masks = []
    for name in CLASSES:
        points = polygons[name]
        box = (int(points[:, 1].min()), min(height, int(points[:, 1].max()) + 1),
               int(points[:, 0].min()), min(width, int(points[:, 0].max()) + 1))
        if box[0] >= box[1] or box[2] >= box[3]:  # a polygon lying on the far edge paints nothing
            masks.append(EMPTY)
            continue
        sub = np.zeros((box[1] - box[0], box[3] - box[2]), dtype=np.uint8)
        shifted = (points - np.array([box[2], box[0]], dtype=np.int32)).reshape(-1, 1, 2)
        cv2.fillPoly(sub, [shifted], 1)
        masks.append((box, sub.view(bool)))
    return masks


def keep_table(threshold: float) -> np.ndarray:
    """(256,) bool: which stored uint8 values v are kept, v / 255 > threshold computed in float32 (as combine)."""
    return LEVELS > np.float32(threshold)


def check_threshold(threshold: float) -> None:
    """Thresholds live in [0, 1): then v = 0 is never kept, so nothing outside a class's box can be."""
    if not 0 <= threshold < 1:
        raise SegensError(f"threshold {threshold} must be in [0, 1): a pixel is kept when p > threshold")


def store_masks(store: ProbabilityStore, key: str, threshold: float = 0.5) -> list[BoxedMask]:
    """The 29 thresholded masks of one stored image, reading only each class's box."""
    keep = keep_table(threshold)
    masks = []
    for channel in range(NUM_CLASSES):
        box, values = store.read_class_box(key, channel)
        masks.append(EMPTY if box is None else (box, keep[values]))
    return masks


def rle_masks(rles: Sequence[str], height: int, width: int, where: str) -> list[BoxedMask]:
    """The 29 masks of one image's RLE strings (class order), each decoded only inside its box; errors name
    ``where`` and the class."""
    return [decode_box(text, height, width, f"{where} {name}") for text, name in zip(rles, CLASSES, strict=True)]


def class_counts(pred: BoxedMask, truth: BoxedMask) -> tuple[int, int, int]:
    """(|A∩B|, |A|, |B|) of two boxed masks of the same image."""
    (pred_box, pred_sub), (true_box, true_sub) = pred, truth
    pred_sum = int(np.count_nonzero(pred_sub))
    true_sum = int(np.count_nonzero(true_sub))
    if pred_box is None or true_box is None:
        return 0, pred_sum, true_sum
    row0, row1 = max(pred_box[0], true_box[0]), min(pred_box[1], true_box[1])
    col0, col1 = max(pred_box[2], true_box[2]), min(pred_box[3], true_box[3])
    if row0 >= row1 or col0 >= col1:
        return 0, pred_sum, true_sum
    a = pred_sub[row0 - pred_box[0]:row1 - pred_box[0], col0 - pred_box[2]:col1 - pred_box[2]]
    b = true_sub[row0 - true_box[0]:row1 - true_box[0], col0 - true_box[2]:col1 - true_box[2]]
    return int(np.count_nonzero(a & b)), pred_sum, true_sum


def dice_of_masks(preds: Sequence[BoxedMask], truths: Sequence[BoxedMask]) -> np.ndarray:
    """(29,) float64 competition Dice of one image's predicted and true boxed masks."""
    counts = np.array([class_counts(pred, truth) for pred, truth in zip(preds, truths, strict=True)], np.int64)
    return dice_from_counts(counts[:, 0], counts[:, 1], counts[:, 2])


def dice_of_rles(rles: list[str], truth: np.ndarray, where: str) -> np.ndarray:
    """Per-class Dice of 29 RLE strings against a (29, H, W) bool ground truth; decodes only each mask's box."""
    height, width = truth.shape[1:]
    truths = [EMPTY if not plane.any() else (_full_box(height, width), plane) for plane in truth]
    return dice_of_masks(rle_masks(rles, height, width, where), truths)


def _full_box(height: int, width: int) -> BBox:
    return 0, height, 0, width


# ---- predictions -------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """An opened PRED: a submission CSV or a probability store, and how it names itself in messages."""

    path: str
    submission: Submission | None = None
    store: ProbabilityStore | None = None

    @property
    def kind(self) -> str:
        return "store" if self.store is not None else "csv"

    def default_split(self) -> str:
        """The data split it is scored against unless told: a store's own (oof -> train), test for a CSV."""
        return "test" if self.store is None else STORE_SPLIT_TO_DATA.get(self.store.split, "test")

    def masks(self, record: ImageRecord, size: tuple[int, int], threshold: float = 0.5) -> list[BoxedMask]:
        """The 29 masks it predicts for one image of ``size`` (H, W); a SegensError if it lacks the image."""
        if self.submission is not None:
            return rle_masks(self.submission.image(record.name), *size, f"{self.path} {record.name}")
        assert self.store is not None
        if record.key not in self.store:
            raise SegensError(f"{self.path}: image {record.key!r} is not in the store; "
                              f"run `ens predict-member` for member {self.store.member!r} on it")
        stored = self.store.image_size(record.key)
        if stored != tuple(size):
            raise SegensError(f"{self.path}: image {record.key!r} is {stored[1]}x{stored[0]} in the store but "
                              f"{size[1]}x{size[0]} in {record.image_path}; was it predicted for another data root?")
        return store_masks(self.store, record.key, threshold)


def is_store_path(path: str | Path) -> bool:
    """A probability store is a folder (or URL, or a ``.zarr`` path); anything else is read as a CSV."""
    text = str(path)
    return is_url(text) or text.startswith("file://") or Path(text).is_dir() or text.rstrip("/").endswith(".zarr")


def open_prediction(path: str | Path) -> Prediction:
    """Open a submission CSV or a probability store; a SegensError naming the path if it is neither."""
    text = str(path)
    if is_store_path(text):
        return Prediction(text, store=open_store(text))
    if not Path(text).exists():
        raise SegensError(f"{text}: not found; give a submission CSV (image_name,class,rle) or a probability "
                          "store folder (<member>.<split>.zarr)")
    return Prediction(text, submission=read_submission(text))


def check_coverage(prediction: Prediction, records: Sequence[ImageRecord], where: str) -> None:
    """Every image of the split in the PRED and nothing else, matched by file name (CSV) or key (store)."""
    if prediction.submission is not None:
        have, wanted = set(prediction.submission.rles), {record.name for record in records}
    else:
        assert prediction.store is not None
        have, wanted = set(prediction.store.keys()), {record.key for record in records}
    extra, missing = sorted(have - wanted), sorted(wanted - have)
    if extra:
        raise SegensError(f"{prediction.path}: {len(extra)} image(s) are not in {where}, first {extra[0]}; "
                          "is it the prediction for this split (see --split)?")
    if missing and prediction.submission is not None:
        raise SegensError(f"{prediction.path}: no rows for image {missing[0]} ({len(missing)} image(s) of {where} "
                          "have none); a submission holds 29 rows for every image of the split")
    if missing:
        raise SegensError(f"{prediction.path}: lacks {len(missing)} image(s) of {where}, first {missing[0]!r}; "
                          "run `ens predict-member` on every image of the split")


# ---- evaluation --------------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """The Dice table of one PRED and what it was scored against."""

    pred: str
    label: str  # short name for columns and legends
    kind: str  # "csv" or "store"
    split: str  # the data split whose labels scored it
    threshold: float | None  # stores only
    table: DiceTable

    def as_dict(self) -> dict:
        """JSON-ready: pred, kind, split, threshold (stores), mean_dice, images, per_class."""
        head = {"pred": self.pred, "kind": self.kind, "split": self.split}
        if self.threshold is not None:
            head["threshold"] = self.threshold
        return {**head, **self.table.as_dict()}


def prediction_labels(paths: Sequence[str | Path]) -> list[str]:
    """Short names of PREDs for table columns and titles: file names, or whole paths where those collide."""
    paths = [str(path) for path in paths]
    names = [Path(path.rstrip("/")).name for path in paths]
    return [name if names.count(name) == 1 else path for name, path in zip(names, paths)]


def evaluate_predictions(pred_paths: Sequence[str | Path], root: str | Path, split: str | None = None,
                         threshold: float = 0.5, progress: bool = False) -> list[Evaluation]:
    """:func:`evaluate_prediction` of each PRED, in order, with the labels and splits to report them by."""
    check_threshold(threshold)
    if not pred_paths:
        raise SegensError("give at least one PRED: a submission CSV or a probability store")
    evaluations = []
    for path, label in zip(pred_paths, prediction_labels(pred_paths)):
        prediction = open_prediction(path)
        used = split or prediction.default_split()
        table = score_prediction(prediction, root, used, threshold, progress)
        evaluations.append(Evaluation(str(path), label, prediction.kind, used,
                                      threshold if prediction.store is not None else None, table))
    return evaluations


def evaluate_prediction(pred_path: str | Path, root: str | Path, split: str | None = None, threshold: float = 0.5,
                        progress: bool = False) -> DiceTable:
    """Dice of a CSV or a store against the labels of ``root``'s split (default: the PRED's own, see
    :meth:`Prediction.default_split`); images matched by name or key, every one exactly once."""
    check_threshold(threshold)
    prediction = open_prediction(pred_path)
    return score_prediction(prediction, root, split or prediction.default_split(), threshold, progress)


def score_prediction(prediction: Prediction, root: str | Path, split: str, threshold: float = 0.5,
                     progress: bool = False) -> DiceTable:
    """Dice table of an opened PRED on every labelled image of ``root``'s ``split``, in submission order."""
    listing = discover(root, split, require_labels=True)
    if prediction.submission is not None:
        listing.by_name()  # two folders holding one file name could not be told apart in a CSV
    check_coverage(prediction, listing.records, str(Path(root) / split))
    table = DiceTable()
    with progress_bar("img", disable=not progress, transient=True) as bar:
        for record in bar.track(listing.records, description=f"scoring {Path(prediction.path.rstrip('/')).name}"):
            size = image_size(record.image_path)
            table.add(record.key, dice_of_masks(prediction.masks(record, size, threshold), truth_masks(record, size)))
    return table


def evaluate_store(store_path: str | Path, root: str | Path, split: str | None = None,
                   threshold: float = 0.5) -> DiceTable:
    """Dice of a probability store thresholded at p > ``threshold``; a store of split 'oof' is scored against
    the train labels and 'test' against the test labels unless ``split`` says otherwise."""
    if not is_store_path(store_path):
        raise SegensError(f"{store_path}: not a probability store folder; use evaluate_submission for a CSV")
    return evaluate_prediction(store_path, root, split, threshold)


def evaluate_submission(csv_path: str | Path, root: str | Path, split: str = "test") -> DiceTable:
    """Dice of a submission CSV against the labels of ``root``'s split; rows matched by image name and class.

    Every labelled image of the split must be in the CSV and every CSV image in the split, else SegensError.
    """
    if is_store_path(csv_path):
        raise SegensError(f"{csv_path}: is a folder, not a submission CSV; use evaluate_store for a store")
    return evaluate_prediction(csv_path, root, split)
