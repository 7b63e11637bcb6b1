"""Resuming ``ens search-weights``: each finished class is kept beside the recipe, so a killed search loses at
most the classes in progress.

Finished classes live in ``.<recipe name>.partial/<key>/class-NN.pkl`` next to the recipe. The key is a sha256
of everything the result depends on (the stores' URLs and attributes, which hold their checkpoints and spec,
the image keys, the folds, the search settings), so a changed input never reuses a stale class. The folder is
removed once the recipe is written. The pickles are written by this code, atomically, beside the user's own
recipe; they are not a format to share.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from segens.atomic import atomic_write
from segens.ensemble.search import ClassResult
from segens.members.store import ProbabilityStore

FORMAT = 1  # bump when ClassResult or the search changes what it returns


def partial_root(out: str | Path) -> Path:
    """The folder beside ``out`` that holds the finished classes of unfinished searches."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def search_key(stores: Sequence[ProbabilityStore], keys: Sequence[str], folds_of_images: Sequence[int] | None,
               settings: dict[str, Any]) -> str:
    """sha256 (hex) of every input a class result depends on."""
    document = {"format": FORMAT, "stores": [[store.url, store.attributes] for store in stores],
                "keys": list(keys), "folds": None if folds_of_images is None else [int(f) for f in folds_of_images],
                "settings": settings}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


class FinishedClasses:
    """The finished classes of one search (one key): load those already there, save each new one at once."""

    def __init__(self, out: str | Path, key: str) -> None:
        self.root = partial_root(out)
        self.folder = self.root / key[:32]

    def load(self) -> dict[int, ClassResult]:
        """Channel -> result for every class a previous run of the same search finished (unreadable ones are
        searched again)."""
        finished = {}
        for path in sorted(self.folder.glob("class-*.pkl")):
            try:
                with path.open("rb") as handle:
                    result = pickle.load(handle)
            except Exception:  # a file from another version of segens: search that class again
                continue
            if isinstance(result, ClassResult):
                finished[result.channel] = result
        return finished

    def save(self, result: ClassResult) -> None:
        with atomic_write(self.folder / f"class-{result.channel:02d}.pkl", "wb") as handle:
            pickle.dump(result, handle, protocol=pickle.HIGHEST_PROTOCOL)

    def clear(self) -> None:
        """Remove every unfinished search's classes for this recipe path (the recipe now holds the result)."""
        shutil.rmtree(self.root, ignore_errors=True)
