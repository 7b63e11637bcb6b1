"""Training data decoded once per run: each labelled image is read, resized by the member's input contract and its
label polygons filled at the input size once, kept as uint8 in memory (optionally also on disk, shared by the
folds and reruns of a member), then augmented and scaled per batch.

The contract is any object with ``size``, ``read``, ``resize_image``, ``to_tensor`` and ``to_dict`` (a
segens.members.input_contract.InputContract); this package does not import the member kinds that use it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch.utils.data import Dataset

from segens.conventions.dataset import ImageRecord
from segens.conventions.labels import check_points_inside, parse_label_json, rasterize
from segens.errors import SegensError
from segens.infra.atomic import atomic_write
from segens.infra.progress import progress_bar


class Contract(Protocol):
    """What training needs of an input contract (segens.members.input_contract.InputContract)."""

    size: tuple[int, int]

    def read(self, path: str | Path) -> np.ndarray: ...
    def resize_image(self, image: np.ndarray, size: Sequence[int] | None = None) -> np.ndarray: ...
    def to_tensor(self, image: torch.Tensor) -> torch.Tensor: ...
    def to_dict(self) -> dict[str, Any]: ...


def record_masks_at(record: ImageRecord, image_shape: tuple[int, int], size: tuple[int, int],
                    require_all: bool = True) -> np.ndarray:
    """A record's label polygons scaled to ``size`` (height, width) and filled there: (29, height, width) uint8
    (``require_all=False``: a pseudo-label's missing classes are empty)."""
    if record.label_path is None:
        raise SegensError(f"{record.image_path}: no label file; a training image needs outputs_json/<same path>.json")
    polygons = parse_label_json(record.label_path, require_all=require_all)
    check_points_inside(record.label_path, polygons, *image_shape)
    scale = np.array([size[1] / image_shape[1], size[0] / image_shape[0]])
    scaled = {name: np.rint(points * scale).astype(np.int32) for name, points in polygons.items()}
    return rasterize(scaled, *size).view(np.uint8)


@dataclass(frozen=True)
class CachedImage:
    """One training image at the input size: ``image`` (h, w) or (h, w, 3) uint8 as the contract resized it,
    ``masks`` (29, h, w) uint8 in {0, 1}."""

    key: str
    image: np.ndarray
    masks: np.ndarray


def decode(record: ImageRecord, contract: Contract) -> CachedImage:
    """Read, resize and rasterize one record as the input contract says (the per-image work done once)."""
    image = contract.read(record.image_path)
    masks = record_masks_at(record, image.shape[:2], tuple(contract.size))
    return CachedImage(record.key, np.ascontiguousarray(contract.resize_image(image)), masks)


def _cache_name(record: ImageRecord, contract: Contract) -> str:
    """A file name that changes when the image, its labels or the contract change."""
    parts = [str(Path(record.image_path).resolve()), json.dumps(contract.to_dict(), sort_keys=True)]
    for path in (record.image_path, record.label_path):
        stat = Path(path).stat()
        parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32] + ".npz"


def _load_cached(path: Path, key: str) -> CachedImage | None:
    try:
        with np.load(path) as saved:
            return CachedImage(key, saved["image"], saved["masks"])
    except (OSError, ValueError, KeyError):  # unreadable or half-written by a killed run: decode again
        return None


def cache_records(records: Sequence[ImageRecord], contract: Contract, folder: str | Path | None = None,
                  progress: bool = False, label: str = "cache") -> list[CachedImage]:
    """Every record decoded once (see ``decode``); with ``folder``, each is also kept there as an .npz (written
    atomically) and read back from it by later folds and runs."""
    folder = Path(folder) if folder is not None else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    items = []
    with progress_bar("img", disable=not progress, transient=True) as bar:
        task = bar.add_task(label, total=len(records))
        for record in records:
            item = None
            if folder is not None:
                path = folder / _cache_name(record, contract)
                item = _load_cached(path, record.key) if path.is_file() else None
            if item is None:
                item = decode(record, contract)
                if folder is not None:
                    buffer = io.BytesIO()
                    np.savez(buffer, image=item.image, masks=item.masks)
                    with atomic_write(path, "wb") as handle:
                        handle.write(buffer.getvalue())
            items.append(item)
            bar.update(task, advance=1)
    return items


class CachedImages(Dataset):
    """Item i: (image float32 (channels, h, w) as the input contract makes it, masks float32 (29, h, w)): the
    cached uint8 image augmented, then scaled and normalized by the contract, so training sees what prediction
    sees."""

    def __init__(self, items: Sequence[CachedImage], contract: Contract,
                 augment: Callable[[np.ndarray, np.ndarray], tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.items = list(items)
        self.contract = contract
        self.augment = augment

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = self.items[index]
        pixels, masks = self.augment(item.image, item.masks)
        return self.contract.to_tensor(pixels), masks


class LabelledImages(CachedImages):
    """The uncached path: each item decodes its PNG and fills its polygons again (kept as the benchmark's
    baseline and for one-off use); items equal CachedImages' for the same augmentation draws."""

    def __init__(self, records: Sequence[ImageRecord], contract: Contract, augment) -> None:
        super().__init__([], contract, augment)
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        item = decode(self.records[index], self.contract)
        pixels, masks = self.augment(item.image, item.masks)
        return self.contract.to_tensor(pixels), masks
