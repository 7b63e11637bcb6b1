"""The store's quantization, the one place where a probability becomes a stored level and back:
v = round(clip(p, 0, 1) * 255) (half to even, computed in float32) and p = v / 255 (float32). Every reader
(combine, the search's evidence, evaluate, calibration) takes p from here, so what the search scores is what
combine writes. Calibration fits its tables in float64 (segens.voting.calibration): it asks for the same formula
in float64 (``dtype``), so the one formula keeps one home and its tables keep their bytes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from segens.errors import SegensError

if TYPE_CHECKING:
    import torch

SCALE = 255
QUANTIZATION = {"dtype": "uint8", "scale": SCALE}
_QUANTIZE_BLOCK = 1 << 18


def quantize(prob: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """float probabilities in [0, 1] (any shape; computed in ``dtype``: float32, the store's, unless a caller
    needs float64) -> uint8 v = round(clip(p, 0, 1) * 255), half to even. NaN is a SegensError."""
    flat = np.ascontiguousarray(prob, dtype=dtype).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint8)
    scratch = np.empty(min(flat.size, _QUANTIZE_BLOCK), dtype=dtype)  # blocks: no full-size temporaries
    for start in range(0, flat.size, _QUANTIZE_BLOCK):
        block = scratch[:min(_QUANTIZE_BLOCK, flat.size - start)]
        np.clip(flat[start:start + block.size], 0, 1, out=block)
        if np.isnan(block.max()):
            raise SegensError("probabilities contain NaN: the model produced NaN; check the checkpoint and input")
        block *= dtype(SCALE)
        np.rint(block, out=block)
        out[start:start + block.size] = block
    return out.reshape(np.shape(prob))


def dequantize(values: np.ndarray, dtype: type[np.floating] = np.float32) -> np.ndarray:
    """Quantized values (uint8 levels, or any whole numbers 0..255) -> probabilities p = v / 255 in ``dtype``
    (float32, the store's, unless a caller needs float64)."""
    return np.divide(values, dtype(SCALE), dtype=dtype)


LEVELS = dequantize(np.arange(SCALE + 1, dtype=np.uint8))
"""(256,) float32: the probability of each stored level, ``dequantize`` of 0..255 (a lookup table)."""


def quantize_torch(probabilities: torch.Tensor) -> torch.Tensor:
    """float32 probabilities (any shape, any device) -> uint8 ``round(clip(p, 0, 1) * 255)``, half to even: the
    values of ``quantize``, computed where the tensor is (in place)."""
    import torch

    scaled = probabilities.clamp_(0, 1).mul_(np.float32(SCALE))
    return torch.round(scaled).to(torch.uint8)
