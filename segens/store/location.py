"""Where a store lives: a local folder (zarr's LocalStore, atomic writes) or an fsspec URL such as
``s3://bucket/member.oof.zarr`` (zarr's FsspecStore, with storage options), and how workers on other machines
must be handed it (see segens.infra.backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import zarr

from segens.errors import SegensError
from segens.infra.locations import is_url


def open_zarr(url: str, storage_options: dict[str, Any] | None, read_only: bool) -> zarr.abc.store.Store:
    """A zarr store for a local path (or file:// URL) or an fsspec URL (``s3://...`` with ``storage_options``)."""
    if url.startswith("file://"):
        url = url[len("file://"):]  # zarr's LocalStore: atomic writes; fsspec's local file system makes no folders
    if is_url(url):
        # other processes add images: a cached directory listing (s3fs caches them per process) would hide them
        options = {"use_listings_cache": False, **(storage_options or {})}
        return zarr.storage.FsspecStore.from_url(url, storage_options=options, read_only=read_only)
    if storage_options:
        raise SegensError(f"{url}: storage options are only for URLs such as s3://bucket/path")
    if read_only and not Path(url).is_dir():
        raise FileNotFoundError(url)
    return zarr.storage.LocalStore(url, read_only=read_only)


def shared_location(location: str | Path, backend: str) -> str:
    """A store location as workers must see it: URLs unchanged; with Dask, local paths made absolute (a worker's
    working directory is not the client's)."""
    location = str(location)
    if backend == "local" or is_url(location) or location.startswith("file://"):
        return location
    return str(Path(location).resolve())


def store_options(location: str | Path, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The storage options to open one store with: None for a local path (options are for URLs only); for a URL
    the given options with directory listings never cached (``use_listings_cache: False``, unless set), since
    other processes (the workers) add images that a cached listing of this process would not show."""
    if not is_url(location):
        return None
    return {"use_listings_cache": False, **(storage_options or {})}
