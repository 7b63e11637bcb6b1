"""Resuming ``ens search-weights``: each finished class is kept beside the recipe, so a killed search loses at
most the classes in progress.

Finished classes live in ``.<recipe name>.partial/<key>/class-NN.json`` next to the recipe, one file per class
holding the result of every strategy searched (``--strategy auto`` searches every registered one). The key is a sha256 of
everything the result depends on (the stores' URLs and attributes, which hold their checkpoints and spec, the
image keys and the content of their label files, the folds, the search settings), so a changed input never reuses
a stale class; every file also carries the whole key, so a file copied in from another search is ignored (and
counted, for a note) even inside this search's folder. The folder is removed once the recipe is written. The
files are plain JSON (floats written with Python's exact repr, so a resumed search gives the same recipe),
validated when read: whoever can write beside the recipe can at most make a class be searched again (an
unreadable or invalid file, or one whose settings do not fit the search: weights and Dice per member, thresholds
among the 255 levels, vote counts, known post-processing) or report wrong numbers, never run code. Files of other
formats there (the pickles of older segens versions) are ignored.
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

FORMAT = 5  # bump when ClassResult or the search changes what it returns (2: JSON files instead of pickles;
#   3: the level kept by the no-loss rule, evidence batches beside the classes; 4: each fold's recipe figure from
#   levels chosen without that fold; 5: per-image held-out scores, one file per class for every strategy searched,
#   the search's key inside every file, the calibration tables of a calibrated setting)
MAX_CLASS_FILE_BYTES = 4 << 20


def partial_root(out: str | Path) -> Path:
    """The folder beside ``out`` that holds the finished classes of unfinished searches."""
    out = Path(out)
    return out.parent / f".{out.name}.partial"


def search_key(stores: Sequence[ProbabilityStore], keys: Sequence[str], folds_of_images: Sequence[int] | None,
               settings: dict[str, Any], labels: str = "") -> str:
    """sha256 (hex) of every input a class result depends on (``labels``: the digest of the label files)."""
    document = {"format": FORMAT, "stores": [[store.url, store.attributes] for store in stores],
                "keys": list(keys), "folds": None if folds_of_images is None else [int(f) for f in folds_of_images],
                "settings": settings, "labels": labels}
    return hashlib.sha256(json.dumps(document, sort_keys=True, default=str).encode()).hexdigest()


def labels_digest(label_paths: Sequence[Path]) -> str:
    """sha256 (hex) of the label files' contents, in order: a corrected label file is a changed input."""
    digest = hashlib.sha256()
    for path in label_paths:
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()


class FinishedClasses:
    """The finished classes of one search (one key): load those already there, save each new one at once."""

    def __init__(self, out: str | Path, key: str, members: int | None = None,
                 strategies: Sequence[str] = ()) -> None:
        self.root = partial_root(out)
        self.key = key
        self.folder = self.root / key[:32]
        self.members = members  # a file whose per-member lists have another length is searched again
        self.strategies = tuple(strategies)  # a file lacking one of them is searched again
        self.ignored: list[Path] = []  # files of another search found here (a note says so)
        for path in (self.root, self.folder, self.folder / "evidence"):
            if path.is_symlink():  # its files would be written elsewhere and outlive the search (rmtree keeps them)
                raise SegensError(f"{path}: the search's resume folder is a link; segens keeps resume files in a "
                                  "real folder beside --out and removes it once the recipe is written: remove the "
                                  "link and run again")

    def load(self) -> dict[int, dict[str, ClassResult]]:
        """Channel -> {strategy: result} for every class a previous run of the same search finished (unreadable or
        invalid files are searched again; nothing in them is ever executed)."""
        finished = {}
        for path in sorted(self.folder.glob("class-*.json")):
            try:
                document = load_json(path, "search resume file", MAX_CLASS_FILE_BYTES)
                results = results_from_json(document, path)
            except SegensError:
                continue
            if document.get("search") != self.key:
                self.ignored.append(path)
                continue
            channels = {result.channel for result in results.values()}
            if path.name == _file_name(min(channels)) and len(channels) == 1 and set(results) == set(self.strategies) \
                    and all(self._fits(result) for result in results.values()):
                finished[channels.pop()] = results
        return finished

    def _fits(self, result: ClassResult) -> bool:
        choice = result.recipe_choice
        lengths = [choice.weights.size, len(result.member_dice), len(result.maps)]
        if choice.member_thresholds is not None:
            lengths.append(choice.member_thresholds.size)
        if result.calibration is not None:
            lengths.append(len(result.calibration))
        return self.members is None or (all(length == self.members for length in lengths)
                                        and (choice.min_votes is None or choice.min_votes <= self.members))

    def save(self, results: dict[str, ClassResult]) -> None:
        channel = next(iter(results.values())).channel
        document = {"format": FORMAT, "search": self.key, "results": {name: result_to_json(result)
                                                                      for name, result in results.items()}}
        atomic_write_text(self.folder / _file_name(channel), json.dumps(document) + "\n")

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
    calibration: Annotated[int, pydantic.Field(ge=0)] | None = None


class _ClassDocument(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

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
    held_out: dict[str, list[_Finite]]
    plain_choice: _ChoiceDocument | None
    plain_dice: _Finite
    maps: list[Annotated[list[_Finite], pydantic.Field(min_length=2, max_length=2)]]
    calibration: list[Annotated[list[Annotated[int, pydantic.Field(ge=0, le=255)]],
                                pydantic.Field(min_length=256, max_length=256)]] | None = None


class _FileDocument(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    format: int
    search: str
    results: dict[str, _ClassDocument] = pydantic.Field(min_length=1)


def _choice_to_json(choice: Choice) -> dict[str, Any]:
    return {"weights": [float(w) for w in choice.weights], "threshold": int(choice.threshold),
            "member_thresholds": None if choice.member_thresholds is None else [int(i) for i in choice.member_thresholds],
            "min_votes": None if choice.min_votes is None else int(choice.min_votes), "score": float(choice.score),
            "calibration": None if choice.calibration is None else int(choice.calibration)}


def _choice_from(document: _ChoiceDocument) -> Choice:
    return Choice(np.asarray(document.weights, dtype=np.float64), document.threshold,
                  None if document.member_thresholds is None else np.asarray(document.member_thresholds, np.int64),
                  document.min_votes, document.score, document.calibration)


def result_to_json(result: ClassResult) -> dict[str, Any]:
    """A ClassResult as a JSON-ready dict of plain numbers, lists and strings."""
    return {
        "channel": int(result.channel), "recipe_choice": _choice_to_json(result.recipe_choice),
        "postprocess": [str(step) for step in result.postprocess], "oof_dice": float(result.oof_dice),
        "member_dice": [float(d) for d in result.member_dice], "mean_dice": float(result.mean_dice),
        "ambiguous_pixels": int(result.ambiguous_pixels), "evaluations": int(result.evaluations),
        "cv": [{str(k): float(v) for k, v in fold.items()} for fold in result.cv], "level": str(result.level),
        "held_out": {str(k): [float(v) for v in values] for k, values in result.held_out.items()},
        "plain_choice": None if result.plain_choice is None else _choice_to_json(result.plain_choice),
        "plain_dice": float(result.plain_dice), "maps": [[float(v) for v in row] for row in result.maps],
        "calibration": None if result.calibration is None else [[int(v) for v in row] for row in result.calibration],
    }


def result_from_json(document: Any, path: Path) -> ClassResult:
    """A ClassResult from ``result_to_json``'s dict; a SegensError naming ``path`` if it is not one."""
    return _result_of(validate(_ClassDocument, document, path))


def results_from_json(document: Any, path: Path) -> dict[str, ClassResult]:
    """{strategy: ClassResult} from a class file (``FinishedClasses.save``); a SegensError naming ``path`` if it
    is not one."""
    if isinstance(document, dict) and document.get("format") != FORMAT:
        raise SegensError(f"{path}: search resume format {document.get('format')!r}, this segens writes {FORMAT}")
    checked = validate(_FileDocument, document, path)
    return {name: _result_of(result) for name, result in checked.results.items()}


def _result_of(result: _ClassDocument) -> ClassResult:
    return ClassResult(
        channel=result.channel, recipe_choice=_choice_from(result.recipe_choice), postprocess=list(result.postprocess),
        oof_dice=result.oof_dice, member_dice=list(result.member_dice), mean_dice=result.mean_dice,
        ambiguous_pixels=result.ambiguous_pixels, evaluations=result.evaluations,
        cv=[dict(fold) for fold in result.cv], level=result.level, held_out={k: list(v) for k, v in result.held_out.items()},
        plain_choice=None if result.plain_choice is None else _choice_from(result.plain_choice),
        plain_dice=result.plain_dice, maps=[list(row) for row in result.maps],
        calibration=None if result.calibration is None else [list(row) for row in result.calibration])
