"""Resuming ``ens search-weights``: each finished class is kept beside the recipe, so a killed search loses at
most the classes in progress.

Finished classes live in ``.<recipe name>.partial/<key>/class-NN.json`` next to the recipe. The key is a sha256
of everything the result depends on (the stores' URLs and attributes, which hold their checkpoints and spec,
the image keys, the folds, the search settings), so a changed input never reuses a stale class. The folder is
removed once the recipe is written. The files are plain JSON (floats written with Python's exact repr, so a
resumed search gives the same recipe), validated when read: whoever can write beside the recipe can at most make
a class be searched again (an unreadable or invalid file, or one whose settings do not fit the search: weights and
Dice per member, thresholds among the 255 levels, vote counts, known post-processing) or report wrong numbers,
never run code. Files of
other formats there (the pickles of older segens versions) are ignored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pydantic

from segens.conventions.classes import NUM_CLASSES
from segens.errors import SegensError
from segens.infra.atomic import atomic_write_text
from segens.infra.safeload import load_json, validate
from segens.search.class_search import ClassResult
from segens.search.levels import LEVEL_NAMES
from segens.store import ProbabilityStore
from segens.voting.base import Choice
from segens.voting.recipe import POSTPROCESSING

FORMAT = 4  # bump when ClassResult or the search changes what it returns (2: JSON files instead of pickles;
#   3: the level kept by the no-loss rule, evidence batches beside the classes; 4: each fold's recipe figure from
#   levels chosen without that fold)
MAX_CLASS_FILE_BYTES = 4 << 20


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

    def __init__(self, out: str | Path, key: str, members: int | None = None) -> None:
        self.root = partial_root(out)
        self.folder = self.root / key[:32]
        self.members = members  # a file whose per-member lists have another length is searched again

    def load(self) -> dict[int, ClassResult]:
        """Channel -> result for every class a previous run of the same search finished (unreadable or invalid
        files are searched again; nothing in them is ever executed)."""
        finished = {}
        for path in sorted(self.folder.glob("class-*.json")):
            try:
                result = result_from_json(load_json(path, "search resume file", MAX_CLASS_FILE_BYTES), path)
            except SegensError:
                continue
            if path.name == _file_name(result.channel) and self._fits(result):
                finished[result.channel] = result
        return finished

    def _fits(self, result: ClassResult) -> bool:
        choice = result.recipe_choice
        lengths = [choice.weights.size, len(result.member_dice)]
        if choice.member_thresholds is not None:
            lengths.append(choice.member_thresholds.size)
        return self.members is None or (all(length == self.members for length in lengths)
                                        and (choice.min_votes is None or choice.min_votes <= self.members))

    def save(self, result: ClassResult) -> None:
        atomic_write_text(self.folder / _file_name(result.channel), json.dumps(result_to_json(result)) + "\n")

    def clear(self) -> None:
        """Remove every unfinished search's classes for this recipe path (the recipe now holds the result)."""
        shutil.rmtree(self.root, ignore_errors=True)


def _file_name(channel: int) -> str:
    return f"class-{channel:02d}.json"


_Level = Annotated[int, pydantic.Field(ge=0, le=254)]  # index of one of the 255 threshold midpoints
_Finite = Annotated[float, pydantic.Field(allow_inf_nan=False)]


class _ChoiceDocument(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    weights: list[Annotated[float, pydantic.Field(ge=0, allow_inf_nan=False)]] = pydantic.Field(min_length=1)
    threshold: _Level
    member_thresholds: list[_Level] | None = None
    min_votes: Annotated[int, pydantic.Field(ge=1)] | None = None
    score: _Finite


class _ClassDocument(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    format: int
    channel: int = pydantic.Field(ge=0, lt=NUM_CLASSES)
    recipe_choice: _ChoiceDocument
    postprocess: list[Literal[tuple(POSTPROCESSING)]]  # type: ignore[valid-type]
    oof_dice: _Finite
    member_dice: list[_Finite]
    mean_dice: _Finite
    ambiguous_pixels: int = pydantic.Field(ge=0)
    evaluations: int = pydantic.Field(ge=0)
    cv: list[dict[str, float]]
    level: Literal[LEVEL_NAMES]  # type: ignore[valid-type]


def result_to_json(result: ClassResult) -> dict[str, Any]:
    """A ClassResult as a JSON-ready dict of plain numbers, lists and strings."""
    choice = result.recipe_choice
    return {
        "format": FORMAT, "channel": int(result.channel),
        "recipe_choice": {"weights": [float(w) for w in choice.weights], "threshold": int(choice.threshold),
                          "member_thresholds": None if choice.member_thresholds is None
                          else [int(i) for i in choice.member_thresholds],
                          "min_votes": None if choice.min_votes is None else int(choice.min_votes),
                          "score": float(choice.score)},
        "postprocess": [str(step) for step in result.postprocess], "oof_dice": float(result.oof_dice),
        "member_dice": [float(d) for d in result.member_dice], "mean_dice": float(result.mean_dice),
        "ambiguous_pixels": int(result.ambiguous_pixels), "evaluations": int(result.evaluations),
        "cv": [{str(k): float(v) for k, v in fold.items()} for fold in result.cv], "level": str(result.level),
    }


def result_from_json(document: Any, path: Path) -> ClassResult:
    """A ClassResult from ``result_to_json``'s dict; a SegensError naming ``path`` if it is not one."""
    checked = validate(_ClassDocument, document, path)
    if checked.format != FORMAT:
        raise SegensError(f"{path}: search resume format {checked.format}, this segens writes {FORMAT}")
    choice = checked.recipe_choice
    return ClassResult(
        channel=checked.channel,
        recipe_choice=Choice(np.asarray(choice.weights, dtype=np.float64), choice.threshold,
                             None if choice.member_thresholds is None else np.asarray(choice.member_thresholds, np.int64),
                             choice.min_votes, choice.score),
        postprocess=list(checked.postprocess), oof_dice=checked.oof_dice, member_dice=list(checked.member_dice),
        mean_dice=checked.mean_dice, ambiguous_pixels=checked.ambiguous_pixels, evaluations=checked.evaluations,
        cv=[dict(fold) for fold in checked.cv], level=checked.level)
