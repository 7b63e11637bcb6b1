"""``folds.json``: the only reader and writer of the format, and the ``Folds`` it holds::

    {"version": 1, "k": 5, "method": "group" | "stratified-group", "stratify": "bmi" | null, "seed": 0,
     "shuffle": true, "sklearn_version": "1.9.1",
     "image_list_sha256": "<sha256 of the sorted image relpaths, each followed by a newline>",
     "bins": ["<18.5", "18.5-25", ...] | null,      # stratification bins, in display order
     "strata": {"ID001": "18.5-25", ...} | null,     # patient -> bin
     "folds": {"ID001/image1661130828152_R": 0, ...}}  # image key (relpath without extension) -> fold

Both hands of a patient (one ``IDxxx`` folder) are always in the same fold; a file is checked against the data root
it is used with (the image list's hash, every image assigned once).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from segens.conventions.dataset import discover
from segens.errors import SegensError
from segens.infra.atomic import atomic_write_text
from segens.infra.safeload import load_json, validate

VERSION = 1
METHODS = ("group", "stratified-group")
MAX_FOLDS = 1000
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
