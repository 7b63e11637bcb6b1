"""Test-time augmentation, shared by every kind that runs a network: the passes of a spec's ``tta`` (the plain
pass first, then each entry in order), how a pass flips its input and flips its output back, the input size of a
scaled pass, and the mean of the passes (summed in order, divided once, in float32)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

Maps = TypeVar("Maps", np.ndarray, torch.Tensor)


@dataclass(frozen=True)
class Pass:
    """One test-time pass: flips and the input scale (1 is the spec's input size)."""

    hflip: bool = False
    vflip: bool = False
    scale: float = 1.0

    def flip(self, array: Maps, rows: int = -2, cols: int = -1) -> Maps:
        """``array`` (numpy or torch) with this pass's flips applied; applied twice, the original (flips are their
        own inverse), so the same call flips an input and flips its output back. ``rows``/``cols``: which axes."""
        axes = [axis for axis, flipped in ((cols, self.hflip), (rows, self.vflip)) if flipped]
        if not axes:
            return array
        if isinstance(array, torch.Tensor):
            return array.flip(axes)
        return np.flip(array, axis=tuple(axes))

    def input_size(self, size: Sequence[int], stride: int) -> tuple[int, int]:
        """The input size of this pass for a spec's input ``size``: scaled and rounded to a multiple of ``stride``."""
        return scaled_size(size, self.scale, stride) if self.scale != 1 else tuple(size)  # type: ignore[return-value]


def tta_passes(tta: Sequence[Any]) -> list[Pass]:
    """The plain pass followed by one pass per TTA entry, in the spec's order."""
    passes = [Pass()]
    for entry in tta:
        if entry == "hflip":
            passes.append(Pass(hflip=True))
        elif entry == "vflip":
            passes.append(Pass(vflip=True))
        else:
            passes.append(Pass(scale=float(entry["scale"])))
    return passes


def scaled_size(size: Sequence[int], scale: float, stride: int) -> tuple[int, int]:
    """``size`` x ``scale`` with each side rounded to a multiple of ``stride`` (at least one stride)."""
    return tuple(max(stride, int(round(side * scale / stride)) * stride) for side in size)  # type: ignore[return-value]


def mean_in_order(terms: Iterable[Maps]) -> Maps:
    """The float32 mean of maps (numpy or torch): summed in the given order, divided once by their count."""
    total, count = None, 0
    for term in terms:
        total = term if total is None else total + term
        count += 1
    if total is None:
        raise ValueError("mean_in_order needs at least one term")
    return total / np.float32(count)
