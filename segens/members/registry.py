"""The registry of member kinds: a new kind of member is one new module whose adapter class (a subclass of
segens.members.base.NetworkMember or ImportedMember) is decorated with ``@register("kind")``. The built-in kinds'
modules are imported on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from segens.errors import SegensError

_FACTORIES: dict[str, Callable[..., Any]] = {}
BUILTIN_KINDS = {"smp": "segens.members.kinds.smp", "yolo": "segens.members.kinds.yolo",
                 "csv": "segens.members.kinds.csv_member", "torch": "segens.members.kinds.torch_member",
                 "arrays": "segens.members.kinds.arrays",
                 "nnunet": "segens.members.kinds.nnunet"}


def register(kind: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Class decorator: register the adapter class of member kind ``kind`` (and name the class's kind)."""

    def decorate(factory: Callable[..., Any]) -> Callable[..., Any]:
        if isinstance(factory, type):
            factory.kind = kind
        _FACTORIES[kind] = factory
        return factory

    return decorate


def kinds() -> list[str]:
    """Every known kind (built-in kinds are imported lazily, only when used)."""
    return sorted(set(BUILTIN_KINDS) | set(_FACTORIES))


def build_member(spec: Any, device: str = "cpu", trust_pickle: bool = False, trust_code: bool = False) -> Any:
    """The adapter of a member spec (segens.members.base.Member), built once per process."""
    return factory(spec.kind)(spec, device=device, trust_pickle=trust_pickle, trust_code=trust_code)


def factory(kind: str) -> Callable[..., Any]:
    """The adapter factory of a kind, importing its module on first use."""
    if kind not in _FACTORIES and kind in BUILTIN_KINDS:
        importlib.import_module(BUILTIN_KINDS[kind])
    if kind not in _FACTORIES:
        raise SegensError(f"unknown member kind {kind!r}; known kinds: {', '.join(kinds())}")
    return _FACTORIES[kind]
