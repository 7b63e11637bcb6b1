"""Local paths and fsspec URLs: the one rule for telling them apart, used by output checks and stores alike."""

from __future__ import annotations

import os
from pathlib import Path


def is_url(path: str | Path) -> bool:
    """Whether ``path`` is an fsspec URL such as s3://bucket/x.zarr (file:// URLs are local paths)."""
    return "://" in str(path) and not str(path).startswith("file://")


def local_path(path: str | Path) -> Path | None:
    """The absolute local path of ``path`` (``file://`` stripped), or None for a remote URL."""
    text = str(path)
    if text.startswith("file://"):
        text = text[len("file://"):]
    if is_url(text):
        return None
    return Path(os.path.abspath(Path(text).expanduser()))
