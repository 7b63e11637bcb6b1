"""Patient-grouped k-fold splits of a data root's training images (scikit-learn's GroupKFold, or
StratifiedGroupKFold on a metadata column), written as ``folds.json`` by segens.folds.file.

Both hands of a patient (one ``IDxxx`` folder) are always in the same fold.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segens.conventions.dataset import ImageRecord, discover
from segens.errors import SegensError
from segens.folds.file import Folds, image_list_sha256

STRATIFY_COLUMNS = ("age", "sex", "weight", "height", "bmi")
METADATA_NAME = "meta_data.xlsx"
UNKNOWN = "unknown"
MAX_QUANTILE_BINS = 4
# WHO adult BMI classes; clinically meaningful, unlike quantiles of a small sample.
BMI_EDGES = (18.5, 25.0, 30.0)
BMI_LABELS = ("<18.5", "18.5-25", "25-30", ">=30")
_REMAKE = "re-run `ens folds make`"


# ---------------------------------------------------------------------------------------------- making folds


def make_folds(
    root: str | Path, k: int = 5, stratify: str | None = None, seed: int = 0, metadata: str | Path | None = None
) -> tuple[Folds, list[str]]:
    """Split ``root``'s training images into ``k`` patient-grouped folds, optionally stratified by a metadata
    column (``metadata`` defaults to ``ROOT/meta_data.xlsx``); returns the folds and notes for the user."""
    import sklearn

    root = Path(root)
    if k < 2:
        raise SegensError(f"--k {k}: k-fold needs at least 2 folds")
    if stratify is not None and stratify not in STRATIFY_COLUMNS:
        raise SegensError(f"--stratify {stratify}: unknown column; use one of {', '.join(STRATIFY_COLUMNS)}")
    records = discover(root, "train").records
    patients = sorted({record.patient for record in records})
    if k > len(patients):
        raise SegensError(
            f"{root}/train: --k {k} needs at least {k} patients but there are {len(patients)}; "
            f"use --k {len(patients)} or fewer"
        )
    notes: list[str] = []
    bins = strata = None
    if stratify is not None:
        metadata_path = Path(metadata) if metadata is not None else root / METADATA_NAME
        bins, strata = stratify_patients(metadata_path, stratify, patients, k, notes)
    assignment, shuffle = _split(records, k, seed, bins, strata, notes)
    folds = Folds(
        k=k, method="group" if stratify is None else "stratified-group", stratify=stratify, seed=seed,
        assignment=assignment, image_list_sha256=image_list_sha256(r.relpath for r in records),
        shuffle=shuffle, sklearn_version=sklearn.__version__, bins=bins, strata=strata,
    )
    empty = [fold for fold in range(k) if not any(f == fold for f in assignment.values())]
    if empty:
        raise SegensError(f"{root}/train: fold(s) {empty} got no images with --k {k}; use fewer folds or another --seed")
    return folds, notes


def _split(
    records: Sequence[ImageRecord], k: int, seed: int, bins: list[str] | None, strata: dict[str, str] | None,
    notes: list[str],
) -> tuple[dict[str, int], bool]:
    """Image key -> fold from sklearn's GroupKFold (StratifiedGroupKFold when strata are given); whether the
    groups were shuffled with ``seed``."""
    from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

    groups = np.array([record.patient for record in records])
    if strata is None:
        try:  # shuffle/random_state arrived in scikit-learn 1.6; before that GroupKFold is deterministic
            splitter, shuffle = GroupKFold(n_splits=k, shuffle=True, random_state=seed), True
        except TypeError:
            splitter, shuffle = GroupKFold(n_splits=k), False
            notes.append("this scikit-learn's GroupKFold cannot shuffle: --seed has no effect on the folds")
        labels = None
    else:
        assert bins is not None
        splitter, shuffle = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed), True
        labels = np.array([bins.index(strata[patient]) for patient in groups])
    assignment: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for fold, (_, held_out) in enumerate(splitter.split(np.zeros(len(records)), labels, groups)):
            for index in held_out:
                assignment[records[index].key] = fold
    notes.extend(f"scikit-learn: {warning.message}" for warning in caught)
    return assignment, shuffle


def stratify_patients(
    metadata: Path, column: str, patients: Sequence[str], k: int, notes: list[str]
) -> tuple[list[str], dict[str, str]]:
    """Bin each patient's ``column`` value (from the metadata file) for stratification: the bins in order and
    patient -> bin; patients without a usable value get the ``unknown`` bin, and ``notes`` says which."""
    from segens.conventions.metadata import read_metadata

    frame, metadata_notes = read_metadata(metadata)
    notes.extend(_relevant_notes(metadata_notes, metadata, column))
    frame = frame.set_index("ID")
    absent = [p for p in patients if p not in frame.index]
    if absent:
        notes.append(f"{metadata.name}: {len(absent)} patient(s) of the data root have no row: {_some(absent)}")
    ignored = len(set(frame.index) - set(patients))
    if ignored:
        notes.append(f"{metadata.name}: {ignored} row(s) are for patients without training images (ignored)")
    values = _column_values(frame, column).reindex(list(patients))
    bins, labels = _bin(values, column, k)
    strata = {p: (UNKNOWN if label is None else label) for p, label in zip(patients, labels)}
    unknown = [p for p in patients if strata[p] == UNKNOWN]
    if len(unknown) == len(patients):
        raise SegensError(f"{metadata}: no training patient has a usable {column}; fix the file or drop --stratify")
    if unknown:
        bins.append(UNKNOWN)
        notes.append(
            f"stratify by {column}: {len(unknown)} of {len(patients)} patient(s) have no usable value and form "
            f"the '{UNKNOWN}' bin: {_some(unknown)}"
        )
    return bins, strata


def _relevant_notes(notes: list[str], metadata: Path, column: str) -> list[str]:
    """The metadata notes, less those about columns that ``column`` does not use."""
    from segens.conventions.metadata import ENGLISH_COLUMNS

    used = {"weight", "height"} if column == "bmi" else {column}
    unused = [f"{metadata.name}: {name}:" for name in ENGLISH_COLUMNS if name not in used | {"ID"}]
    return [note for note in notes if not note.startswith(tuple(unused))]


def _column_values(frame, column: str):
    """Per patient (the frame's index), the column's values: floats (NaN when missing) or sex codes (NA)."""
    if column == "bmi":
        return frame["weight"] / (frame["height"] / 100.0) ** 2
    return frame[column]


def _bin(values, column: str, k: int) -> tuple[list[str], list[str | None]]:
    """Bins in order and one label per value (None for a missing value): sex as is, BMI in WHO classes,
    other numbers in up to four quantile bins (fewer when there are few patients per fold)."""
    import pandas as pd

    missing = values.isna().to_numpy()
    if column == "sex":
        labels = [None if gone else str(v) for v, gone in zip(values, missing)]
        return sorted({label for label in labels if label is not None}), labels
    numbers = values.to_numpy(dtype=float)
    if column == "bmi":
        codes = np.searchsorted(BMI_EDGES, numbers, side="right")
        names = list(BMI_LABELS)
    else:
        known = numbers[~missing]
        n_bins = min(MAX_QUANTILE_BINS, max(1, len(known) // k))
        _, edges = pd.qcut(known, q=n_bins, retbins=True, duplicates="drop")
        names = [_span(lo, hi) for lo, hi in zip(edges[:-1], edges[1:])] or [_number(known[0])]
        # The first and last edges are the extreme values, so clip to keep them in the outer bins.
        codes = np.clip(np.searchsorted(edges, numbers, side="right") - 1, 0, len(names) - 1)
    labels = [None if gone else names[code] for code, gone in zip(codes, missing)]
    used = {label for label in labels if label is not None}
    return [name for name in names if name in used], labels


def _number(value: float) -> str:
    return f"{round(float(value), 1):g}"


def _span(low: float, high: float) -> str:
    """A bin's label: ``"20-28.8"``, or ``"30"`` when both ends round to the same number."""
    low_text, high_text = _number(low), _number(high)
    return low_text if low_text == high_text else f"{low_text}-{high_text}"


def _some(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown if len(items) <= limit else f"{shown}, ... ({len(items) - limit} more)"


# --------------------------------------------------------------------------------------------- the file format
