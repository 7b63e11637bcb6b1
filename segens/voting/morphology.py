"""Per-class post-processing of binary masks: keep the largest connected component, fill holes (scipy).

Both give the same result on a mask's bounding box (or any box containing it) as on the whole image: a
component never leaves the box, and a background region is a hole exactly when it does not reach the box's
edge, since everything outside the box is background."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from segens.errors import SegensError

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of a 2-D bool mask (the first in raster order on a tie)."""
    labels, count = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if count <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """Background regions not 4-connected to the border become foreground (what ``ndimage.binary_fill_holes``
    gives, by labelling the background once instead of dilating from the border until nothing changes)."""
    labels, count = ndimage.label(~mask, structure=FOUR_CONNECTED)
    if count == 0:
        return mask
    outside = np.zeros(count + 1, bool)
    for edge in (labels[0], labels[-1], labels[:, 0], labels[:, -1]):
        outside[edge] = True
    outside[0] = True  # label 0 is the foreground itself
    return mask | ~outside[labels]


STEPS = {"largest_component": largest_component, "fill_holes": fill_holes}


def apply_postprocessing(mask: np.ndarray, steps: Sequence[str]) -> np.ndarray:
    """Apply the named steps in order to a 2-D bool mask."""
    for step in steps:
        if step not in STEPS:
            raise SegensError(f"unknown post-processing {step!r}; choose from {', '.join(STEPS)}")
        mask = STEPS[step](mask)
    return mask
