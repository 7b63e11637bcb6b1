"""The kept-pixel rules of the voting strategies, on stored uint8 values: one function per rule, used by ``ens
combine`` (on each class's union box) and by the search (on the distinct rows of its evidence) alike, so that
what the search scores is exactly what combine writes.

Values are taken as p = v / 255 in float32 (segens.store.quantize) and summed member by member in the members'
order; a member given as None has no value there (p = 0 everywhere: skipping it changes no bit of a sum, since
x + 0 = x, nor any vote, since 0 > t is false for every threshold t >= 0).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segens.store import dequantize


def normalise_weights(raw: np.ndarray) -> np.ndarray:
    """Weights (..., M) scaled to sum to 1 along the last axis in float64, then float32: the one rule both
    combine and the weight search use, so that a searched recipe reproduces its scores exactly."""
    raw = np.asarray(raw, dtype=np.float64)
    return (raw / raw.sum(axis=-1, keepdims=True)).astype(np.float32)


def weighted_sum(values: Sequence[np.ndarray | None], weights: np.ndarray) -> np.ndarray:
    """sum_m weights[m] * p_m in float32, member by member (``weights``: (M,) float32, already normalised)."""
    shape = next(value.shape for value in values if value is not None)
    total = np.zeros(shape, np.float32)
    for member, value in enumerate(values):
        if value is not None:
            total += weights[member] * dequantize(value)
    return total


def weighted_keep(values: Sequence[np.ndarray | None], weights: np.ndarray, threshold: np.float32) -> np.ndarray:
    """Soft and weighted voting: keep where sum_m w_m * p_m > threshold (float32)."""
    return weighted_sum(values, weights) > threshold


def vote_count(values: Sequence[np.ndarray | None], vote_weights: np.ndarray,
               member_thresholds: np.ndarray) -> np.ndarray:
    """Hard voting's float64 vote total: each member adds its weight where its p > its own float32 threshold."""
    shape = next(value.shape for value in values if value is not None)
    votes = np.zeros(shape, np.float64)
    for member, value in enumerate(values):
        if value is not None:
            votes += np.float64(vote_weights[member]) * (dequantize(value) > member_thresholds[member])
    return votes


def hard_keep(values: Sequence[np.ndarray | None], vote_weights: np.ndarray, member_thresholds: np.ndarray,
              min_votes: float | None, weight_present: float) -> np.ndarray:
    """Hard voting: keep where the votes reach ``min_votes`` (>=) or, without it, where they are more than half of
    ``weight_present`` (the total weight of the members present: a tie at exactly half is dropped)."""
    votes = vote_count(values, vote_weights, member_thresholds)
    if min_votes is not None:
        return votes >= min_votes
    return votes > np.float64(weight_present) / 2
