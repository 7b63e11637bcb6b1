"""Opening a probability store for reading, and creating (or resuming) one for writing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zarr
from zarr.core.sync import sync

from segens.errors import SegensError
from segens.store.format import FORMAT, SPLITS, check_format, identity_differences, is_temporary, store_attributes
from segens.store.location import open_zarr
from segens.store.store import ProbabilityStore, get_json


def open_store(url: str | Path, storage_options: dict[str, Any] | None = None) -> ProbabilityStore:
    """Open an existing store for reading; a SegensError naming the path if it is not a known segens store."""
    url = str(url)
    try:
        zarr_store = open_zarr(url, storage_options, read_only=True)
        attributes = _root_attributes(zarr_store)
    except FileNotFoundError:
        attributes = None
    if attributes is None:
        raise SegensError(f"{url}: no probability store there; write it with `ens predict-member`")
    check_format(attributes, url)
    return ProbabilityStore(url, attributes, writable=False, storage_options=storage_options)


def create_store(url: str | Path, member_name: str, kind: str, split: str, spec: dict[str, Any],
                 checkpoints: dict[int, dict[str, Any]], *, images: Sequence[str], overwrite: bool = False,
                 storage_options: dict[str, Any] | None = None, role: str = "probabilities",
                 fold: int | None = None) -> ProbabilityStore:
    """Create a store for writing, or reopen one of the same identity to resume it.

    ``checkpoints`` maps fold -> {"path", "sha256"}; ``images`` are the keys of every image the store is for (its
    planned list: readers tell a finished store from an unfinished one by it). A store of another identity
    (member, kind, split, spec, input contract, checkpoint hashes, planned images) is replaced only with
    ``overwrite``; a path holding anything else is never replaced. Call it once before starting workers and hand
    them the (picklable) store: with ``overwrite`` a late caller would delete what others wrote.
    """
    url = str(url)
    if split not in SPLITS:
        raise SegensError(f"{url}: split must be one of {', '.join(SPLITS)}, got {split!r}")
    attributes = store_attributes(member_name, kind, split, spec, checkpoints, images, url, role, fold)
    zarr_store = open_zarr(url, storage_options, read_only=False)
    existing = _root_attributes(zarr_store)
    if existing is None:
        if _holds_anything(zarr_store):
            raise SegensError(f"{url}: exists and is not a probability store; choose another path or remove it")
        try:
            zarr.create_group(zarr_store, attributes=attributes, zarr_format=3)
            return ProbabilityStore(url, attributes, writable=True, storage_options=storage_options)
        except zarr.errors.ContainsGroupError:  # another process created it meanwhile: compare identities
            existing = _root_attributes(zarr_store) or {}
    if existing.get("format") != FORMAT:
        raise SegensError(f"{url}: exists and is not a segens probability store; choose another path or remove it")
    if overwrite:
        zarr.create_group(zarr_store, overwrite=True, attributes=attributes, zarr_format=3)
        return ProbabilityStore(url, attributes, writable=True, storage_options=storage_options)
    check_format(existing, url)  # an edited or older store is named as such, not resumed
    differences = identity_differences(existing, attributes)
    if differences:
        raise SegensError(f"{url}: a store of another identity exists ({'; '.join(differences)}); "
                          "pass --overwrite to replace it, or write to another path")
    return ProbabilityStore(url, existing, writable=True, storage_options=storage_options)


def _root_attributes(zarr_store: zarr.abc.store.Store) -> dict[str, Any] | None:
    """The root group's attributes, or None where there is no root metadata."""
    document = sync(get_json(zarr_store, "zarr.json"))
    if document is None:
        return None
    if document.get("node_type") != "group":
        return {}
    return document.get("attributes") or {}


def _holds_anything(zarr_store: zarr.abc.store.Store) -> bool:
    """Whether the store's root holds anything but root metadata and temporary files of a killed write."""
    async def first() -> bool:
        async for name in zarr_store.list_dir(""):
            if name != "zarr.json" and not is_temporary(name):
                return True
        return False

    return sync(first())


MASKS_MEMBER, MASKS_KIND = "ensemble", "combined"
"""How a store of an ensemble's binary masks names its member and kind (``ens combine --masks-out``)."""


def create_mask_store(url: str | Path, split: str, strategy: str, members: Sequence[str], *, images: Sequence[str],
                      overwrite: bool = False, storage_options: dict[str, Any] | None = None) -> ProbabilityStore:
    """A store for an ensemble's binary masks (255 inside a mask, 0 outside), written by ``ens combine
    --masks-out`` and read like any store by ``ens show`` and ``ens evaluate``."""
    return create_store(url, MASKS_MEMBER, MASKS_KIND, split, {"strategy": strategy, "members": list(members)}, {},
                        images=images, overwrite=overwrite, storage_options=storage_options, role="masks")
