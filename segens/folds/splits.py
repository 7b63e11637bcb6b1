"""Patient-grouped k-fold splits of a data root's training images, and the ``folds.json`` format.

This module is the only reader and writer of ``folds.json``::

    {"version": 1, "k": 5, "method": "group" | "stratified-group", "stratify": "bmi" | null, "seed": 0,
     "shuffle": true, "sklearn_version": "1.9.1",
     "image_list_sha256": "<sha256 of the sorted image relpaths, each followed by a newline>",
     "bins": ["<18.5", "18.5-25", ...] | null,      # stratification bins, in display order
     "strata": {"ID001": "18.5-25", ...} | null,     # patient -> bin
     "folds": {"ID001/image1661130828152_R": 0, ...}}  # image key (relpath without extension) -> fold

Both hands of a patient (one ``IDxxx`` folder) are always in the same fold.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from segens.infra.atomic import atomic_write_text
from segens.conventions.dataset import ImageRecord, discover
from segens.errors import SegensError
from segens.infra.safeload import load_json, validate

VERSION = 1
METHODS = ("group", "stratified-group")
STRATIFY_COLUMNS = ("age", "sex", "weight", "height", "bmi")
METADATA_NAME = "meta_data.xlsx"
UNKNOWN = "unknown"
MAX_QUANTILE_BINS = 4
MAX_FOLDS = 1000
# WHO adult BMI classes; clinically meaningful, unlike quantiles of a small sample.
BMI_EDGES = (18.5, 25.0, 30.0)
BMI_LABELS = ("<18.5", "18.5-25", "25-30", ">=30")
_REMAKE = "re-run `ens folds make`"


def patient_of(key: str) -> str:
    """The patient folder of an image key, as :attr:`segens.conventions.dataset.ImageRecord.patient` defines it."""
    return key.split("/", 1)[0]


def image_list_sha256(relpaths: Iterable[str]) -> str:
    """sha256 (hex) of the sorted relative paths (with extension), each followed by a newline."""
    return hashlib.sha256("".join(f"{p}\n" for p in sorted(relpaths)).encode("utf-8")).hexdigest()


@dataclass
class Folds:
    """A k-fold split: image key -> fold in ``0..k-1``, with how it was made."""

    k: int
    method: str
    stratify: str | None
    seed: int
    assignment: dict[str, int]
    image_list_sha256: str = ""
    shuffle: bool = False
    sklearn_version: str | None = None
    bins: list[str] | None = None  # stratification bins in display order
    strata: dict[str, str] | None = None  # patient -> bin
    source: Path | None = field(default=None, compare=False, repr=False)  # the file it was read from

    def _where(self) -> str:
        return str(self.source) if self.source else "folds"

    def _check_fold(self, fold: int) -> None:
        if not 0 <= fold < self.k:
            raise SegensError(f"{self._where()}: fold {fold} does not exist; folds are 0..{self.k - 1}")

    def fold_of(self, key: str) -> int:
        """The fold that holds image ``key`` out; SegensError if the image has no fold."""
        try:
            return self.assignment[key]
        except KeyError:
            raise SegensError(f"{self._where()}: image {key} has no fold; {_REMAKE} for this data root") from None

    def keys_in(self, fold: int) -> list[str]:
        """Sorted keys of the images that ``fold`` validates on (its held-out images)."""
        self._check_fold(fold)
        return sorted(key for key, f in self.assignment.items() if f == fold)

    def train_keys(self, fold: int) -> list[str]:
        """Sorted keys of the images that the model of ``fold`` trains on (all other folds)."""
        self._check_fold(fold)
        return sorted(key for key, f in self.assignment.items() if f != fold)

    def patients_in(self, fold: int) -> list[str]:
        """Sorted patients whose images are in ``fold``."""
        return sorted({patient_of(key) for key in self.keys_in(fold)})

    def distribution(self) -> list[dict[str, int]] | None:
        """Per fold, patients per stratification bin (every bin, in ``bins`` order); None when not stratified."""
        if self.bins is None or self.strata is None:
            return None
        counts = [Counter(self.strata[p] for p in self.patients_in(fold)) for fold in range(self.k)]
        return [{label: count[label] for label in self.bins} for count in counts]


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


def save_folds(folds: Folds, path: str | Path) -> Path:
    """Write ``folds`` to ``path`` as folds.json, atomically; returns the path."""
    path = Path(path)
    document = {
        "version": VERSION,
        "k": folds.k,
        "method": folds.method,
        "stratify": folds.stratify,
        "seed": folds.seed,
        "shuffle": folds.shuffle,
        "sklearn_version": folds.sklearn_version,
        "image_list_sha256": folds.image_list_sha256,
        "bins": folds.bins,
        "strata": None if folds.strata is None else dict(sorted(folds.strata.items())),
        "folds": dict(sorted(folds.assignment.items())),
    }
    atomic_write_text(path, json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    return path


def load_folds(path: str | Path, root: str | Path | None = None) -> Folds:
    """Read folds.json and check it (version, folds in range, no patient in two folds); with ``root``, also check
    that it covers exactly the root's training images. Every failure is a SegensError naming the file."""
    path = Path(path)
    folds = _parse(_read_json(path), path)
    _check_assignment(folds, path)
    if root is not None:
        check_against_root(folds, root)
    return folds


def _read_json(path: Path) -> dict:
    """The folds.json document: bounded, UTF-8 (BOM accepted), nesting-limited (segens.infra.safeload)."""
    if not path.exists():
        raise SegensError(f"{path}: folds file not found; make one with `ens folds make ROOT --out {path}`")
    try:
        document = load_json(path, "folds.json")
    except SegensError as exc:
        detail = str(exc).removeprefix(f"{path}: ")
        raise SegensError(f"{path}: not a readable folds.json ({detail}); {_REMAKE}") from None
    if not isinstance(document, dict):
        raise SegensError(f"{path}: not a folds.json (expected a JSON object); {_REMAKE}")
    return document


class FoldsDocument(BaseModel):
    """The schema of folds.json: strict types (a JSON true is not a k, seed or fold), no unknown fields."""

    model_config = ConfigDict(extra="forbid", strict=True)

    version: Literal[1]
    k: int = Field(ge=2, le=MAX_FOLDS)
    method: Literal["group", "stratified-group"]
    stratify: Literal["age", "sex", "weight", "height", "bmi"] | None = None
    seed: int
    shuffle: bool
    sklearn_version: str | None = Field(default=None, max_length=64)
    image_list_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bins: list[Annotated[str, Field(max_length=256)]] | None = None
    strata: dict[str, Annotated[str, Field(max_length=256)]] | None = None
    folds: dict[str, int]


def _parse(document: dict, path: Path) -> Folds:
    """A Folds from the JSON document, checking the version, then every field against FoldsDocument."""
    version = document.get("version")
    if version != VERSION:
        raise SegensError(
            f"{path}: unknown folds.json version {version!r} (this segens reads version {VERSION}); "
            f"{_REMAKE} with this segens"
        )
    try:
        parsed = validate(FoldsDocument, document, path)
    except SegensError as exc:
        raise SegensError(f"{exc}; {_REMAKE}") from None
    if (parsed.method == "stratified-group") != (parsed.stratify is not None) or \
            (parsed.stratify is None) != (parsed.strata is None):
        raise SegensError(f"{path}: method {parsed.method!r}, stratify {parsed.stratify!r} and strata do not agree; "
                          f"{_REMAKE}")
    return Folds(
        k=parsed.k, method=parsed.method, stratify=parsed.stratify, seed=parsed.seed, assignment=dict(parsed.folds),
        image_list_sha256=parsed.image_list_sha256, shuffle=parsed.shuffle, sklearn_version=parsed.sklearn_version,
        bins=parsed.bins, strata=parsed.strata, source=path,
    )


def _check_assignment(folds: Folds, path: Path) -> None:
    """Folds in 0..k-1, none empty, no patient in two folds, stratification bins consistent."""
    if folds.k < 2:
        raise SegensError(f"{path}: k is {folds.k}; k-fold needs at least 2 folds; {_REMAKE}")
    outside = sorted(key for key, fold in folds.assignment.items() if not 0 <= fold < folds.k)
    if outside:
        key = outside[0]
        raise SegensError(f"{path}: {len(outside)} image(s) have a fold outside 0..{folds.k - 1}, first {key} "
                          f"(fold {folds.assignment[key]}); {_REMAKE}")
    empty = sorted(set(range(folds.k)) - set(folds.assignment.values()))
    if empty:
        raise SegensError(f"{path}: fold(s) {empty} hold no images; {_REMAKE}")
    by_patient: dict[str, set[int]] = defaultdict(set)
    for key, fold in folds.assignment.items():
        by_patient[patient_of(key)].add(fold)
    split = sorted(patient for patient, found in by_patient.items() if len(found) > 1)
    if split:
        raise SegensError(f"{path}: patient {split[0]} has images in folds {sorted(by_patient[split[0]])} "
                          f"({len(split)} patient(s) split in all); a patient's hands must share a fold; {_REMAKE}")
    if folds.strata is not None:
        bins = set(folds.bins or ())
        unbinned = sorted(p for p in by_patient if folds.strata.get(p) not in bins)
        if unbinned:
            raise SegensError(f"{path}: patient {unbinned[0]} has no known stratification bin; {_REMAKE}")


def check_against_root(folds: Folds, root: str | Path) -> None:
    """Check that ``folds`` holds exactly the training images of ``root`` (each in one fold) and that the image
    list hash matches; a changed image list says how many images were added and removed."""
    root = Path(root)
    where = folds._where()
    records = discover(root, "train").records
    digest = image_list_sha256(record.relpath for record in records)
    in_root = {record.key for record in records}
    added = sorted(in_root - set(folds.assignment))
    removed = sorted(set(folds.assignment) - in_root)
    if digest != folds.image_list_sha256:
        if added or removed:
            changes = _changes(added, "added", removed, "removed")
            raise SegensError(f"{where}: the training images of {root} changed since these folds were made: "
                              f"{changes}; {_REMAKE} {root}")
        raise SegensError(f"{where}: image list hash {folds.image_list_sha256[:12]}... does not match the training "
                          f"images of {root} ({digest[:12]}...); {_REMAKE} {root}")
    if added or removed:  # same image list, different entries: the file itself was edited
        changes = _changes(added, "training image(s) without a fold", removed, "entries naming no image")
        raise SegensError(f"{where}: every training image of {root} must be in exactly one fold, but there are "
                          f"{changes}; {_REMAKE} {root}")


def _changes(first: list[str], first_what: str, second: list[str], second_what: str) -> str:
    """``"2 added (first ID003/a), 1 removed (first ID009/b)"``, leaving out an empty side."""
    parts = [(keys, what) for keys, what in ((first, first_what), (second, second_what)) if keys]
    return ", ".join(f"{len(keys)} {what} (first {keys[0]})" for keys, what in parts)
