"""Output paths, checked before any work starts: no command replaces data it was not told to replace.

Every command that writes lists its outputs (a file, a probability store or a folder) and its inputs, and calls
``check_outputs`` first. An output is refused when it is one of the inputs, lies inside an input, or holds an input
(replacing it would delete the input); when it is a directory where a file belongs, or a file where a store or
folder belongs; when an existing file, store or folder would be replaced without ``overwrite`` (a resumable
output, such as predict-member's store, is instead resumed by its writer, which checks its identity); and when
its parent folder cannot be created. Nothing is written inside a data root (a folder with ``train/DCM`` or
``test/DCM``): a file there could become an image or a label that the next command reads. URLs (``s3://...``) are
only compared with one another.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from segens.errors import SegensError
from segens.infra.locations import local_path

Kind = Literal["file", "store", "folder"]


@dataclass(frozen=True)
class Output:
    """One path a command writes: ``kind`` says what it becomes, ``option`` names it in errors (``--out``);
    ``resumable``: an existing store or folder is continued by its writer rather than replaced."""

    path: str | Path
    kind: Kind = "file"
    option: str = "--out"
    resumable: bool = False


def is_store(path: str | Path) -> bool:
    """Whether a local ``path`` is a zarr group (a folder with zarr.json): a probability store or a mask store."""
    local = local_path(path)
    return local is not None and (local / "zarr.json").is_file()


def _resolved(path: Path) -> Path:
    return path.resolve(strict=False)


def _inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _describe(path: Path) -> str:
    if is_store(path):
        return "a store"
    return "a folder" if path.is_dir() else "a file"


def check_outputs(outputs: Sequence[Output], inputs: Sequence[str | Path | None] = (), overwrite: bool = False) -> None:
    """SegensError for the first output that would destroy data or cannot be written (see the module docstring).
    ``None`` entries (options not given) are skipped in both lists."""
    given = [output for output in outputs if output.path is not None]
    input_paths = [(str(item), local_path(item)) for item in inputs if item is not None]
    seen: dict[str, Output] = {}
    for output in given:
        local = local_path(output.path)
        key = str(_resolved(local)) if local is not None else str(output.path).rstrip("/")
        if key in seen:
            raise SegensError(f"{output.path}: given both as {seen[key].option} and {output.option}; "
                              "give each output its own path")
        seen[key] = output
        if local is None:
            if any(str(output.path).rstrip("/") == text.rstrip("/") for text, _ in input_paths):
                raise SegensError(f"{output.path}: {output.option} is one of the inputs; write to another path")
            continue
        _check_against_inputs(output, local, input_paths)
        _check_outside_data_roots(output, local)
        _check_existing(output, local, overwrite)
        _check_parent(output, local)


def _check_against_inputs(output: Output, local: Path, inputs: list[tuple[str, Path | None]]) -> None:
    target = _resolved(local)
    for text, path in inputs:
        if path is None:
            continue
        source = _resolved(path)
        if target == source:
            raise SegensError(f"{output.path}: {output.option} is one of the inputs ({text}); writing it would "
                              "destroy it: write to another path")
        if _inside(target, source) and (source.is_file() or is_store(source)):
            raise SegensError(f"{output.path}: {output.option} lies inside the input {text}; write to another path")
        replaceable = output.kind == "store" or (output.kind == "folder" and not output.resumable)
        if replaceable and _inside(source, target):
            raise SegensError(f"{output.path}: {output.option} holds the input {text}; replacing it would delete "
                              "that input: write to another path")


def data_root_above(path: Path) -> Path | None:
    """The nearest folder above ``path`` (not ``path`` itself) laid out as a data root, or None."""
    for folder in _resolved(path).parents:
        if (folder / "train" / "DCM").is_dir() or (folder / "test" / "DCM").is_dir():
            return folder
    return None


def _check_outside_data_roots(output: Output, local: Path) -> None:
    root = data_root_above(local)
    if root is not None:
        raise SegensError(f"{output.path}: {output.option} lies inside the data root {root}; segens never writes "
                          "there (the next command could read it as data): write to another folder")


def _check_existing(output: Output, local: Path, overwrite: bool) -> None:
    if not local.exists() and not local.is_symlink():
        return
    if output.kind == "file":
        if local.is_dir():
            raise SegensError(f"{output.path}: {output.option} is {_describe(local)}, not a file; give the path of a "
                              "file to write (segens never replaces a folder or store with a file)")
        if not overwrite:
            raise SegensError(f"{output.path}: {output.option} exists; pass --overwrite to replace it, or write to "
                              "another path")
        return
    what = "store" if output.kind == "store" else "folder"
    if not local.is_dir():
        raise SegensError(f"{output.path}: {output.option} is a file, not a {what}; remove it or choose another path")
    if output.kind == "store" and not is_store(local) and any(local.iterdir()):
        raise SegensError(f"{output.path}: {output.option} is a folder that is not a store; segens never replaces "
                          "it: choose another path or remove it")
    if output.resumable or overwrite:
        return
    if is_store(local) or any(local.iterdir()):
        raise SegensError(f"{output.path}: {output.option} exists ({_describe(local)}); pass --overwrite to replace "
                          "it, or write to another path")


def _check_parent(output: Output, local: Path) -> None:
    parent = local.parent
    while not parent.exists():
        if parent.is_symlink():
            raise SegensError(f"{output.path}: {output.option}'s folder {parent} is a broken link; fix it or choose "
                              "another path")
        parent = parent.parent
    if not parent.is_dir():
        raise SegensError(f"{output.path}: {output.option} cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SegensError(f"{output.path}: {output.option} cannot be created: {parent} is not writable")
