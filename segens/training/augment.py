"""Training augmentations selected in a member spec, built on torchvision's v2 transforms (which move masks
with images) and OpenCV's CLAHE.

``train: {augment: {hflip: 0.5, rotate: 15, clahe: 0.3, brightness_contrast: 0.2}}``: a probability for
hflip and clahe, a maximum angle in degrees for rotate, a maximum relative change for brightness/contrast.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import cv2
import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from segens.errors import SegensError

AUGMENTATIONS = ("hflip", "rotate", "clahe", "brightness_contrast")


class Augment:
    """Callable (image uint8 (H, W) or (H, W, 3), masks uint8 (C, H, W), rng) -> (image float32 (1 or 3, H, W)
    pixel values in 0..255, masks float32 (C, H, W)); with an empty config it only converts. Scaling and
    normalization are the input contract's, applied after this."""

    def __init__(self, config: Mapping[str, Any] | None, where: str = "member spec") -> None:
        config = dict(config or {})
        unknown = sorted(set(config) - set(AUGMENTATIONS))
        if unknown:
            raise SegensError(f"{where}: unknown augmentation(s) {', '.join(unknown)}; choose from {', '.join(AUGMENTATIONS)}")
        self.clahe_probability = float(config.get("clahe", 0.0))
        geometric = []
        if config.get("hflip"):
            geometric.append(v2.RandomHorizontalFlip(p=float(config["hflip"])))
        if config.get("rotate"):
            geometric.append(v2.RandomRotation(degrees=float(config["rotate"])))
        photometric = []
        if config.get("brightness_contrast"):
            amount = float(config["brightness_contrast"])
            photometric.append(v2.ColorJitter(brightness=amount, contrast=amount))
        self.geometric = v2.Compose(geometric) if geometric else None
        self.photometric = v2.Compose(photometric) if photometric else None
        self._clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))

    def __call__(self, image: np.ndarray, masks: np.ndarray, generator: torch.Generator | None = None):
        if self.clahe_probability and torch.rand(1, generator=generator).item() < self.clahe_probability:
            image = self._clahe.apply(image) if image.ndim == 2 else _clahe_colour(self._clahe, image)
        pixels = torch.from_numpy(np.ascontiguousarray(image))
        image_tensor = tv_tensors.Image(pixels[None] if image.ndim == 2 else pixels.permute(2, 0, 1))
        mask_tensor = tv_tensors.Mask(torch.from_numpy(np.ascontiguousarray(masks)))
        if self.geometric is not None:
            image_tensor, mask_tensor = self.geometric(image_tensor, mask_tensor)
        if self.photometric is not None:
            image_tensor = self.photometric(image_tensor)
        return image_tensor.as_subclass(torch.Tensor).float(), mask_tensor.as_subclass(torch.Tensor).float()


def _clahe_colour(clahe: cv2.CLAHE, image: np.ndarray) -> np.ndarray:
    """CLAHE of a colour image on its lightness only (channels keep their order)."""
    lab = cv2.cvtColor(image, cv2.COLOR_BGR2LAB)
    lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
    return cv2.cvtColor(lab, cv2.COLOR_LAB2BGR)
