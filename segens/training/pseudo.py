"""Pseudo-labelled training images (``ens train-member --pseudo``): decoded once like labelled ones, with the
pixels their ignore mask names marked so that the loss leaves them out (segens.training.losses, ``ignore``).

A cached pseudo image's ``masks`` are (29, h, w) uint8 at the input size: 1 inside the pseudo-label's polygon, 0
outside, ``IGNORE`` (255) where the ignore mask says the label may be wrong. Augmentation moves masks with nearest
interpolation, so 255 stays 255; the loss treats a target of 255 as 'not seen'. The ignore mask (stored at the
image's original size) is resized to the input size conservatively: an input pixel is ignored when any original
pixel under it is. This package does not read the pseudo folder itself: the members' driver hands it a
``PseudoSource`` (segens.store.pseudo_folder.PseudoFolder).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import cv2
import numpy as np

from segens.conventions.dataset import ImageRecord
from segens.errors import SegensError
from segens.infra.progress import progress_bar
from segens.training.data import CachedImage, Contract, record_masks_at

IGNORE = 255
"""The target value of a pixel left out of the loss."""


class PseudoSource(Protocol):
    """Pseudo-labelled images: their records (label files may lack classes), each one's ignore mask, and what a
    checkpoint trained on them records (``identity``: recipe sha256, counts, folder)."""

    records: Sequence[ImageRecord]

    def ignore(self, key: str) -> np.ndarray:
        """(29, H, W) bool at the image's original size: True where the label must not be learnt."""
        ...

    def identity(self) -> dict[str, Any]: ...


def resize_ignore(ignore: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(29, H, W) bool -> (29, h, w) bool at ``size`` (height, width): True where any original pixel under an
    input pixel is True (area resize of the 0/1 mask, then > 0)."""
    if ignore.shape[1:] == tuple(size):
        return ignore.copy()
    planes = np.ascontiguousarray(ignore.transpose(1, 2, 0), dtype=np.float32)
    resized = cv2.resize(planes, (size[1], size[0]), interpolation=cv2.INTER_AREA)
    return resized.reshape(size[0], size[1], -1).transpose(2, 0, 1) > 0


def decode_pseudo(record: ImageRecord, ignore: np.ndarray, contract: Contract) -> CachedImage:
    """One pseudo image at the input size: the image as the contract reads and resizes it, its polygons filled
    (classes without annotation empty) and ``IGNORE`` where ``ignore`` (its (29, H, W) bool mask) says."""
    image = contract.read(record.image_path)
    if ignore.shape[1:] != image.shape[:2]:
        raise SegensError(f"{record.image_path}: the pseudo-label's ignore mask is {ignore.shape[2]}x{ignore.shape[1]}"
                          f", the image {image.shape[1]}x{image.shape[0]}; write the pseudo folder again with "
                          "`ens pseudo-label`")
    size = tuple(contract.size)
    masks = record_masks_at(record, image.shape[:2], size, require_all=False)
    masks[resize_ignore(ignore, size)] = IGNORE
    return CachedImage(record.key, np.ascontiguousarray(contract.resize_image(image)), masks)


def pseudo_items(source: PseudoSource, contract: Contract, progress: bool = False) -> list[CachedImage]:
    """Every pseudo image decoded once, in memory (``decode_pseudo``)."""
    items = []
    with progress_bar("img", disable=not progress, transient=True) as bar:
        task = bar.add_task("decode pseudo", total=len(source.records))
        for record in source.records:
            items.append(decode_pseudo(record, source.ignore(record.key), contract))
            bar.update(task, advance=1)
    return items
