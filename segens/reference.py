"""Straightforward reference implementations, as competitors write them: the baselines that segens must match
exactly (tests, self-check) and beat (bench/). Not used for real work."""

from __future__ import annotations

import numpy as np


def reference_encode(mask: np.ndarray) -> str:
    """The competition baseline's RLE: flatten, pad, diff, join."""
    pixels = mask.flatten().astype(np.uint8)
    pixels = np.concatenate([[0], pixels, [0]])
    runs = np.where(pixels[1:] != pixels[:-1])[0] + 1
    runs[1::2] -= runs[::2]
    return " ".join(str(x) for x in runs)


def reference_decode(rle: str, height: int, width: int) -> np.ndarray:
    """The competition baseline's decoder: a Python loop over runs."""
    tokens = rle.split()
    starts, lengths = [np.asarray(x, dtype=int) for x in (tokens[0:][::2], tokens[1:][::2])]
    starts -= 1
    ends = starts + lengths
    image = np.zeros(height * width, dtype=np.uint8)
    for low, high in zip(starts, ends):
        image[low:high] = 1
    return image.reshape(height, width)


def reference_dice(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per-class Dice of (C, H, W) masks, the baseline's formula in float64."""
    pred = pred.reshape(pred.shape[0], -1).astype(np.float64)
    truth = truth.reshape(truth.shape[0], -1).astype(np.float64)
    intersection = (pred * truth).sum(-1)
    return (2 * intersection + 1e-4) / (pred.sum(-1) + truth.sum(-1) + 1e-4)
