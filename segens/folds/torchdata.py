"""A torch Dataset of labelled images resized to a member's input size, for training and validation."""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from segens.dataset import ImageRecord, read_image
from segens.labels import check_points_inside, parse_label_json, rasterize


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(H, W) uint8 -> (height, width) uint8 with area interpolation (bilinear when enlarging)."""
    height, width = size
    if image.shape == (height, width):
        return image
    shrinking = height < image.shape[0] and width < image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


def record_masks_at(record: ImageRecord, image_shape: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """A record's label polygons scaled to ``size`` and filled there: (29, height, width) uint8."""
    polygons = parse_label_json(record.label_path)
    check_points_inside(record.label_path, polygons, *image_shape)
    scale = np.array([size[1] / image_shape[1], size[0] / image_shape[0]])
    scaled = {name: np.rint(points * scale).astype(np.int32) for name, points in polygons.items()}
    return rasterize(scaled, *size).view(np.uint8)


class LabelledImages(Dataset):
    """Item i: (image float32 (in_channels, h, w) in [0, 1], masks float32 (29, h, w)) at the input size."""

    def __init__(self, records: Sequence[ImageRecord], size: tuple[int, int], augment, in_channels: int = 3):
        self.records = list(records)
        self.size = size
        self.augment = augment
        self.in_channels = in_channels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        record = self.records[index]
        image = read_image(record.image_path)
        masks = record_masks_at(record, image.shape, self.size)
        image_tensor, mask_tensor = self.augment(resize_image(image, self.size), masks)
        return image_tensor.expand(self.in_channels, -1, -1).contiguous(), mask_tensor
