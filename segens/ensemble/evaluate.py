"""Scoring predictions against a data root's labels with the competition's Dice (segens.dice)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segens.classes import CLASSES
from segens.dataset import discover, read_record_mask
from segens.dice import DiceTable, dice_from_counts
from segens.errors import SegensError
from segens.rle import decode_box
from segens.submission import read_submission


def dice_of_rles(rles: list[str], truth: np.ndarray, where: str) -> np.ndarray:
    """Per-class Dice of 29 RLE strings against a (29, H, W) bool ground truth; decodes only each mask's box."""
    height, width = truth.shape[1:]
    scores = np.empty(len(CLASSES))
    for index, (text, true_mask) in enumerate(zip(rles, truth, strict=True)):
        box, sub = decode_box(text, height, width, f"{where} {CLASSES[index]}")
        true_sum = np.count_nonzero(true_mask)
        if box is None:
            scores[index] = dice_from_counts(0, 0, true_sum)
            continue
        intersection = np.count_nonzero(true_mask[box[0] : box[1], box[2] : box[3]] & sub)
        scores[index] = dice_from_counts(intersection, np.count_nonzero(sub), true_sum)
    return scores


def evaluate_submission(csv_path: str | Path, root: str | Path, split: str = "test") -> DiceTable:
    """Dice of a submission CSV against the labels of ``root``'s split; rows matched by image name and class.

    Every labelled image of the split must be in the CSV and every CSV image in the split, else SegensError.
    """
    listing = discover(root, split, require_labels=True)
    submission = read_submission(csv_path)
    records = listing.by_name()
    unknown = sorted(set(submission.rles) - set(records))
    if unknown:
        raise SegensError(
            f"{csv_path}: {len(unknown)} image(s) are not in {Path(root) / split}, first {unknown[0]}; "
            "is it the submission for this split?"
        )
    table = DiceTable()
    for record in listing.records:
        rles = submission.image(record.name)
        table.add(record.key, dice_of_rles(rles, read_record_mask(record), f"{csv_path} {record.name}"))
    return table
