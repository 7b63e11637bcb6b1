"""recipe.json: how to combine members, per class. Written by ``ens search-weights``, read by ``ens combine``;
the only reader and writer of the format.

```json
{"version": 2, "strategy": "weighted",                      // soft | weighted | hard (what auto chose, too)
 "members": [{"name": "vgg", "checkpoints": {"0": "<sha256>", ...}}, ...],
 "weights": [[w_vgg, w_hrnet, w_yolo], ...],                // per class (29 rows), one weight per member
 "thresholds": [0.5, ...],                                   // per class: keep p > threshold (soft, weighted)
 "member_thresholds": [[0.5, 0.5, 0.5], ...],                // hard: per class, per member binarisation
 "min_votes": [2.0, ...],                                    // hard: per class, keep votes >= min_votes
 "postprocess": [["largest_component", "fill_holes"], ...],  // per class
 "maps": {"vgg": [[area, soft], ...], ...},                  // what the OOF maps looked like (ensemble/shift.py)
 "calibration": {"method": "isotonic",                       // only where the search calibrated (soft, weighted):
                 "tables": {"vgg": [[0, 0, 1, ...], null, ...], ...}},  // per member, per class 256 levels or null
 "oof_dice": {...}, "search": {...}}                         // what the search measured, and its settings
```
A calibration table maps a member's stored level v to ``table[v]`` before voting (segens.voting.calibration); a
null entry keeps the member's stored levels for that class. Version 1 recipes (no ``maps``) are still read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from segens.conventions.classes import CLASSES, NUM_CLASSES
from segens.errors import SegensError
from segens.infra.atomic import atomic_write_text
from segens.infra.safeload import load_json, validate
from segens.voting import registry
from segens.voting.morphology import STEPS

POSTPROCESSING = tuple(STEPS)
"""The post-processing steps a recipe may name, in the order they are tried (segens.voting.morphology)."""

RECIPE_VERSION = 2
READABLE_VERSIONS = (1, 2)
MAX_RECIPE_BYTES = 16 << 20
"""A recipe is a few KB; anything far larger is not one."""

Weight = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Threshold = Annotated[float, Field(ge=0, lt=1, allow_inf_nan=False)]
Votes = Annotated[float, Field(gt=0, allow_inf_nan=False)]


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
    maps: dict[str, list[list[float]]] | None = None  # member -> per class [area, soft] of its OOF maps
    calibration: dict[str, Any] | None = None  # {"method": str, "tables": {member: per class 256 levels or None}}
    oof_dice: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Any] = field(default_factory=dict)

    @property
    def member_names(self) -> list[str]:
        return [member["name"] for member in self.members]

    def class_tables(self, members: list[str], channel: int) -> np.ndarray | None:
        """(M, 256) uint8 calibration tables of class ``channel`` for ``members`` (in that order; a member without a
        table keeps its stored levels), or None where no member of the class is calibrated."""
        from segens.voting.calibration import IDENTITY

        if self.calibration is None:
            return None
        tables = self.calibration["tables"]
        rows = [tables.get(name, [None] * NUM_CLASSES)[channel] for name in members]
        if all(row is None for row in rows):
            return None
        return np.stack([IDENTITY if row is None else np.asarray(row, np.uint8) for row in rows])

    def to_dict(self) -> dict[str, Any]:
        document = {"version": RECIPE_VERSION, "strategy": self.strategy, "members": self.members,
                    "weights": self.weights, "thresholds": self.thresholds, "member_thresholds": self.member_thresholds,
                    "min_votes": self.min_votes, "postprocess": self.postprocess, "maps": self.maps}
        if self.calibration is not None:
            document["calibration"] = self.calibration
        return document | {"oof_dice": self.oof_dice, "search": self.search}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class RecipeMember(_Strict):
    """One member of a recipe: its name and the sha256 of each fold's checkpoint."""

    name: str = Field(min_length=1, max_length=256)
    checkpoints: dict[str, str] = Field(default_factory=dict)


class CalibrationDocument(_Strict):
    """A recipe's calibration: the method fitted and, per member, one 256-level table (or null) per class."""

    method: Literal["isotonic", "platt"]
    tables: dict[str, list[Annotated[list[Annotated[int, Field(ge=0, le=255)]], Field(min_length=256, max_length=256)]
                            | None]]


class RecipeDocument(_Strict):
    """The schema of recipe.json (strict types, finite numbers, no unknown fields); shapes checked after."""

    version: Literal[READABLE_VERSIONS]  # type: ignore[valid-type]
    strategy: str
    members: list[RecipeMember] = Field(min_length=1)
    weights: list[list[Weight]] | None = None
    thresholds: list[Threshold] | None = None
    member_thresholds: list[list[Threshold]] | None = None
    min_votes: list[Votes] | None = None
    postprocess: list[list[Literal[POSTPROCESSING]]] | None = None  # type: ignore[valid-type]
    maps: dict[str, list[Annotated[list[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]],
                                   Field(min_length=2, max_length=2)]]] | None = None
    calibration: CalibrationDocument | None = None
    oof_dice: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, Any] = Field(default_factory=dict)

    @field_validator("strategy")
    @classmethod
    def _known_strategy(cls, strategy: str) -> str:
        known = registry.names()
        if strategy not in known:
            listed = ", ".join(repr(name) for name in known[:-1]) + f" or {known[-1]!r}" if len(known) > 1 else repr(known[0])
            raise ValueError(f"Input should be {listed}")
        return strategy


def _check_rows(value: list | None, columns: int | None, name: str, where: str) -> None:
    """``value`` must hold one entry per class (and, with ``columns``, one number per member in each)."""
    if value is None:
        return
    if len(value) != NUM_CLASSES:
        raise SegensError(f"{where}: '{name}' has {len(value)} entries; it needs {NUM_CLASSES}, one per class")
    if columns is not None:
        for channel, row in enumerate(value):
            if len(row) != columns:
                raise SegensError(f"{where}: '{name}' for class {CLASSES[channel]} has {len(row)} numbers; it needs "
                                  f"{columns}, one per member")


def check_class_weights(raw: np.ndarray, hard: bool, where: str) -> None:
    """(29, M) weights must be finite and >= 0 with a positive, finite total per class; for hard voting (which
    counts the weights as float32 votes) also within float32 range. A SegensError naming ``where`` and the class."""
    raw = np.asarray(raw, dtype=np.float64)
    with np.errstate(over="ignore"):
        used = raw.astype(np.float32).astype(np.float64) if hard else raw
        totals = used.sum(axis=-1)
    for channel in range(raw.shape[0]):
        row, total = used[channel], totals[channel]
        if not np.isfinite(raw[channel]).all() or (raw[channel] < 0).any():
            raise SegensError(f"{where}: weights of class {CLASSES[channel]} must be finite numbers >= 0, got "
                              f"{raw[channel].tolist()}")
        if not np.isfinite(row).all() or not np.isfinite(total):
            raise SegensError(f"{where}: weights of class {CLASSES[channel]} are too large (their total overflows); "
                              "scale them down, only their ratios matter")
        if not total > 0:
            raise SegensError(f"{where}: weights of class {CLASSES[channel]} sum to 0; give at least one member a "
                              "positive weight")


def recipe_from_dict(document: Any, where: str) -> Recipe:
    """Validate a recipe document against the schema; anything unknown, mistyped, non-finite, out of range or of
    the wrong shape is a SegensError naming ``where`` and the field."""
    if not isinstance(document, dict) or document.get("version") not in READABLE_VERSIONS:
        version = document.get("version") if isinstance(document, dict) else None
        raise SegensError(f"{where}: not a segens recipe of a version this segens reads "
                          f"({', '.join(map(str, READABLE_VERSIONS))}; version {version!r}); write it with "
                          "`ens search-weights`")
    parsed = validate(RecipeDocument, document, where)
    names = [member.name for member in parsed.members]
    if len(set(names)) != len(names):
        raise SegensError(f"{where}: 'members' names a member twice ({', '.join(names)}); each member once")
    count = len(names)
    _check_rows(parsed.weights, count, "weights", where)
    _check_rows(parsed.thresholds, None, "thresholds", where)
    _check_rows(parsed.member_thresholds, count, "member_thresholds", where)
    _check_rows(parsed.min_votes, None, "min_votes", where)
    _check_rows(parsed.postprocess, None, "postprocess", where)
    for member, rows in (parsed.maps or {}).items():
        if member not in names:
            raise SegensError(f"{where}: 'maps' names {member!r}, which is not one of the recipe's members")
        _check_rows(rows, 2, f"maps.{member}", where)
    if parsed.weights is not None:
        check_class_weights(np.array(parsed.weights), registry.get_strategy(parsed.strategy).vote_weights, where)
    calibration = None
    if parsed.calibration is not None:
        calibration = {"method": parsed.calibration.method, "tables": _check_calibration(parsed, names, where)}
    return Recipe(
        strategy=parsed.strategy, members=[member.model_dump() for member in parsed.members],
        weights=parsed.weights, thresholds=parsed.thresholds, member_thresholds=parsed.member_thresholds,
        min_votes=parsed.min_votes,
        postprocess=[list(steps) for steps in parsed.postprocess or [[] for _ in CLASSES]],
        maps=None if parsed.maps is None else {member: [list(row) for row in rows] for member, rows in parsed.maps.items()},
        calibration=calibration, oof_dice=dict(parsed.oof_dice), search=dict(parsed.search),
    )


def _check_calibration(parsed: RecipeDocument, names: list[str], where: str) -> dict[str, list[list[int] | None]]:
    """The calibration tables, checked: a strategy whose votes they change, known members, one entry per class, each
    table monotone from 0 (segens.voting.calibration.check_table)."""
    from segens.voting.calibration import check_table

    if not registry.get_strategy(parsed.strategy).calibrates:
        raise SegensError(f"{where}: strategy {parsed.strategy!r} does not vote on calibrated levels (a monotone "
                          "calibration changes no vote at a member's own threshold); remove 'calibration'")
    tables = {}
    for member, rows in parsed.calibration.tables.items():
        if member not in names:
            raise SegensError(f"{where}: 'calibration' names {member!r}, which is not one of the recipe's members")
        _check_rows(rows, None, f"calibration.tables.{member}", where)
        for channel, row in enumerate(rows):
            if row is not None:
                try:
                    check_table(row, f"{where}: calibration of {member}, class {CLASSES[channel]}")
                except ValueError as exc:
                    raise SegensError(str(exc)) from None
        tables[member] = [None if row is None else list(row) for row in rows]
    return tables


def load_recipe(path: str | Path) -> Recipe:
    """Read (bounded, UTF-8, see segens.infra.safeload) and validate recipe.json."""
    path = Path(path)
    return recipe_from_dict(load_json(path, "recipe", MAX_RECIPE_BYTES), str(path))


def save_recipe(recipe: Recipe, path: str | Path) -> Path:
    """Write recipe.json atomically."""
    recipe_from_dict(json.loads(json.dumps(recipe.to_dict())), str(path))  # never write what cannot be read
    atomic_write_text(path, json.dumps(recipe.to_dict(), indent=1) + "\n")
    return Path(path)
