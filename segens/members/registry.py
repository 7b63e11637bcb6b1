"""The registry of member kinds: a new kind of member is one new module that calls ``register``.

An adapter exposes ``predict(images, folds) -> (29, H, W) float32 probabilities`` through an object built once
per process (see segens.members.base); kinds that run a network subclass segens.members.network.NetworkMember
and only say how they load a model."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from segens.errors import SegensError

_FACTORIES: dict[str, Callable[..., Any]] = {}
BUILTIN_KINDS = {"smp": "segens.members.kinds.smp", "yolo": "segens.members.kinds.yolo", "csv": "segens.members.kinds.csv_member",
                 "torch": "segens.members.kinds.torch_member"}


def register(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: register a factory (a class or function) that builds an adapter for member kind ``kind``."""

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        _FACTORIES[kind] = factory
        return factory

    return decorate


def kinds() -> list[str]:
    """Every known kind (built-in kinds are imported lazily, only when used)."""
    return sorted(set(BUILTIN_KINDS) | set(_FACTORIES))


def factory(kind: str) -> Callable[..., Any]:
    """The adapter factory of a kind, importing its module on first use."""
    if kind not in _FACTORIES and kind in BUILTIN_KINDS:
        importlib.import_module(BUILTIN_KINDS[kind])
    if kind not in _FACTORIES:
        raise SegensError(f"unknown member kind {kind!r}; known kinds: {', '.join(kinds())}")
    return _FACTORIES[kind]
