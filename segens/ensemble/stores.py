"""The members' stores of one ensemble, taken together: checked to agree (members, classes, split, planned
images, sizes) before anything is combined or searched, and the union of their boxes per class (a pixel outside
every member's box has p = 0 everywhere and no strategy keeps it)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from segens.conventions.classes import CLASSES
from segens.conventions.dataset import check_unique_file_names
from segens.conventions.rle import BBox
from segens.errors import SegensError
from segens.store import ProbabilityStore

IMAGE_SUFFIX = ".png"  # stores key images by relative path without extension; the competition's images are PNG


def union_box(boxes: Sequence[BBox | None]) -> BBox | None:
    """The smallest box holding every given box (None entries are skipped; None if there are none)."""
    present = [box for box in boxes if box is not None]
    if not present:
        return None
    return (min(b[0] for b in present), max(b[1] for b in present), min(b[2] for b in present),
            max(b[3] for b in present))


def check_stores(stores: Sequence[ProbabilityStore], allow_missing: bool) -> tuple[list[str], np.ndarray, dict[str, int]]:
    """Image keys in competition order and an (images, members) presence matrix; mismatches are errors."""
    first = stores[0]
    masks = next((store for store in stores if store.role != "probabilities"), None)
    if masks is not None:
        raise SegensError(f"{masks.url}: holds an ensemble's binary masks (`ens combine --masks-out`), not a member's "
                          "probabilities; give the members' stores (a submission CSV joins as a member of kind csv)")
    names = [store.member for store in stores]
    if len(set(names)) != len(names):
        raise SegensError(f"two stores hold the same member name ({', '.join(names)}); each member once")
    for store in stores[1:]:
        if list(store.classes) != list(first.classes):
            raise SegensError(f"{store.url}: class list differs from {first.url}'s")
        if store.split != first.split:
            raise SegensError(f"{store.url}: split {store.split!r} differs from {first.url}'s {first.split!r}")
    if list(first.classes) != list(CLASSES):
        raise SegensError(f"{first.url}: its class list is not the competition's 29 classes")
    for store in stores[1:]:
        if store.planned != first.planned:
            only = sorted(set(store.planned) ^ set(first.planned))[0]
            holder = first if only in first.planned else store
            raise SegensError(f"{store.url}: planned for other images than {first.url} (e.g. {only!r} is planned "
                              f"only in {holder.url}); predict every member on the same data root and split")
    keys = sorted(first.planned, key=lambda key: key + IMAGE_SUFFIX)
    check_unique_file_names(keys, first.url, IMAGE_SUFFIX)
    key_sets = [store.completed() for store in stores]
    present = np.array([[key in key_set for key_set in key_sets] for key in keys], dtype=bool).reshape(len(keys), len(stores))
    for m, store in enumerate(stores):  # an image there but failing verification (moved, copied) is named as such
        absent = np.flatnonzero(~present[:, m])
        if absent.size:
            store.explain_missing(keys[absent[0]])
    nowhere = [key for key, row in zip(keys, present) if not row.any()]
    if nowhere:
        more = f" (and {len(nowhere) - 1} more)" if len(nowhere) > 1 else ""
        raise SegensError(f"image {nowhere[0]!r}{more} is planned for these stores but complete in none of them "
                          "(never written, killed mid-write, or its metadata is unreadable or damaged); run `ens "
                          "predict-member` for the members to finish it: a submission may not miss an image")
    missing = {store.member: int((~present[:, m]).sum()) for m, store in enumerate(stores) if not present[:, m].all()}
    if missing and not allow_missing:
        m = next(index for index, store in enumerate(stores) if store.member in missing)
        first_missing = keys[int(np.argmin(present[:, m]))]
        raise SegensError(f"{stores[m].url}: lacks {missing[stores[m].member]} image(s) the other stores have, first "
                          f"{first_missing!r}; predict them, or pass --allow-missing to drop the member there")
    for index, key in enumerate(keys):
        sizes = {stores[m].image_size(key) for m in range(len(stores)) if present[index, m]}
        if len(sizes) > 1:
            detail = ", ".join(f"{store.url}: {store.image_size(key)}" for m, store in enumerate(stores)
                               if present[index, m])
            raise SegensError(f"image {key!r} has different sizes in the stores ({detail})")
    return keys, present, missing
