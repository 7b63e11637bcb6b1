"""Combining per-fold test stores (``ens predict-member --split test --per-fold``): the recipe applied to each fold
model's maps, the conditions it was fitted in on OOF, and the folds' masks merged by majority.

Per image and class: the union of every fold store's boxes; within it, fold by fold, the strategy keeps pixels from
that fold's stores of every member (before post-processing); a pixel is kept where more than half of the folds
keep it, and where exactly half do (an even number of folds), where the strategy keeps the members' values
averaged over the folds (rounded to a stored level); then the class's post-processing, as combine applies it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segens.conventions.classes import NUM_CLASSES
from segens.conventions.rle import encode_box
from segens.ensemble.shift import region_counts
from segens.ensemble.stores import union_box
from segens.errors import SegensError
from segens.store import SCALE, ProbabilityStore
from segens.voting import get_strategy
from segens.voting.base import Settings
from segens.voting.morphology import apply_postprocessing


def group_by_fold(stores: Sequence[ProbabilityStore]) -> tuple[list[str], list[int], list[list[ProbabilityStore]]]:
    """(members in order, folds, fold -> that fold's store of each member) of per-fold stores; a SegensError unless
    every member has one store of each of the same folds, and none is a mean of folds."""
    members = list(dict.fromkeys(store.member for store in stores))
    by_member: dict[str, dict[int, ProbabilityStore]] = {member: {} for member in members}
    for store in stores:
        if store.fold is None:
            raise SegensError(f"{store.url}: the mean of its member's folds, given with stores of single folds; give "
                              "each member's per-fold stores (`predict-member --per-fold`) or each member's mean store")
        if store.fold in by_member[store.member]:
            raise SegensError(f"{store.url}: a second store of member {store.member!r}, fold {store.fold}")
        by_member[store.member][store.fold] = store
    folds = sorted(by_member[members[0]])
    for member, held in by_member.items():
        if sorted(held) != folds:
            raise SegensError(f"member {member!r} has stores of folds {sorted(held)}, member {members[0]!r} of "
                              f"{folds}: give every member's store of every fold")
    return members, folds, [[by_member[member][fold] for member in members] for fold in folds]


def combine_image_per_fold(by_fold: Sequence[Sequence[ProbabilityStore]], key: str, settings: Settings,
                           masks_out: ProbabilityStore | None = None) -> tuple[list[str], np.ndarray]:
    """The 29 RLE strings of one image merged over the folds (see the module docstring), and the (29, M, 3) counts
    of its maps summed over the folds (segens.ensemble.shift)."""
    strategy = get_strategy(settings.strategy)
    members = len(by_fold[0])
    present = np.ones(members, bool)
    height, width = by_fold[0][0].image_size(key)
    boxes = [[store.boxes(key) for store in stores] for stores in by_fold]
    counts = np.zeros((NUM_CLASSES, members, 3), np.int64)
    full = np.zeros((NUM_CLASSES, height, width), dtype=np.uint8) if masks_out is not None else None
    rles = []
    for channel in range(NUM_CLASSES):
        box = union_box([member[channel] for fold in boxes for member in fold])
        if box is None:
            rles.append(encode_box(np.zeros((0, 0), bool), None, width))
            continue
        votes, total = None, None
        for stores, fold_boxes in zip(by_fold, boxes):
            values = [store.read_region(key, channel, box) if fold_boxes[m][channel] is not None else None
                      for m, store in enumerate(stores)]
            for member, value in enumerate(values):
                if value is not None:
                    counts[channel, member] += region_counts(value)
            filled = [np.zeros((box[1] - box[0], box[3] - box[2]), np.uint8) if value is None else value
                      for value in values]
            total = [v.astype(np.uint32) for v in filled] if total is None else [t + v for t, v in zip(total, filled)]
            kept = strategy.keep(values if any(v is not None for v in values) else filled, settings, channel, present)
            votes = kept.astype(np.int32) if votes is None else votes + kept
        folds = len(by_fold)
        mask = votes * 2 > folds
        tied = votes * 2 == folds
        if tied.any():
            mean = [np.rint(t / np.float64(folds)).astype(np.uint8) for t in total]  # half to even, as quantize
            mask |= tied & strategy.keep(mean, settings, channel, present)
        mask = apply_postprocessing(mask, settings.postprocess[channel])
        rles.append(encode_box(mask, box, width))
        if full is not None:
            full[channel, box[0]:box[1], box[2]:box[3]] = mask.view(np.uint8) * np.uint8(SCALE)
    if masks_out is not None:
        masks_out.write_image(key, full)
    return rles, counts
