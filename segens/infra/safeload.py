"""Bounded, validated reading of the files segens is given: every JSON, YAML and text file goes through here.

A file is read only if it is at most ``max_bytes`` long, decodes as UTF-8 (a leading BOM, as Excel writes it, is
accepted), nests at most ``MAX_DEPTH`` levels and expands to at most ``MAX_NODES`` values (YAML aliases are
counted every time they are used, so a "billion laughs" document is refused before anything is built from it).
Documents are then validated against a pydantic model with ``validate``; every failure is a SegensError naming
the file and the field.
"""

from __future__ import annotations

import json
import re
import stat
from pathlib import Path
from typing import Any, TypeVar

import pydantic
import yaml

from segens.errors import SegensError

MAX_BYTES = 64 << 20
"""Largest JSON or YAML document read (64 MiB): folds.json of 10^5 images is a few MB."""
MAX_DEPTH = 64
MAX_NODES = 2_000_000
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
"""Member and other names that become file and folder names: no separators, no '..', no leading dot."""

Model = TypeVar("Model", bound=pydantic.BaseModel)


def require_regular(path: str | Path, what: str) -> Path:
    """``path`` if it is not there or is a regular file (or a folder); a SegensError for a FIFO, socket or device,
    which reading would block on or never finish: checked before anything opens it."""
    path = Path(path)
    try:
        mode = path.stat().st_mode
    except OSError:
        return path  # missing or unreadable: the caller's own open says so
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise SegensError(f"{path}: {what} is not a regular file (a FIFO, socket or device); give a file")
    return path


def read_text(path: str | Path, what: str, max_bytes: int = MAX_BYTES) -> str:
    """A UTF-8 text file (BOM stripped) of at most ``max_bytes``; a SegensError naming ``what`` otherwise."""
    path = require_regular(path, what)
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise SegensError(f"{path}: {what} is {size:,} bytes, more than the {max_bytes:,} segens reads; "
                              "is it the right file?")
        data = path.read_bytes()
    except OSError as exc:
        raise SegensError(f"{path}: cannot read {what} ({exc.strerror or exc})") from None
    return decode_utf8(data, path, what)


def decode_utf8(data: bytes, path: str | Path, what: str) -> str:
    """Bytes -> str as UTF-8 with an optional BOM; the byte offset of the first bad byte in the error."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise SegensError(f"{path}: {what} is not UTF-8 text (byte {exc.start}: {data[exc.start:exc.start + 1]!r}); "
                          "save it as UTF-8") from None


def load_json(path: str | Path, what: str, max_bytes: int = MAX_BYTES) -> Any:
    """A bounded JSON document (see the module docstring)."""
    return parse_json(read_text(path, what, max_bytes), path, what)


def parse_json(text: str | bytes, path: str | Path, what: str) -> Any:
    """Parse JSON text (bytes: UTF-8, BOM accepted) with the bounds of ``load_json``; ``path`` only names the
    source in errors."""
    if isinstance(text, bytes):
        if len(text) > MAX_BYTES:
            raise SegensError(f"{path}: {what} is {len(text):,} bytes, more than the {MAX_BYTES:,} segens reads")
        text = decode_utf8(text, path, what)
    try:
        document = json.loads(text)
    except RecursionError:
        raise SegensError(f"{path}: {what} nests deeper than {MAX_DEPTH} levels") from None
    except ValueError as exc:
        raise SegensError(f"{path}: {what} is not valid JSON ({exc})") from None
    check_bounds(document, path, what)
    return document


class _BoundedLoader(yaml.SafeLoader):
    """PyYAML's safe loader with a limit on nesting while composing (deep documents never reach Python's stack)."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep()
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# YAML 1.2 reads 2e-1 as a number; PyYAML (YAML 1.1) needs a dot (2.0e-1) and would give the string "2e-1"
_BoundedLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$"),
                                     list("-+0123456789"))


class _TooDeep(Exception):
    pass


def load_yaml(path: str | Path, what: str, max_bytes: int = MAX_BYTES) -> Any:
    """A bounded YAML document (safe loader: no Python objects; see the module docstring)."""
    text = read_text(path, what, max_bytes)
    return parse_yaml(text, path, what)


def parse_yaml(text: str, path: str | Path, what: str) -> Any:
    """Parse YAML text with the bounds of ``load_yaml``; ``path`` only names the source in errors."""
    try:
        document = yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except (_TooDeep, RecursionError):
        raise SegensError(f"{path}: {what} nests deeper than {MAX_DEPTH} levels") from None
    except yaml.YAMLError as exc:
        raise SegensError(f"{path}: {what} is not valid YAML ({exc})") from None
    check_bounds(document, path, what)
    return document


def check_bounds(document: Any, path: str | Path, what: str) -> None:
    """Refuse a parsed document deeper than MAX_DEPTH or with more than MAX_NODES values once expanded (shared
    objects, as YAML aliases make them, are counted at every use)."""
    count = 0
    stack: list[tuple[Any, int]] = [(document, 1)]
    while stack:
        value, depth = stack.pop()
        count += 1
        if count > MAX_NODES:
            raise SegensError(f"{path}: {what} expands to more than {MAX_NODES:,} values (YAML aliases?); refused")
        if depth > MAX_DEPTH:
            raise SegensError(f"{path}: {what} nests deeper than {MAX_DEPTH} levels")
        if isinstance(value, dict):
            stack.extend((item, depth + 1) for pair in value.items() for item in pair)
        elif isinstance(value, (list, tuple)):
            stack.extend((item, depth + 1) for item in value)


def check_name(name: Any, what: str, where: str | Path) -> str:
    """A name that becomes part of a path (member names): letters, digits, '.', '_', '+', '-', at most 128, not
    starting with '.' or '-' and never '..'."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise SegensError(f"{where}: {what} {name!r} is not a safe name: use letters, digits, '.', '_', '+', '-' "
                          "(at most 128, starting with a letter or digit, no '..')")
    return name


def validate(model: type[Model], document: Any, where: str | Path) -> Model:
    """``document`` checked against a pydantic model; the first errors named by field path in a SegensError."""
    try:
        return model.model_validate(document)
    except pydantic.ValidationError as exc:
        problems = []
        for error in exc.errors()[:5]:
            location = ".".join(str(part) for part in error["loc"]) or "(document)"
            message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for our own validators' messages
            problems.append(f"{location}: {message}")
        more = f" (and {exc.error_count() - 5} more)" if exc.error_count() > 5 else ""
        raise SegensError(f"{where}: {'; '.join(problems)}{more}") from None


def torch_load_data(path: str | Path, what: str) -> Any | None:
    """A torch file loaded with ``weights_only=True`` (tensors, numbers, strings, lists, dicts: nothing in it can
    run code), or None when it holds pickled objects (loading those runs code: only ``torch_load_pickle``, behind
    --trust-pickle). A SegensError naming ``what`` for a file torch cannot read at all."""
    import torch

    require_regular(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        if "Weights only load failed" in str(exc):
            return None
        raise SegensError(f"{path}: not a loadable {what} ({type(exc).__name__}: {exc})") from None


def torch_load_pickle(path: str | Path, what: str) -> Any:
    """A torch file fully unpickled (runs code stored in it: call only with --trust-pickle); failures named."""
    import torch

    require_regular(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unpickling can fail in any way
        raise SegensError(f"{path}: the {what} cannot be unpickled ({type(exc).__name__}: {exc})") from None


def pickle_load(path: str | Path, what: str) -> Any:
    """A plain pickle file unpickled (runs code stored in it: call only with --trust-pickle); failures named."""
    import pickle

    require_regular(path, what)
    try:
        with open(path, "rb") as handle:
            return pickle.load(handle)  # noqa: S301 - only behind --trust-pickle
    except Exception as exc:  # noqa: BLE001 - unpickling can fail in any way
        raise SegensError(f"{path}: the {what} cannot be unpickled ({type(exc).__name__}: {exc})") from None
