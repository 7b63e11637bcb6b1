"""The input contract: how a PNG becomes a network's input tensor, the same in training and prediction.

```yaml
input:
  size: [1024, 1024]   # (height, width) the image is resized to (``input_size`` of version-1 specs)
  channels: 3          # 1 or 3
  color: gray          # gray: the grayscale image (repeated to 3 channels); rgb | bgr: the PNG read in colour
  scale: 255           # pixel values are divided by this first (1 keeps 0..255)
  normalize: none      # none | imagenet | {mean: [..], std: [..]}: (x / scale - mean[c]) / std[c], per channel
  resize: area         # area (area when shrinking, bilinear when enlarging) | bilinear | nearest
```

The defaults are what segens has always done: grayscale / 255 repeated to 3 channels, no normalization, area
resize. Mean and std apply to the tensor's channels in order (as albumentations' ``Normalize`` does on the array
it is given): a script that reads BGR with ``cv2.imread`` and normalizes with ImageNet's mean says ``color: bgr``
and ``normalize: imagenet``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from segens.errors import SegensError

COLORS = ("gray", "rgb", "bgr")
RESIZES = ("area", "bilinear", "nearest")
IMAGENET = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}
MAX_SIDE = 8192
"""Largest input side a spec may ask for (a 2048 image is the competition's; 4x that is surely a typo)."""


@dataclass(frozen=True)
class InputContract:
    """How a PNG becomes the network's (channels, height, width) float32 tensor; see the module docstring."""

    size: tuple[int, int] = (512, 512)
    channels: int = 3
    color: str = "gray"
    scale: float = 255.0
    normalize: str | tuple[tuple[float, ...], tuple[float, ...]] = "none"  # or (mean, std)
    resize: str = "area"

    def __post_init__(self) -> None:
        where = "input"
        if self.color not in COLORS:
            raise SegensError(f"{where}.color {self.color!r} is unknown; use one of {', '.join(COLORS)}")
        if self.resize not in RESIZES:
            raise SegensError(f"{where}.resize {self.resize!r} is unknown; use one of {', '.join(RESIZES)}")
        if self.channels not in (1, 3):
            raise SegensError(f"{where}.channels must be 1 or 3, got {self.channels!r}")
        if self.channels == 1 and self.color != "gray":
            raise SegensError(f"{where}: channels 1 needs color gray (color {self.color!r} makes 3 channels)")
        if not (isinstance(self.scale, (int, float)) and math.isfinite(self.scale) and self.scale > 0):
            raise SegensError(f"{where}.scale must be a positive finite number, got {self.scale!r}")
        if isinstance(self.normalize, str):
            if self.normalize not in ("none", "imagenet"):
                raise SegensError(f"{where}.normalize {self.normalize!r} is unknown; use none, imagenet or "
                                  "{mean: [...], std: [...]}")
            if self.normalize == "imagenet" and self.channels != 3:
                raise SegensError(f"{where}: normalize imagenet has 3 means and stds but channels is {self.channels}")
        else:
            mean, std = self.normalize
            for name, values in (("mean", mean), ("std", std)):
                if len(values) != self.channels:
                    raise SegensError(f"{where}.normalize.{name} has {len(values)} value(s) but channels is "
                                      f"{self.channels}; give one per channel")
            if any(not math.isfinite(v) for v in (*mean, *std)) or any(v <= 0 for v in std):
                raise SegensError(f"{where}.normalize: mean must be finite and std positive, got {mean} / {std}")
        self._check_float32(where)

    def _check_float32(self, where: str) -> None:
        """The tensor is made in float32: the scale, means and stds must stay finite and non-zero there, and the
        scaled, normalized values of every possible pixel (0 .. 65535) finite and not all zero."""
        with np.errstate(all="ignore"):
            scale = np.float32(self.scale)
            pixels = np.array([0, 1, 255, 65535], np.float32) / scale
            if not (np.isfinite(scale) and scale > 0 and np.isfinite(pixels).all() and pixels[1] > 0):
                raise SegensError(f"{where}.scale {self.scale!r} is out of float32's range (the tensor's type): pixel "
                                  "values would become 0 or infinite; use a scale such as 255 or 1")
            stats = self.mean_std
            if stats is None:
                return
            mean, std = (np.asarray(values, np.float32) for values in stats)
            normalized = (pixels[:, None] - mean[None, :]) / std[None, :]
            if not (np.isfinite(mean).all() and np.isfinite(std).all() and (std > 0).all()
                    and np.isfinite(normalized).all()):
                raise SegensError(f"{where}.normalize: mean {list(stats[0])} / std {list(stats[1])} are out of "
                                  "float32's range (the tensor's type): normalized pixels would be infinite or NaN")

    # ---- the document form ----------------------------------------------------------------------------------
    @classmethod
    def from_document(cls, document: Mapping[str, Any], size: tuple[int, int]) -> InputContract:
        """From a validated spec's ``input`` mapping (missing fields take the defaults) and the resolved size."""
        normalize = document.get("normalize", "none")
        if isinstance(normalize, Mapping):
            normalize = (tuple(float(v) for v in normalize["mean"]), tuple(float(v) for v in normalize["std"]))
        return cls(size=tuple(size), channels=int(document.get("channels", 3)), color=document.get("color", "gray"),
                   scale=float(document.get("scale", 255)), normalize=normalize,
                   resize=document.get("resize", "area"))

    def to_dict(self) -> dict[str, Any]:
        """Every field, defaults filled in (what specs, checkpoints and store attributes record)."""
        normalize: Any = self.normalize
        if not isinstance(normalize, str):
            normalize = {"mean": [float(v) for v in normalize[0]], "std": [float(v) for v in normalize[1]]}
        scale = int(self.scale) if float(self.scale).is_integer() else float(self.scale)
        return {"size": [int(self.size[0]), int(self.size[1])], "channels": self.channels, "color": self.color,
                "scale": scale, "normalize": normalize, "resize": self.resize}

    @property
    def mean_std(self) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
        """(mean, std) per channel, or None without normalization."""
        if self.normalize == "none":
            return None
        if self.normalize == "imagenet":
            return IMAGENET["mean"], IMAGENET["std"]
        return self.normalize  # type: ignore[return-value]

    def check_recorded(self, recorded: Mapping[str, Any] | None, where: str | Path, spec_where: str | Path) -> None:
        """A SegensError naming both values when a checkpoint's recorded contract differs from this one."""
        if not recorded:
            return
        mine = self.to_dict()
        theirs = InputContract.from_document(recorded, tuple(recorded.get("size", mine["size"]))).to_dict()
        for key in mine:
            if mine[key] != theirs[key]:
                raise SegensError(f"{spec_where}: input.{key} is {mine[key]!r} but checkpoint {where} was trained "
                                  f"with input.{key} {theirs[key]!r}; make the spec's input say {theirs[key]!r}")

    # ---- pixels -----------------------------------------------------------------------------------------------
    def read(self, path: str | Path) -> np.ndarray:
        """A PNG as this contract sees it: (H, W) uint8 for gray, (H, W, 3) uint8 in rgb or bgr order."""
        from segens.conventions.dataset import read_image

        return read_image(path, self.color)

    def resize_image(self, image: np.ndarray, size: Sequence[int] | None = None) -> np.ndarray:
        """(H, W[, 3]) uint8 -> (height, width[, 3]) uint8 at ``size`` (default: the contract's) by ``resize``."""
        height, width = size if size is not None else self.size
        if image.shape[:2] == (height, width):
            return image
        if self.resize == "nearest":
            mode = cv2.INTER_NEAREST
        elif self.resize == "bilinear":
            mode = cv2.INTER_LINEAR
        else:
            shrinking = height < image.shape[0] and width < image.shape[1]
            mode = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        return cv2.resize(image, (width, height), interpolation=mode)

    def to_tensor(self, image: torch.Tensor) -> torch.Tensor:
        """(..., C0, h, w) pixel values (0..255, float32 or uint8; C0 = 1 for gray, 3 otherwise) -> the network's
        (..., channels, h, w) float32: divided by ``scale``, repeated to 3 channels for gray, normalized."""
        tensor = image.float() / float(self.scale)
        if self.channels == 3 and tensor.shape[-3] == 1:
            tensor = tensor.expand(*tensor.shape[:-3], 3, *tensor.shape[-2:])
        pair = self.mean_std
        if pair is not None:
            mean = torch.tensor(pair[0], dtype=torch.float32).view(-1, 1, 1)
            std = torch.tensor(pair[1], dtype=torch.float32).view(-1, 1, 1)
            tensor = (tensor - mean) / std
        return tensor.contiguous()

    def batch(self, images: Sequence[np.ndarray], size: Sequence[int] | None = None) -> torch.Tensor:
        """Images as ``read`` returns them -> (N, channels, h, w) float32 at ``size`` (default: the contract's)."""
        resized = [self.resize_image(image, size) for image in images]
        pixels = torch.from_numpy(np.stack([_channels_first(image) for image in resized]))
        return self.to_tensor(pixels)


def _channels_first(image: np.ndarray) -> np.ndarray:
    """(h, w) -> (1, h, w); (h, w, 3) -> (3, h, w)."""
    return image[None] if image.ndim == 2 else np.ascontiguousarray(image.transpose(2, 0, 1))
