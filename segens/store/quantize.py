"""The store's quantization, the one place where a probability becomes a stored level and back:
v = round(clip(p, 0, 1) * 255) (half to even, computed in float32) and p = v / 255 (float32). Every reader
(combine, the search's evidence, evaluate, calibration) takes p from here, so what the search scores is what
combine writes."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from segens.errors import SegensError

if TYPE_CHECKING:
    import torch

SCALE = 255
QUANTIZATION = {"dtype": "uint8", "scale": SCALE}
_QUANTIZE_BLOCK = 1 << 18


def quantize(prob: np.ndarray) -> np.ndarray:
    """float probabilities in [0, 1] (any shape; computed in float32) -> uint8 v = round(p * 255), half to even,
    clipped to 0..255. NaN is a SegensError."""
    flat = np.ascontiguousarray(prob, dtype=np.float32).reshape(-1)
    out = np.empty(flat.size, dtype=np.uint8)
    scratch = np.empty(min(flat.size, _QUANTIZE_BLOCK), dtype=np.float32)  # blocks: no full-size temporaries
    for start in range(0, flat.size, _QUANTIZE_BLOCK):
        block = scratch[:min(_QUANTIZE_BLOCK, flat.size - start)]
        np.clip(flat[start:start + block.size], 0, 1, out=block)
        if np.isnan(block.max()):
            raise SegensError("probabilities contain NaN: the model produced NaN; check the checkpoint and input")
        block *= np.float32(SCALE)
        np.rint(block, out=block)
        out[start:start + block.size] = block
    return out.reshape(np.shape(prob))


def dequantize(values: np.ndarray) -> np.ndarray:
    """uint8 quantized values -> float32 probabilities p = v / 255."""
    return np.divide(values, np.float32(SCALE), dtype=np.float32)


LEVELS = dequantize(np.arange(SCALE + 1, dtype=np.uint8))
"""(256,) float32: the probability of each stored level, ``dequantize`` of 0..255 (a lookup table)."""


def quantize_torch(probabilities: torch.Tensor) -> torch.Tensor:
    """float32 probabilities (any shape, any device) -> uint8 ``round(clip(p, 0, 1) * 255)``, half to even: the
    values of ``quantize``, computed where the tensor is (in place)."""
    import torch

    scaled = probabilities.clamp_(0, 1).mul_(np.float32(SCALE))
    return torch.round(scaled).to(torch.uint8)
