"""``ens selfcheck``: make a small synthetic data set and prove the conventions end to end on it.

The test split's labels are written as a submission (the RLE writer), read back and scored (the RLE reader
and the competition's Dice) and must score exactly 1.0; the same masks shifted by a few pixels must score
less; every mask's RLE must equal the straightforward reference encoder's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segens.conventions.dataset import discover, read_record_mask
from segens.conventions.rle import encode_stack
from segens.conventions.submission import image_rows, write_submission
from segens.ensemble.evaluate import evaluate_submission
from segens.errors import SegensError
from segens.reference import reference_encode
from segens.synth import generate


@dataclass
class SelfCheckResult:
    root: Path
    images: int
    dice_exact: float
    dice_shifted: float
    rle_matches_reference: bool


def write_label_submission(root: Path, split: str, out_csv: Path, shift: int = 0) -> bool:
    """Write a split's labels (rolled ``shift`` pixels right) as a submission; True if every RLE matched the
    reference encoder."""
    rows, matches = [], True
    for record in discover(root, split, require_labels=True).records:
        masks = np.roll(read_record_mask(record), shift, axis=2)
        rles = encode_stack(masks)
        matches &= all(text == reference_encode(mask) for text, mask in zip(rles, masks))
        rows.extend(image_rows(record.name, rles))
    write_submission(out_csv, rows)
    return matches


def run_selfcheck(out: str | Path, size: int = 512, seed: int = 0, progress: bool = True,
                  overwrite: bool = False) -> SelfCheckResult:
    """Generate ``out/data`` (replacing an earlier one only with ``overwrite``), write and score label submissions;
    raise SegensError if a convention breaks."""
    out = Path(out)
    summary = generate(out / "data", n_train_patients=2, n_test_patients=2, size=size, seed=seed, progress=progress,
                       overwrite=overwrite)
    root = Path(summary.root)
    exact_csv, shifted_csv = out / "labels_as_submission.csv", out / "labels_shifted_3px.csv"
    matches = write_label_submission(root, "test", exact_csv)
    matches &= write_label_submission(root, "test", shifted_csv, shift=3)
    exact = evaluate_submission(exact_csv, root, "test")
    shifted = evaluate_submission(shifted_csv, root, "test")
    result = SelfCheckResult(root, len(exact.scores), exact.mean(), shifted.mean(), matches)
    if not matches:
        raise SegensError("self-check failed: an RLE string differs from the reference encoder's")
    if not np.allclose(exact.per_class(), 1.0) or not result.dice_shifted < 1.0:
        raise SegensError(f"self-check failed: Dice of the labels {result.dice_exact}, shifted {result.dice_shifted}")
    return result
