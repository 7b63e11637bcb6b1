"""recipe.json: how to combine members, per class. Written by ``ens search-weights``, read by ``ens combine``;
the only reader and writer of the format.

```json
{"version": 1, "strategy": "weighted",                      // soft | weighted | hard
 "members": [{"name": "vgg", "checkpoints": {"0": "<sha256>", ...}}, ...],
 "weights": [[w_vgg, w_hrnet, w_yolo], ...],                // per class (29 rows), one weight per member
 "thresholds": [0.5, ...],                                   // per class: keep p > threshold (soft, weighted)
 "member_thresholds": [[0.5, 0.5, 0.5], ...],                // hard: per class, per member binarisation
 "min_votes": [2.0, ...],                                    // hard: per class, keep votes >= min_votes
 "postprocess": [["largest_component", "fill_holes"], ...],  // per class
 "oof_dice": {...}, "search": {...}}                         // what the search measured, and its settings
```
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segens.atomic import atomic_write_text
from segens.classes import CLASSES, NUM_CLASSES
from segens.errors import SegensError

RECIPE_VERSION = 1
STRATEGIES = ("soft", "weighted", "hard")
POSTPROCESSING = ("largest_component", "fill_holes")


@dataclass
class Recipe:
    """Per-class combination settings for a list of members (by name, with their checkpoint hashes)."""

    strategy: str
    members: list[dict[str, Any]]  # {"name": str, "checkpoints": {fold: sha256}}
    weights: list[list[float]] | None = None  # (29, members)
    thresholds: list[float] | None = None  # (29,)
    member_thresholds: list[list[float]] | None = None  # (29, members), hard only
    min_votes: list[float] | None = None  # (29,), hard only
    postprocess: list[list[str]] = field(default_factory=lambda: [[] for _ in CLASSES])
    oof_dice: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def member_names(self) -> list[str]:
        return [member["name"] for member in self.members]

    def to_dict(self) -> dict[str, Any]:
        return {"version": RECIPE_VERSION, "strategy": self.strategy, "members": self.members,
                "weights": self.weights, "thresholds": self.thresholds, "member_thresholds": self.member_thresholds,
                "min_votes": self.min_votes, "postprocess": self.postprocess, "oof_dice": self.oof_dice,
                "search": self.search}


def _matrix(value: Any, columns: int, name: str, where: str) -> list[list[float]] | None:
    if value is None:
        return None
    if (not isinstance(value, list) or len(value) != NUM_CLASSES
            or any(not isinstance(row, list) or len(row) != columns for row in value)):
        raise SegensError(f"{where}: '{name}' must be {NUM_CLASSES} rows (one per class) of {columns} numbers")
    return [[float(x) for x in row] for row in value]


def _vector(value: Any, name: str, where: str) -> list[float] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != NUM_CLASSES:
        raise SegensError(f"{where}: '{name}' must be a list of {NUM_CLASSES} numbers, one per class")
    return [float(x) for x in value]


def recipe_from_dict(document: Any, where: str) -> Recipe:
    """Validate a recipe document; anything unknown is a SegensError naming ``where``."""
    if not isinstance(document, dict) or document.get("version") != RECIPE_VERSION:
        version = document.get("version") if isinstance(document, dict) else None
        raise SegensError(f"{where}: not a segens recipe of version {RECIPE_VERSION} (version {version!r})")
    known = set(Recipe.__dataclass_fields__) | {"version"}
    unknown = sorted(set(document) - known)
    if unknown:
        raise SegensError(f"{where}: unknown field(s) {', '.join(unknown)}")
    strategy = document.get("strategy")
    if strategy not in STRATEGIES:
        raise SegensError(f"{where}: strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    members = document.get("members")
    if not isinstance(members, list) or not members or any(not isinstance(m, dict) or "name" not in m for m in members):
        raise SegensError(f"{where}: 'members' must be a non-empty list of {{name, checkpoints}}")
    count = len(members)
    postprocess = document.get("postprocess") or [[] for _ in CLASSES]
    if len(postprocess) != NUM_CLASSES or any(step not in POSTPROCESSING for steps in postprocess for step in steps):
        raise SegensError(f"{where}: 'postprocess' must be {NUM_CLASSES} lists of steps from {', '.join(POSTPROCESSING)}")
    return Recipe(
        strategy=strategy, members=members,
        weights=_matrix(document.get("weights"), count, "weights", where),
        thresholds=_vector(document.get("thresholds"), "thresholds", where),
        member_thresholds=_matrix(document.get("member_thresholds"), count, "member_thresholds", where),
        min_votes=_vector(document.get("min_votes"), "min_votes", where),
        postprocess=[list(steps) for steps in postprocess],
        oof_dice=dict(document.get("oof_dice") or {}), search=dict(document.get("search") or {}),
    )


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate recipe.json."""
    path = Path(path)
    try:
        document = json.loads(path.read_text())
    except OSError as exc:
        raise SegensError(f"{path}: cannot read recipe ({exc.strerror or exc})") from None
    except json.JSONDecodeError as exc:
        raise SegensError(f"{path}: malformed JSON ({exc})") from None
    return recipe_from_dict(document, str(path))


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write recipe.json atomically."""
    recipe_from_dict(json.loads(json.dumps(recipe.to_dict())), str(path))  # never write what cannot be read
    atomic_write_text(path, json.dumps(recipe.to_dict(), indent=1) + "\n")
    return Path(path)
