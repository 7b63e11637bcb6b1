"""Calibration of members' stored maps: per member and class, a monotone map from the stored level v (0..255) to
a calibrated level ``table[v]``, fitted on OOF pixels, so that a mean of members means the same thing for each.

A table is 256 uint8 levels: the calibrated probability of a pixel stored at v is ``table[v] / 255``, kept to the
store's own precision, and everything downstream (combine, the search's exact kernels) votes on the calibrated
levels exactly as on stored ones: the same float32 arithmetic, the same table, pixel for pixel. ``table[0]`` is
always 0: where a member's map is 0 (outside its boxes) it still says nothing, which keeps combine's union boxes
and the search's evidence valid; ``table[255]`` may be below 255 (a member's saturated pixels are not all bone).

Methods (fitted on counts of (stored level, truth) pairs, weighted by pixels):
- ``isotonic``: isotonic regression of the truth on v (scikit-learn), the precision of each level made monotone;
- ``platt``: logistic regression of the truth on logit(v / 255) (two parameters; the smooth alternative);
- ``none``: no calibration.
The fitting population is what the search's evidence holds: every pixel where some member of the ensemble is not
0 inside the class's union box (a member's 0 is never mapped to anything but 0).
"""

from __future__ import annotations

import numpy as np

from segens.store.quantize import SCALE, dequantize, quantize

METHODS = ("none", "isotonic", "platt")
IDENTITY = np.arange(256, dtype=np.uint8)
"""The table of an uncalibrated member: every level kept."""
MIN_PIXELS = 100
"""A member's class with fewer fitting pixels than this keeps the identity table (nothing to learn from)."""


def level_histograms(values: np.ndarray, truth: np.ndarray, count: np.ndarray, image: np.ndarray, images: int,
                     saturated: np.ndarray, saturated_true: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image and member, how many pixels are stored at each level, and how many of them are truth: two
    (images, M, 256) int64 arrays from evidence rows (``values`` (M, R) uint8, ``truth`` (R,) bool, ``count``
    (R,) pixels, ``image`` (R,) index) and each image's pixels saturated for every member (all 255)."""
    members = values.shape[0]
    total = np.zeros((images, members, 256), np.int64)
    positive = np.zeros((images, members, 256), np.int64)
    for member in range(members):
        flat = image.astype(np.int64) * 256 + values[member]
        total[:, member] = np.bincount(flat, weights=count, minlength=images * 256).reshape(images, 256)
        positive[:, member] = np.bincount(flat, weights=count * truth, minlength=images * 256).reshape(images, 256)
    total[:, :, 255] += saturated[:, None]
    positive[:, :, 255] += saturated_true[:, None]
    return positive, total


def fit_table(positive: np.ndarray, total: np.ndarray, method: str) -> np.ndarray:
    """(256,) uint8 monotone table from (256,) counts of truth pixels and of all pixels at each stored level
    (level 0 is ignored: it maps to 0). Identity for ``none`` and where fewer than MIN_PIXELS pixels are known."""
    if method not in METHODS:
        raise ValueError(f"unknown calibration method {method!r}; use one of {', '.join(METHODS)}")
    levels = np.arange(1, 256)
    weights = total[1:].astype(np.float64)
    seen = weights > 0
    if method == "none" or weights.sum() < MIN_PIXELS or seen.sum() < 2:
        return IDENTITY.copy()
    rate = np.divide(positive[1:], total[1:], out=np.zeros(255), where=total[1:] > 0)
    if method == "isotonic":
        from sklearn.isotonic import IsotonicRegression

        model = IsotonicRegression(y_min=0.0, y_max=1.0, increasing=True, out_of_bounds="clip")
        model.fit(levels[seen], rate[seen], sample_weight=weights[seen])
        calibrated = model.predict(levels)
    else:
        calibrated = _platt(levels, positive[1:].astype(np.float64), weights)
    table = np.empty(256, np.uint8)
    table[0] = 0
    table[1:] = quantize(np.maximum.accumulate(calibrated), np.float64)  # the store's formula, in float64 as fitted
    return table


def _platt(levels: np.ndarray, positive: np.ndarray, total: np.ndarray) -> np.ndarray:
    """sigmoid(a * logit(v / 255) + b) at each level, (a, b) by weighted logistic regression (scikit-learn); the
    identity where the fit would be decreasing."""
    from sklearn.linear_model import LogisticRegression

    p = np.clip(dequantize(levels, np.float64), 0.5 / SCALE, (SCALE - 0.5) / SCALE)
    feature = np.log(p / (1 - p))[:, None]
    negative = total - positive
    x = np.concatenate([feature, feature])
    y = np.concatenate([np.ones(levels.size), np.zeros(levels.size)])
    weight = np.concatenate([positive, negative])
    keep = weight > 0
    if len(set(y[keep].tolist())) < 2:  # every pixel the same truth: the best monotone map is constant
        return np.full(levels.size, float(y[keep][0]) if keep.any() else 0.0)
    model = LogisticRegression(C=1e6, max_iter=1000)
    model.fit(x[keep], y[keep], sample_weight=weight[keep])
    if model.coef_[0, 0] <= 0:
        return dequantize(levels, np.float64)
    return model.predict_proba(feature)[:, 1]


def fit_tables(positive: np.ndarray, total: np.ndarray, images: np.ndarray, method: str) -> np.ndarray:
    """(M, 256) uint8 tables of each member fitted on the ``images`` (bool mask) of (images, M, 256) counts."""
    chosen_positive, chosen_total = positive[images].sum(axis=0), total[images].sum(axis=0)
    return np.stack([fit_table(chosen_positive[m], chosen_total[m], method) for m in range(positive.shape[1])])


def apply(values: np.ndarray | None, table: np.ndarray | None) -> np.ndarray | None:
    """A member's stored uint8 values at their calibrated levels (``table`` None: unchanged)."""
    if values is None or table is None:
        return values
    return table[values]


def check_table(table: list[int], where: str) -> np.ndarray:
    """A recipe's table: 256 levels in 0..255, non-decreasing, starting at 0; a ValueError saying which rule fails."""
    array = np.asarray(table)
    if array.shape != (256,) or not np.issubdtype(array.dtype, np.integer) or array.min() < 0 or array.max() > 255:
        raise ValueError(f"{where}: a calibration table holds 256 whole numbers in 0..255")
    if array[0] != 0 or (np.diff(array) < 0).any():
        raise ValueError(f"{where}: a calibration table starts at 0 and never decreases")
    return array.astype(np.uint8)
