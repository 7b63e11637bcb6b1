"""The pseudo-label folder (``ens pseudo-label``'s output, ``ens train-member --pseudo``'s input): its layout,
its manifest, and reading it back. The only reader and writer of the format (version 1).

```
pseudo/
  pseudo.json                      the manifest, written last: format, version, recipe (path, sha256, strategy),
                                   stores (url, member, checkpoint sha256), data root, filters (max_qc_score,
                                   min_confidence, band, ignore), counts, and the image keys written
  train/DCM/IDxxx/<name>.png       the test image (a hard link, or a copy across file systems)
  train/outputs_json/IDxxx/<name>.json
                                   its label file in the competition's layout: one poly_seg annotation per class
                                   that passed the filters, with "confidence" and "qc_score"; filtered classes have
                                   none (read it with require_all=False)
  ignore.zarr                      a mask store (role masks, member "pseudo-ignore", split test): per written image a
                                   (29, H, W) uint8 array, 255 where the label must not be learnt, 0 elsewhere
  pairs.csv                        per (image, class): written, why not, confidence, qc score, ignored share
  qc.csv                           ``ens qc``'s table for these images (the scores the filter used)
```
The folder is a data root (``train/DCM``, ``train/outputs_json``) that segens' reader (segens.conventions.dataset)
accepts; nothing else may be written inside it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic

from segens.conventions.dataset import ImageRecord, discover
from segens.errors import SegensError
from segens.infra.atomic import atomic_write_text
from segens.infra.safeload import load_json, validate
from segens.store import ProbabilityStore, create_store, open_store

FORMAT = "segens-pseudo-labels"
VERSION = 1
MANIFEST = "pseudo.json"
IGNORE_STORE = "ignore.zarr"
PAIRS = "pairs.csv"
QC = "qc.csv"
SPLIT = "train"
"""The pseudo folder's images are a data root's training images."""
IGNORE_MEMBER, IGNORE_KIND = "pseudo-ignore", "ignore"


class _Strict(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True, extra="forbid", allow_inf_nan=False)


class Filters(_Strict):
    """What decided which (image, class) pairs are written and which pixels are ignored."""

    max_qc_score: float = pydantic.Field(ge=0, le=1)
    min_confidence: float = pydantic.Field(ge=0, le=1)
    band: float = pydantic.Field(ge=0, le=1)
    ignore: bool


class Manifest(_Strict):
    """pseudo.json (see the module docstring); ``counts`` maps names to whole numbers or shares."""

    format: Literal["segens-pseudo-labels"]
    version: int
    recipe: dict[str, str]
    stores: list[dict[str, Any]]
    data: str
    filters: Filters
    counts: dict[str, float | int]
    images: list[str]


def create_ignore_store(path: Path, images: list[str], recipe_sha256: str, filters: Filters) -> ProbabilityStore:
    """An ignore store at ``path`` (the folder's is ``<folder>/IGNORE_STORE``) for ``images`` (their keys)."""
    return create_store(path, IGNORE_MEMBER, IGNORE_KIND, "test",
                        {"recipe_sha256": recipe_sha256, "filters": filters.model_dump()}, {}, images=images,
                        role="masks")


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    """pseudo.json, atomically (written last: a folder without it is unfinished)."""
    path = folder / MANIFEST
    atomic_write_text(path, manifest.model_dump_json(indent=1))
    return path


@dataclass
class PseudoFolder:
    """An opened pseudo folder: its manifest, records (image and label file of each written image) and ignore
    store; a segens.training.pseudo.PseudoSource."""

    path: Path
    manifest: Manifest
    manifest_sha256: str
    records: list[ImageRecord]
    store: ProbabilityStore

    def ignore(self, key: str) -> np.ndarray:
        """(29, H, W) bool at the image's size: True where the label must not be learnt."""
        return self.store.read(key) > 0

    def identity(self) -> dict[str, Any]:
        """What a checkpoint trained on this folder records."""
        return {"folder": str(self.path.resolve()), "manifest_sha256": self.manifest_sha256,
                "recipe_sha256": self.manifest.recipe["sha256"], "images": len(self.records),
                "annotated_pairs": int(self.manifest.counts.get("annotated", 0))}


def load_pseudo(folder: str | Path) -> PseudoFolder:
    """Open a pseudo folder and check it: the manifest's format and version, its images against the label files
    and the ignore store; a SegensError naming the file otherwise."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not folder.is_dir():
        raise SegensError(f"{folder}: no such folder; make it with `ens pseudo-label`")
    if not path.is_file():
        raise SegensError(f"{path}: not found: {folder} is not a finished `ens pseudo-label` folder (its manifest is "
                          "written last); run `ens pseudo-label` again")
    raw = load_json(path, "pseudo-label manifest")
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise SegensError(f"{path}: not a segens pseudo-label manifest (format {FORMAT!r})")
    if raw.get("version") != VERSION:
        raise SegensError(f"{path}: pseudo-label folder version {raw.get('version')!r}; this segens reads version "
                          f"{VERSION}: write the folder again with `ens pseudo-label`")
    manifest = validate(Manifest, raw, path)
    records = discover(folder, SPLIT).records
    keys = [record.key for record in records]
    if sorted(keys) != sorted(manifest.images):
        extra = sorted(set(keys) ^ set(manifest.images))[0]
        raise SegensError(f"{folder}: image {extra!r} is {'not ' if extra in keys else ''}in the manifest but "
                          f"{'' if extra in keys else 'not '}in {SPLIT}/; the folder was changed by hand: write it "
                          "again with `ens pseudo-label`")
    store = open_store(folder / IGNORE_STORE)
    if store.role != "masks" or store.member != IGNORE_MEMBER:
        raise SegensError(f"{store.url}: not a pseudo-label ignore store (member {IGNORE_MEMBER!r}, role masks)")
    missing = sorted(set(keys) - store.completed())
    if missing:
        raise SegensError(f"{store.url}: no ignore mask for image {missing[0]!r}; write the folder again with "
                          "`ens pseudo-label`")
    return PseudoFolder(folder, manifest, hashlib.sha256(path.read_bytes()).hexdigest(), records, store)
