"""A torch Dataset of labelled images made into network input by the member's input contract, for training."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from segens.dataset import ImageRecord
from segens.labels import check_points_inside, parse_label_json, rasterize
from segens.members.input_contract import InputContract


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 -> (height, width) uint8 with area interpolation (bilinear when enlarging): the default
    input contract's resize."""
    return InputContract(size=tuple(size)).resize_image(image)


def record_masks_at(record: ImageRecord, image_shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A record's label polygons scaled to ``size`` and filled there: (29, height, width) uint8."""
    polygons = parse_label_json(record.label_path)
    check_points_inside(record.label_path, polygons, *image_shape)
    scale = np.array([size[1] / image_shape[1], size[0] / image_shape[0]])
    scaled = {name: np.rint(points * scale).astype(np.int32) for name, points in polygons.items()}
    return rasterize(scaled, *size).view(np.uint8)


class LabelledImages(Dataset):
    """Item i: (image float32 (channels, h, w) as the input contract makes it, masks float32 (29, h, w)) at the
    contract's size; the image is read and resized by the contract, augmented, then scaled and normalized, so
    training sees what prediction sees."""

    def __init__(self, records: Sequence[ImageRecord], contract: InputContract, augment):
        self.records = list(records)
        self.contract = contract
        self.size = contract.size
        self.augment = augment

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[index]
        image = self.contract.read(record.image_path)
        masks = record_masks_at(record, image.shape[:2], self.size)
        pixels, mask_tensor = self.augment(self.contract.resize_image(image), masks)
        return self.contract.to_tensor(pixels), mask_tensor
