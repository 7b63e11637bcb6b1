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


def reference_combine(store_paths, weights, thresholds, out_csv, tables=None) -> None:
    """The straightforward ensembling pipeline teams use today: per image, read each member's full map with
    zarr as float32, weighted average (weights (29, M) float32, summed member by member), threshold with
    ``>``, reference RLE, pandas CSV. With ``tables`` ((29, M, 256) uint8 calibration levels) each member's
    probability is looked up in its class's float table (level / 255) instead. For benchmarks and exactness tests
    only."""
    import pandas as pd
    import zarr

    from segens.conventions.classes import CLASSES

    groups = [zarr.open_group(str(path), mode="r") for path in store_paths]
    keys = sorted(_array_keys(groups[0]), key=lambda key: key + ".png")
    rows = []
    for key in keys:
        total = None
        for member, group in enumerate(groups):
            if tables is None:
                probabilities = group[key][:].astype(np.float32) / np.float32(255)
            else:
                lookup = tables[:, member].astype(np.float32) / np.float32(255)  # (29, 256) float probabilities
                probabilities = lookup[np.arange(lookup.shape[0])[:, None, None], group[key][:]]
            term = weights[:, member, None, None] * probabilities
            total = term if total is None else total + term
        masks = total > thresholds[:, None, None]
        name = key.rsplit("/", 1)[-1] + ".png"
        rows.extend((name, class_name, reference_encode(mask)) for class_name, mask in zip(CLASSES, masks))
    pd.DataFrame(rows, columns=["image_name", "class", "rle"]).to_csv(out_csv, index=False)


def _array_keys(group, prefix: str = "") -> list[str]:
    keys = []
    for name, node in group.members():
        if hasattr(node, "shape"):
            if node.attrs.get("complete"):
                keys.append(prefix + name)
        else:
            keys.extend(_array_keys(node, prefix + name + "/"))
    return keys


def reference_member_probabilities(models, image: np.ndarray, input_size: tuple[int, int], hflip: bool) -> np.ndarray:
    """A member's (29, H, W) float32 probabilities as a competitor computes them, for the default input contract
    (grey image resized to the input size, area when shrinking else bilinear, / 255, repeated to 3 channels):
    per fold model, sigmoid(bilinear upsampling of model(x)) and, with ``hflip``, the same of the flipped-back
    flipped pass; the mean over every pass of every fold. For exactness tests only."""
    import cv2
    import torch
    import torch.nn.functional as F

    height, width = input_size
    shrinking = height < image.shape[0] and width < image.shape[1]
    resized = image if image.shape == (height, width) else cv2.resize(
        image, (width, height), interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)
    x = torch.from_numpy(resized.astype(np.float32) / 255.0)[None, None].repeat(1, 3, 1, 1)
    probabilities = []
    with torch.no_grad():
        for model in models:
            model.eval()
            passes = [model(x)] + ([model(x.flip(-1)).flip(-1)] if hflip else [])
            for logits in passes:
                upsampled = F.interpolate(logits, size=image.shape, mode="bilinear", align_corners=False)
                probabilities.append(torch.sigmoid(upsampled)[0].numpy())
    return np.mean(probabilities, axis=0, dtype=np.float64).astype(np.float32)
